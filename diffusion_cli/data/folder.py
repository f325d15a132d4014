"""data=folder: every image under data.path, decoded once into the row cache (rows.py).

Images are resized (shorter side to data.image_size, then center-cropped to a square) and
converted to data.channels; with data.labels=subfolders each first-level subfolder is a class
(sorted names -> ids). A fixed-seed permutation holds data.num_eval images out of training
(auto: 10% of them, data/split.py). With a caption format in data.captions the labels are the
images' ids, which folder_captions() gives the captions of.
"""

import logging
import warnings
from pathlib import Path

import torch
from torchvision.transforms.v2 import functional as F

from ..errors import UserError
from .captions import read_captions
from .rows import RowFile, cache_entry, read_entry, write_entry
from .split import MEMORISES, check_held_out, held_out_count

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
CACHE_VERSION = 1      # part of the cache key: bump it when decoding or resizing changes
SPLIT_SEED = 0         # the held-out images are the same for every run on the same folder


def scan(data_cfg) -> tuple[Path, list[Path], list[str]]:
    """(root, image files sorted by path, class names: the first-level subfolders, or [])."""
    if not data_cfg.path:
        raise UserError("data=folder needs data.path: diffusion-train data=folder data.path=DIR")
    root = Path(data_cfg.path).expanduser()
    if not root.is_dir():
        raise UserError(f"data.path={data_cfg.path} is not a folder: point it at a folder of images")
    files = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in path.relative_to(root).parts))
    if not files:
        raise UserError(f"data.path={data_cfg.path} holds no images ({', '.join(IMAGE_SUFFIXES)}, "
                        f"searched recursively): point it at a folder of images")
    if data_cfg.labels == "none":
        return root, files, []
    loose = [path for path in files if path.parent == root]
    if loose:
        raise UserError(f"data.labels=subfolders, but {loose[0]} and {len(loose) - 1} more images lie "
                        f"directly in {root}: move each image into a folder named after its class, "
                        f"or use data.labels=none")
    return root, files, sorted({path.relative_to(root).parts[0] for path in files})


def folder_classes(data_cfg) -> list[str]:
    return scan(data_cfg)[2]


def decode(path: Path, size: int, channels: int) -> torch.Tensor | None:
    """One image as uint8 (channels, size, size), or None when it can't be decoded."""
    from PIL import Image

    try:
        with warnings.catch_warnings(), Image.open(path) as image:  # a GIF opens at its first frame
            warnings.simplefilter("ignore")  # PIL's palette and EXIF remarks
            tensor = F.pil_to_tensor(image.convert("RGB" if channels == 3 else "L"))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    tensor = F.resize(tensor, [size], antialias=True)
    return F.center_crop(tensor, [size, size])


class Decoder(torch.utils.data.Dataset):
    def __init__(self, files, size, channels):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        return index, decode(self.files[index], self.size, self.channels)


def decode_all(files: list[Path], size: int, channels: int, workers: int, skipped: list[int]):
    """uint8 chunks of the decodable images, decoded by `workers` processes; the indices of the
    others go into `skipped`."""
    from ..progress import tqdm

    loader = torch.utils.data.DataLoader(Decoder(files, size, channels), batch_size=64,
                                         num_workers=workers, collate_fn=list)
    with tqdm(total=len(files), desc="decoding images (once)", unit="image", dynamic_ncols=True) as bar:
        for batch in loader:
            skipped += [index for index, image in batch if image is None]
            good = [image for _, image in batch if image is not None]
            if good:
                yield torch.stack(good)
            bar.update(len(batch))


def cached_folder(data_cfg) -> tuple[RowFile, torch.Tensor | None, list[Path]]:
    """Every decodable image of the folder in the row cache (decoded on the first run), their
    labels (None for data.labels=none) and their files."""
    root, files, classes = scan(data_cfg)
    if data_cfg.num_eval != "auto":  # before decoding: the files can only be fewer readable images
        check_held_out(data_cfg, data_cfg.num_eval, len(files), "image files")
    size, channels = data_cfg.image_size, data_cfg.channels
    key = {"version": CACHE_VERSION, "root": str(root.resolve()), "size": size, "channels": channels,
           "files": [[str(path.relative_to(root)), *stat(path)] for path in files]}
    pixels, meta_path = cache_entry("folder", key)
    meta = read_entry(meta_path)
    if meta is None:
        log.info(f"decoding {len(files):,} images of {root} at {channels}x{size}x{size} into {pixels} "
                 f"(once: later runs read the cache; set DIFFUSION_CLI_CACHE to move it)")
        skipped = []
        chunks = decode_all(files, size, channels, data_cfg.num_workers, skipped)
        meta = write_entry(pixels, meta_path, chunks, {"root": str(root), "skipped": skipped,
                           "files": [str(path.relative_to(root)) for path in files]})
    if meta["skipped"]:
        log.warning(f"skipped {len(meta['skipped'])} of {len(files)} files that are not readable "
                    f"images, the first: {root / meta['files'][meta['skipped'][0]]}")
    if meta["shape"][0] == 0:
        raise UserError(f"data.path={data_cfg.path}: none of its {len(files)} image files could be "
                        f"decoded: point it at a folder of readable images")
    kept = sorted(set(range(len(files))) - set(meta["skipped"]))
    labels = None
    if classes:
        ids = {name: i for i, name in enumerate(classes)}
        labels = torch.tensor([ids[files[i].relative_to(root).parts[0]] for i in kept])
    return RowFile(pixels, tuple(meta["shape"]), torch.arange(len(kept))), labels, [files[i] for i in kept]


def captioned(data_cfg) -> bool:
    return data_cfg.get("captions", "none") not in ("none", "labels")


def folder_captions(data_cfg) -> list[list[str]]:
    """Every decodable image's captions ([]: none), in row order."""
    _, _, files = cached_folder(data_cfg)
    captions = read_captions(Path(data_cfg.path).expanduser(), files, data_cfg.captions, data_cfg.caption_column)
    return [captions.get(path, []) for path in files]


def stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def load_folder(data_cfg):
    """((train rows, labels), (eval images, labels)): num_eval images held out by a fixed-seed
    permutation, then up to num_train of the rest. With captions the labels are image ids."""
    images, labels, _ = cached_folder(data_cfg)
    count = len(images)
    if captioned(data_cfg):
        labels = torch.arange(count)
    held = held_out_count(data_cfg, count)
    check_held_out(data_cfg, held, count)
    if count <= MEMORISES:
        log.warning(f"data.path={data_cfg.path} has {count} image{'s' * (count > 1)}: the model will memorise "
                    f"{'them' if count > 1 else 'it'} (a few hundred or more let it learn what they have in common)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(SPLIT_SEED))
    held_out = order[:held].sort().values if held else order  # a single image: evaluated on itself
    train = order[held:][: data_cfg.num_train].sort().values

    def part(rows):
        return images.subset(rows), None if labels is None else labels[rows]
    eval_rows, eval_labels = part(held_out)
    return part(train), (eval_rows.read_all(), eval_labels)
