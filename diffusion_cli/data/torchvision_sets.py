"""The torchvision datasets: MNIST, Fashion-MNIST and CIFAR-10, as uint8 (N, C, H, W) tensors."""

import torch

from ..errors import UserError
from .split import held_out_count

# name -> (torchvision class, the folder under root that holds its files, what is in it)
SOURCES = {
    "mnist": ("MNIST", "MNIST/raw", "MNIST/raw/*-ubyte"),
    "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw", "FashionMNIST/raw/*-ubyte"),
    "cifar10": ("CIFAR10", "cifar-10-batches-py", "cifar-10-batches-py/data_batch_*"),
}


def load_torchvision(name: str, root: str, download: bool, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A torchvision dataset's images, uint8 (N, C, H, W), and labels (N,); one-line errors when
    it is neither under root nor downloadable."""
    import torchvision.datasets

    class_name, folder, files = SOURCES[name]
    try:
        dataset = getattr(torchvision.datasets, class_name)(root, train=train, download=download)
    except (RuntimeError, OSError) as error:  # "Dataset not found", or a failed download
        if download:
            reason = str(error).strip().splitlines()[0].rstrip(":")
            raise UserError(f"{class_name} is not under {root}/{folder} and downloading it failed "
                            f"({reason}; offline?): put its files there, or set data.root= "
                            f"or DIFFUSION_CLI_DATA to a folder that has {files}") from None
        raise UserError(f"{class_name} not found under {root}/{folder}: set data.root= or "
                        f"DIFFUSION_CLI_DATA to a folder that has {files}, or "
                        f"data.download=true to fetch it") from None
    images = torch.as_tensor(dataset.data)
    images = images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)  # CIFAR is NHWC
    return images.contiguous(), torch.as_tensor(dataset.targets)


def load_mnist(root: str, download: bool, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits as floats in [0, 1], (N, 1, 28, 28), and their labels (N,): the classifier's."""
    images, labels = load_torchvision("mnist", root, download, train)
    return images.float() / 255, labels


def loader(name: str):
    """The registry's loader of a torchvision set: its first num_train train and num_eval test images."""
    def load(data_cfg):
        train = load_torchvision(name, data_cfg.root, data_cfg.download, train=True)
        evaluation = load_torchvision(name, data_cfg.root, data_cfg.download, train=False)
        held = held_out_count(data_cfg, len(evaluation[0]), "test images")
        return [part[: data_cfg.num_train] for part in train], [part[:held] for part in evaluation]
    return load
