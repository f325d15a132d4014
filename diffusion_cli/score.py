"""diffusion-eval: the metrics of a set of images (a sample run, a folder) against a reference (a
folder, a built-in set, cached features), written to the command's run dir. fidelity.py holds the
extractors and the math; this module reads the images and caches the reference's features."""

import hashlib
import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_write
from .cli import console_script, run_task
from .data import load_data
from .data.folder import decode, scan
from .data.rows import cache_dir
from .errors import UserError
from .fidelity import EXTRACTORS, FID_BIASED_BELOW, as_uint8, chosen, extractor, features, metrics
from .models.pretrained import fingerprint
from .runtime import resolve_device

log = logging.getLogger(__name__)

BUILT_IN = ("mnist", "fashion_mnist", "cifar10", "gradients")  # reference=NAME: that data set's training images


def read_images(spec: str, size: int | None, limit: int | None, cfg: DictConfig) -> tuple[torch.Tensor, str, dict]:
    """(uint8 images, a description, what they are for the cache key) of `spec`: a built-in data
    set's name (its first training images), a diffusion-sample run dir (its images/, else
    samples.pt), or a folder of images (resized by the shorter side to `size` and center-cropped;
    samples, `size` None: at the first one's size)."""
    if spec in BUILT_IN:
        from hydra import compose  # the data group as diffusion-train composes it (its root, its shape)
        data = compose(config_name="train", overrides=[f"data={spec}"]).data
        train, _ = load_data(data)
        rows = chosen(len(train.images), limit, cfg.seed)
        identity = {"data": OmegaConf.to_container(data, resolve=True), "rows": [len(rows), cfg.seed]}
        return as_uint8(train.images[rows]), f"data={spec} ({len(rows):,} of its training images)", identity
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{spec} is neither a folder, a run dir nor a built-in data set ({', '.join(BUILT_IN)})")
    if (path / "samples.pt").is_file() and not (path / "images").is_dir():
        images = torch.load(path / "samples.pt", weights_only=True)
        images = images[chosen(len(images), limit, cfg.seed)]
        return as_uint8(images), f"{path / 'samples.pt'}", {"file": str(path.resolve()), **stat_of(path / "samples.pt")}
    folder = path / "images" if (path / "images").is_dir() else path
    _, files, _ = scan(OmegaConf.create({"path": str(folder), "labels": "none"}))
    files = [files[i] for i in chosen(len(files), limit, cfg.seed)]
    if size is None:  # samples: at their own size
        from PIL import Image
        with Image.open(files[0]) as first:
            size = min(first.size)
    images = [decode(file, size, 3) for file in files]
    kept = [image for image in images if image is not None]
    if not kept:
        raise UserError(f"{spec}: none of its {len(files)} image files could be decoded")
    key = {"folder": str(folder.resolve()), "size": size, "files": [[str(f), *stat_of(f).values()] for f in files]}
    return torch.stack(kept), f"{folder} ({len(kept)} images)", key


def stat_of(path: Path) -> dict:
    info = path.stat()
    return {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns}


def reference_features(cfg: DictConfig, model, layer: str, weights_id: str, size: int, device) -> tuple[torch.Tensor, str]:
    """The reference's features, from the cache when its key is there; (features, description)."""
    path = Path(cfg.reference).expanduser()
    if path.suffix == ".pt" and path.is_file():  # a features file this command wrote
        saved = torch.load(path, weights_only=True)
        if saved["extractor"] != [cfg.extractor, weights_id]:
            raise UserError(f"reference={cfg.reference} holds {saved['extractor'][0]} features of other weights: "
                            f"use extractor={saved['extractor'][0]} with those weights, or another reference")
        return saved["features"], f"{path} ({len(saved['features'])} images' cached features)"
    images, description, identity = read_images(cfg.reference, size, cfg.max_reference, cfg)
    key = hashlib.sha256(json.dumps({"reference": identity, "extractor": cfg.extractor, "weights": weights_id,
                                     "resize": EXTRACTORS[cfg.extractor][2], "size": size, "count": len(images)},
                                    sort_keys=True).encode()).hexdigest()[:20]
    cached = cache_dir() / "fidelity" / f"{key}.pt"
    log.info(f"reference: {description}; cache key {key}")
    if cached.is_file():
        log.info(f"reference features read from {cached}")
        return torch.load(cached, weights_only=True)["features"], description
    found = features(model, layer, images, cfg.batch_size, device)
    with atomic_write(cached, "wb") as file:
        torch.save({"features": found, "extractor": [cfg.extractor, weights_id], "reference": description}, file)
    log.info(f"reference features cached in {cached} (give it as reference=PATH to reuse them anywhere)")
    return found, description


def evaluate_sets(cfg: DictConfig, run_dir: Path) -> dict:
    """diffusion-eval's job: the metrics of cfg.samples against cfg.reference, printed with what they
    depend on and written to run_dir/eval.json."""
    device = resolve_device(cfg.device)
    model, layer = extractor(cfg, device)  # before any image is read: missing weights stop here
    weights_id = fingerprint(model)
    samples, description, _ = read_images(cfg.samples, None, cfg.max_samples, cfg)
    log.info(f"samples: {description}; extractor {cfg.extractor} (weights {weights_id}), "
             f"{EXTRACTORS[cfg.extractor][2]}")
    real, reference = reference_features(cfg, model, layer, weights_id, samples.shape[-1], device)
    generated = features(model, layer, samples, cfg.batch_size, device)
    result = metrics(generated, real, cfg)
    result.update(num_samples=len(generated), num_reference=len(real), extractor=cfg.extractor,
                  weights=weights_id, resize=EXTRACTORS[cfg.extractor][2], samples=description, reference=reference)
    log.info(f"FID {result['fid']:.3f}  KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f} "
             f"({cfg.kid_subsets} subsets of {result['kid_subset_size']})  precision {result['precision']:.4f}  "
             f"recall {result['recall']:.4f}  (N = {len(generated):,} samples vs {len(real):,} reference images)")
    if len(generated) < FID_BIASED_BELOW:
        log.warning(f"FID from {len(generated):,} samples is biased upward (it falls as N grows): compare runs at "
                    f"the same N, or by KID, which is unbiased")
    with atomic_write(run_dir / "eval.json") as file:
        file.write(json.dumps(result, indent=2))
    return {key: value for key, value in result.items() if isinstance(value, float)}


@hydra.main(version_base="1.3", config_path="pkg://diffusion_cli.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_task(evaluate_sets, cfg)


cli = console_script(main)

if __name__ == "__main__":
    cli()
