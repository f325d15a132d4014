"""Images as rows of a uint8 file in the cache: (N, C, H, W) pixels, one image after another.

Decoding and resizing a folder of JPEGs (and writing out a torchvision set for streaming) happens
once; later runs read the rows: all of them into memory, or a batch at a time with os.pread, so a
streaming run's resident memory does not grow with the data (a memory map would count every page
it touched).
"""

import hashlib
import json
import math
import os
from pathlib import Path
from dataclasses import dataclass, replace
from typing import Iterable

import torch

from ..atomic import atomic_write


def cache_dir() -> Path:
    """$DIFFUSION_CLI_CACHE, else $XDG_CACHE_HOME/diffusion-cli, else ~/.cache/diffusion-cli."""
    if os.environ.get("DIFFUSION_CLI_CACHE"):
        return Path(os.environ["DIFFUSION_CLI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "diffusion-cli"


@dataclass(frozen=True)
class RowFile:
    """Some rows of a cached uint8 image file."""
    path: Path
    shape: tuple[int, int, int, int]     # (N, C, H, W) of the whole file
    rows: torch.Tensor                   # the rows of this split, (n,) LongTensor

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:])

    def subset(self, rows: torch.Tensor) -> "RowFile":
        return replace(self, rows=rows)

    def read_all(self) -> torch.Tensor:
        """This split's images, uint8 (n, C, H, W), in memory."""
        pixels = torch.from_file(str(self.path), size=math.prod(self.shape), dtype=torch.uint8)
        return pixels.view(self.shape)[self.rows]


def cache_entry(kind: str, key: dict) -> tuple[Path, Path]:
    """(pixel file, metadata file) of the cache entry for `key` (anything that changes the pixels)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    stem = cache_dir() / "images" / f"{kind}-{digest}"
    return stem.with_suffix(".u8"), stem.with_suffix(".json")


def read_entry(meta_path: Path) -> dict | None:
    """The metadata of a complete cache entry (written last), or None."""
    try:
        return json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None


def write_entry(pixels_path: Path, meta_path: Path, chunks: Iterable[torch.Tensor], meta: dict) -> dict:
    """Write uint8 (n, C, H, W) chunks as rows, then the metadata (with the shape) that marks the
    entry complete; a crash leaves no entry behind."""
    count, image_shape = 0, None
    with atomic_write(pixels_path, "wb") as file:
        for chunk in chunks:
            image_shape = tuple(chunk.shape[1:])
            file.write(chunk.contiguous().numpy().tobytes())
            count += len(chunk)
    meta = {**meta, "shape": [count, *(image_shape or ())]}
    with atomic_write(meta_path) as file:
        file.write(json.dumps(meta))
    return meta


class RowReader(torch.utils.data.Dataset):
    """A batch of images by row index list, read with os.pread (each DataLoader worker opens the
    file itself); returns (uint8 images (B, C, H, W), labels (B,) or None)."""

    def __init__(self, file: RowFile, labels: torch.Tensor | None):
        self.file, self.labels = file, labels
        self.fd, self.pid = None, None

    def __len__(self) -> int:
        return len(self.file)

    def __getitem__(self, indices: list[int]):
        if self.pid != os.getpid():
            self.fd, self.pid = os.open(self.file.path, os.O_RDONLY), os.getpid()
        size, rows = self.file.row_bytes, self.file.rows[indices].tolist()
        data = bytearray(b"".join(os.pread(self.fd, size, row * size) for row in rows))
        images = torch.frombuffer(data, dtype=torch.uint8).view(len(rows), *self.file.shape[1:])
        return images, None if self.labels is None else self.labels[indices]
