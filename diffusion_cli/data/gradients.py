"""Synthetic color gradients: the built-in default, generated in memory (no files)."""

import torch

from .split import held_out_count


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


# Fixed seeds: the eval set is drawn from another stream than the train set.
TRAIN_SEED, EVAL_SEED = 0, 1


def load_gradients(data_cfg):
    """((train images, None), (eval images, None)), floats in [0, 1]."""
    shape = (data_cfg.channels, data_cfg.height, data_cfg.width)
    return ((make_gradients(data_cfg.num_train, shape, TRAIN_SEED), None),
            (make_gradients(held_out_count(data_cfg, data_cfg.num_train), shape, EVAL_SEED), None))
