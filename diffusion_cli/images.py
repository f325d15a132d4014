"""Image grids on disk."""

from pathlib import Path

import torch
from torch.nn import functional as F
from torchvision.utils import save_image

from .atomic import atomic_write

# Small images are scaled up (nearest neighbour, so pixels stay sharp) to at least this many
# pixels a side: a grid of 16x16 images is unreadable at its own size.
MIN_CELL_PIXELS = 64


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images + 1) / 2).clamp(0, 1)


def save_grid(images: torch.Tensor, path: Path, nrow: int = 0, row_titles: list[str] | None = None) -> Path:
    """Save images in [0, 1], (N, C, H, W), as one PNG grid; nrow 0 = a square grid; row_titles
    are written left of the rows."""
    images = images.detach().float().cpu()
    scale = max(1, -(-MIN_CELL_PIXELS // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    nrow = nrow or max(1, round(len(images) ** 0.5))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)
    if row_titles:
        title_rows(path, row_titles, cell=images.shape[-2] + 2)
    return path


def title_rows(path: Path, titles: list[str], cell: int) -> None:
    """Prepend a white margin to the grid at `path` with one title per row of `cell` pixels."""
    from PIL import Image, ImageDraw, ImageFont

    grid = Image.open(path).convert("RGB")
    font = ImageFont.load_default()
    margin = 8 + max(ImageDraw.Draw(grid).textlength(title, font=font) for title in titles)
    titled = Image.new("RGB", (grid.width + int(margin), grid.height), "white")
    titled.paste(grid, (int(margin), 0))
    draw = ImageDraw.Draw(titled)
    for row, title in enumerate(titles):
        draw.text((4, row * cell + cell // 2), title, fill="black", font=font, anchor="lm")
    titled.save(path)


def write_png(image: torch.Tensor, path) -> None:
    """A uint8 (C, H, W) image as a PNG file (a path or an open binary file)."""
    from PIL import Image

    array = image.permute(1, 2, 0).numpy()
    Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).save(path, format="PNG")


def save_each(images: torch.Tensor, folder: Path, first: int = 0, missing_only: bool = False) -> None:
    """Every image in [0, 1] as its own PNG at its own size, folder/000000.png, 000001.png, ...
    numbered from `first`; each written whole or not at all; `missing_only`: leave existing files."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    for index, image in enumerate(pixels, start=first):
        path = folder / f"{index:06d}.png"
        if not (missing_only and path.exists()):
            with atomic_write(path, "wb") as file:
                write_png(image, file)
