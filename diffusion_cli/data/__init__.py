"""The datasets: one registry row per `data.kind` (its loader, image shape, class names and quality
metric), and the (train, eval) splits a run trains and evaluates on.

Adding a dataset is one row in DATASETS and one YAML file in conf/data/.
"""

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, List, NamedTuple, Optional

import torch
from omegaconf import MISSING

from ..errors import UserError
from ..schema import check, non_negative, one_of, positive
from .captions import FORMATS as CAPTION_FORMATS, with_captions
from .folder import folder_captions, folder_classes, load_folder
from .gradients import gradient_grid, load_gradients, make_gradients
from .rows import RowFile, cache_entry, read_entry, write_entry
from .torchvision_sets import load_mnist, loader

log = logging.getLogger(__name__)

__all__ = ["DATASETS", "Split", "load_data", "class_names", "to_model_range", "gradient_grid",
           "make_gradients", "load_mnist", "RowFile"]

FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                   "bag", "ankle-boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck"]


@dataclass(frozen=True)
class Dataset:
    # data_cfg -> ((train images, labels), (eval images, labels)): uint8 pixels, floats in [0, 1],
    # or (train only) a RowFile; labels None for unlabelled data
    load: Callable
    classes: Callable                    # data_cfg -> class names ([]: unlabelled)
    shape: tuple | None = None           # a fixed (C, H, W); None: data.channels/height/width
    quality: str | None = None           # its metric in metrics.QUALITY_METRICS; None: none in-project
    generated: bool = False              # made in memory: nothing to stream
    # data_cfg -> every image's captions ([]: none), in the order of the image ids its loader
    # returns as labels when data.captions names a format; None: no captions of its own
    captions: Callable | None = None


def fixed(names: list[str]) -> Callable:
    return lambda data_cfg: names


DATASETS = {
    "gradients": Dataset(load_gradients, fixed([]), quality="gradients", generated=True),
    "mnist": Dataset(loader("mnist"), fixed([str(d) for d in range(10)]), (1, 28, 28), "mnist_classifier"),
    "fashion_mnist": Dataset(loader("fashion_mnist"), fixed(FASHION_CLASSES), (1, 28, 28)),
    "cifar10": Dataset(loader("cifar10"), fixed(CIFAR10_CLASSES), (3, 32, 32)),
    "folder": Dataset(load_folder, folder_classes, captions=folder_captions),
}

# data.in_memory=auto streams a training set above this many bytes of uint8 pixels.
IN_MEMORY_LIMIT = 2 ** 30


def class_names(data_cfg) -> list[str]:
    """The class names of the data's labels, index order ([]: no labels)."""
    return DATASETS[data_cfg.kind].classes(data_cfg)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """Stored images (uint8 pixels, or floats in [0, 1]) as floats in [-1, 1]."""
    return (images.float() / 255 if images.dtype == torch.uint8 else images) * 2 - 1


class Split(NamedTuple):
    images: torch.Tensor | RowFile       # (N, C, H, W): see load_data
    labels: torch.Tensor | None          # (N,) class indices (with captions: caption groups), or None
    captions: list[list[str]] | None = None  # each caption group's captions (captions.py), or None

    def head(self, n: int) -> "Split":
        """The first n images and their labels."""
        return self._replace(images=self.images[:n], labels=None if self.labels is None else self.labels[:n])

    def keep(self, kept: torch.Tensor) -> "Split":
        """The images where the bool mask `kept` is true."""
        images = self.images.subset(self.images.rows[kept]) if isinstance(self.images, RowFile) \
            else self.images[kept]
        return self._replace(images=images, labels=self.labels[kept])


def load_data(data_cfg) -> tuple[Split, Split]:
    """The (train, eval) splits of the `data` config group. Training images stay as stored (uint8
    pixels, or floats in [0, 1] for generated data; a RowFile when they stream from the cache);
    the eval images are floats in [-1, 1]."""
    dataset = DATASETS[data_cfg.kind]
    shape = (data_cfg.channels, data_cfg.height, data_cfg.width)
    if dataset.shape and shape != dataset.shape:
        size = "x".join(map(str, dataset.shape))
        raise UserError(f"data={data_cfg.kind} images are {size}, got data.channels/height/width = "
                        f"{'x'.join(map(str, shape))}; leave those keys at their defaults")
    (train, train_labels), (evaluation, eval_labels) = dataset.load(data_cfg)
    train, evaluation = Split(train, train_labels), Split(evaluation, eval_labels)
    train, evaluation = with_captions(data_cfg, train, evaluation, dataset.captions, lambda: class_names(data_cfg))
    if streams(data_cfg, train.images):
        if not isinstance(train.images, RowFile):
            train = train._replace(images=cache_rows(data_cfg, train.images))
    elif isinstance(train.images, RowFile):
        train = train._replace(images=train.images.read_all())
    return train, evaluation._replace(images=to_model_range(evaluation.images))


def streams(data_cfg, train) -> bool:
    """Whether training reads batches from the cache (data.in_memory, or auto: above IN_MEMORY_LIMIT)."""
    if data_cfg.in_memory != "auto":
        if not data_cfg.in_memory and DATASETS[data_cfg.kind].generated:
            raise UserError(f"data.in_memory=false: data={data_cfg.kind} is generated in memory, "
                            f"there is nothing to stream; leave data.in_memory=auto")
        return not data_cfg.in_memory
    count = len(train)
    return count * data_cfg.channels * data_cfg.height * data_cfg.width > IN_MEMORY_LIMIT


def cache_rows(data_cfg, images: torch.Tensor) -> RowFile:
    """A loaded training set (a torchvision one) written to the row cache, to stream from."""
    key = {"kind": data_cfg.kind, "root": str(data_cfg.root), "count": len(images)}
    pixels, meta_path = cache_entry(data_cfg.kind, key)
    meta = read_entry(meta_path) or write_entry(pixels, meta_path, images.split(4096), {})
    return RowFile(pixels, tuple(meta["shape"]), torch.arange(meta["shape"][0]))


# The config group's schema (conf/ holds the values and their docs).
CAPTION_KINDS = ("none", "auto", *CAPTION_FORMATS, "labels")


@dataclass
class DataConfig:
    kind: str = one_of(DATASETS)
    root: Optional[str] = MISSING
    download: bool = MISSING
    channels: int = positive()
    height: int = positive()
    width: int = positive()
    num_train: int = positive()
    num_eval: Any = check(lambda v: v == "auto" or (isinstance(v, int) and v >= 1),
                          "an integer >= 1, or auto (10% of the images, at most 256)", MISSING)
    hflip: bool = MISSING
    in_memory: Any = check(lambda v: v in (True, False, "auto"), "true, false or auto", MISSING)
    num_workers: int = non_negative("an integer >= 0 (0: read in the training process)")
    path: Optional[str] = None              # data=folder's own keys
    image_size: Optional[int] = check(lambda v: v is None or v >= 1, "an integer >= 1, e.g. 32 or 64", None)
    labels: str = check(lambda v: v in ("none", "subfolders"), "one of: none, subfolders", "none")
    classes: Optional[List[str]] = None     # filled in by training from the data: the class names
    captions: str = check(lambda v: v in CAPTION_KINDS, f"one of: {', '.join(CAPTION_KINDS)}", "none")
    caption_column: str = "text"
    missing_captions: str = check(lambda v: v in ("empty", "skip"), "one of: empty, skip", "empty")
    caption_templates: List[str] = field(default_factory=lambda: [
        "{name}", "a {name}", "a picture of a {name}", "a photo of a {name}"])
    held_out_template: str = "an image of a {name}"
