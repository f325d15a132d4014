"""The datasets, as in-memory tensors of images in [-1, 1], shape (N, C, H, W)."""

from typing import NamedTuple

import torch

from .errors import UserError


def gradient_grid(height: int, width: int) -> torch.Tensor:
    """The fixed (H, W) ramp of the gradient images: 0 at the top-left corner, 1 at the bottom-right."""
    xs = torch.linspace(0, width / (width + height), width, dtype=torch.float64)
    ys = torch.linspace(0, height / (width + height), height, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    grid = gx + gy
    return grid / grid[-1, -1]


def make_gradients(n: int, shape: tuple[int, int, int], seed: int) -> torch.Tensor:
    """n color-gradient images in [0, 1]: per channel, corner color a at the top-left blending
    linearly to b at the bottom-right, with a and b integers in 0..255."""
    channels, height, width = shape
    generator = torch.Generator().manual_seed(seed)
    corners = torch.randint(0, 256, (2, n, channels), generator=generator, dtype=torch.float64)
    a, b = corners[0, :, :, None, None], corners[1, :, :, None, None]
    grid = gradient_grid(height, width)
    return ((a + grid * (b - a)) / 255).float()


DATA_KINDS = ("gradients", "mnist")

# Fixed seeds: the eval set is drawn from another stream than the train set.
GRADIENTS_TRAIN_SEED, GRADIENTS_EVAL_SEED = 0, 1


def load_mnist(root: str, download: bool, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits in [0, 1], (N, 1, 28, 28), and their labels (N,)."""
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(root, train=train, download=download)
    except (RuntimeError, OSError) as error:  # "Dataset not found", or a failed download
        if download:
            reason = str(error).strip().splitlines()[0].rstrip(":")
            raise UserError(f"MNIST is not under {root}/MNIST/raw and downloading it failed "
                            f"({reason}; offline?): put the MNIST files there, or set data.root= "
                            f"or DIFFUSION_CLI_DATA to a folder that has MNIST/raw/*-ubyte") from None
        raise UserError(f"MNIST not found under {root}/MNIST/raw: set data.root= or "
                        f"DIFFUSION_CLI_DATA to a folder that has MNIST/raw/*-ubyte, or "
                        f"data.download=true to fetch it") from None
    return dataset.data[:, None].float() / 255, dataset.targets


# How many classes each dataset's labels have (0: no labels).
NUM_CLASSES = {"gradients": 0, "mnist": 10}


class Split(NamedTuple):
    images: torch.Tensor                 # (N, C, H, W) in [-1, 1]
    labels: torch.Tensor | None          # (N,) class indices, None for unlabelled data

    def head(self, n: int) -> "Split":
        """The first n images and their labels."""
        return Split(self.images[:n], None if self.labels is None else self.labels[:n])


def load_data(data_cfg) -> tuple[Split, Split]:
    """The (train, eval) splits of the `data` config group."""
    shape = (data_cfg.channels, data_cfg.height, data_cfg.width)
    if data_cfg.kind == "gradients":
        train = make_gradients(data_cfg.num_train, shape, GRADIENTS_TRAIN_SEED), None
        evaluation = make_gradients(data_cfg.num_eval, shape, GRADIENTS_EVAL_SEED), None
    elif data_cfg.kind == "mnist":
        if shape != (1, 28, 28):
            raise UserError(f"data=mnist images are 1x28x28, got data.channels/height/width = "
                            f"{'x'.join(map(str, shape))}; leave those keys at their defaults")
        root, download = data_cfg.root, data_cfg.download
        train = [part[: data_cfg.num_train] for part in load_mnist(root, download, train=True)]
        evaluation = [part[: data_cfg.num_eval] for part in load_mnist(root, download, train=False)]
    else:
        raise UserError(f"data.kind={data_cfg.kind!r} is unknown; choose one of: {', '.join(DATA_KINDS)}")
    return Split(train[0] * 2 - 1, train[1]), Split(evaluation[0] * 2 - 1, evaluation[1])
