"""Image grids on disk."""

from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision.utils import save_image

# Small images are scaled up (nearest neighbour, so pixels stay sharp) to at least this many
# pixels a side: a grid of 16x16 images is unreadable at its own size.
MIN_CELL_PIXELS = 64


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 0) -> Path:
    """Save images in [0, 1], (N, C, H, W), as one PNG grid; nrow 0 = a square grid."""
    images = images.detach().float().cpu()
    scale = max(1, -(-MIN_CELL_PIXELS // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, round(len(images) ** 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
    return path
