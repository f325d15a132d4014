"""diffusion-eval: FID, KID and precision/recall (Kynkäänniemi et al. 2019) between a set of images
and a reference, through torch-fidelity (the `eval` extra): its feature extractors (Inception-v3
as TF-FID has it; DINOv2 ViT-S/14, whose Fréchet distance Stein et al. 2023 recommend) or the
project's MNIST classifier, and its math. The reference's features are cached under a key of
everything they depend on (its images, the extractor and its weights, the resize rule, N), so a
stale cache can't be read: another key is another file."""

import contextlib
import hashlib
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hydra
import torch
from omegaconf import MISSING, DictConfig, OmegaConf

from .atomic import atomic_write
from .data import load_data
from .data.folder import decode, scan
from .data.rows import cache_dir
from .errors import UserError
from .models.pretrained import fingerprint, require
from .progress import tqdm
from .runtime import resolve_device
from .schema import check, one_of, positive

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity 0.4's download
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# extractor= -> (torch-fidelity's name, the feature layer, what resizes the images for it)
EXTRACTORS = {
    "inception": ("inception-v3-compat", "2048", "bilinear to 299x299 inside Inception (TF-FID's)"),
    "dinov2": ("dinov2-vit-s-14", "dinov2", "bicubic to 224x224 inside DINOv2"),
    "mnist": ("diffusion-cli-mnist", "features", "bilinear to 28x28 grayscale (the project's MNIST classifier)"),
}
BUILT_IN = ("mnist", "fashion_mnist", "cifar10", "gradients")  # reference=NAME: that data set's training images
FID_BIASED_BELOW = 2000  # FID's estimate is biased upward at small N (Binkowski et al. 2018): KID is not


def extractor(cfg: DictConfig, device: torch.device):
    """The feature extractor of extractor= on `device`, loaded before any image is read: weights
    that can't be had are one line naming the file and where it goes."""
    fidelity = require("torch_fidelity", "eval", "diffusion-eval")
    register_mnist(fidelity)
    name, layer, _ = EXTRACTORS[cfg.extractor]
    if cfg.extractor == "inception" and cfg.weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        hint = (f"extractor=inception needs {INCEPTION_FILE}: download it from {INCEPTION_URL} and give "
                f"weights=PATH, or put it in {cached.parent}")
    elif cfg.extractor == "dinov2":
        if cfg.weights is not None:
            raise UserError("extractor=dinov2 loads from torch.hub's cache only (torch-fidelity 0.4 takes no "
                            "weights file for it): leave weights out")
        hint = (f"extractor=dinov2 needs facebookresearch/dinov2 in torch.hub's cache ({torch.hub.get_dir()}): "
                f"run once with internet access, or copy that folder from a machine that has it")
    else:
        hint = f"weights={cfg.weights} could not be loaded as {name}'s weights"
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise UserError(f"weights={cfg.weights} is not a file: {hint}")
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):  # its download's notes
            warnings.simplefilter("ignore")
            model = fidelity.utils.create_feature_extractor(name, [layer], cuda=False, verbose=False,
                                                            feature_extractor_weights_path=cfg.weights)
    except Exception as error:  # offline downloads, wrong files: whatever the library raised
        raise UserError(f"{hint} ({type(error).__name__}: {str(error).splitlines()[0][:120] if str(error) else ''})") from None
    return model.to(device), layer


def register_mnist(fidelity) -> None:
    """The project's MNIST classifier as a torch-fidelity feature extractor: the same code path as
    Inception's, for data where Inception's features mean little (and offline, where its weights
    can't be had)."""
    from .classifier import Classifier

    if "diffusion-cli-mnist" in fidelity.registry.FEATURE_EXTRACTORS_REGISTRY:
        return

    class MnistFeatures(fidelity.feature_extractor_base.FeatureExtractorBase):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            from .classifier import load_classifier
            self.classifier = Classifier()
            entry = torch.load(feature_extractor_weights_path, map_location="cpu", weights_only=True) \
                if feature_extractor_weights_path else load_classifier(None, False)[1]
            self.classifier.load_state_dict(entry["model"])
            self.classifier.eval().requires_grad_(False)

        @staticmethod
        def get_provided_features_list():
            return ("features",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "features"

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, images):
            gray = images.float().mean(1, keepdim=True) / 255
            if gray.shape[-2:] != (28, 28):
                gray = torch.nn.functional.interpolate(gray, size=(28, 28), mode="bilinear", antialias=True)
            return (self.classifier.features(gray),)

    fidelity.register_feature_extractor("diffusion-cli-mnist", MnistFeatures)


class Images(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as torch-fidelity reads them (grayscale repeated to RGB)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        image = self.images[index]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def as_uint8(images: torch.Tensor) -> torch.Tensor:
    """Stored images (uint8, or floats in [0, 1]) as uint8 pixels."""
    return images if images.dtype == torch.uint8 else (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


def read_images(spec: str, size: int | None, limit: int | None, cfg: DictConfig) -> tuple[torch.Tensor, str, dict]:
    """(uint8 images, a description, what they are for the cache key) of `spec`: a built-in data
    set's name (its first training images), a diffusion-sample run dir (its images/, else
    samples.pt), or a folder of images (resized by the shorter side to `size` and center-cropped;
    samples, `size` None: at the first one's size)."""
    if spec in BUILT_IN:
        from hydra import compose  # the data group as diffusion-train composes it (its root, its shape)
        data = compose(config_name="train", overrides=[f"data={spec}"]).data
        train, _ = load_data(data)
        images = train.images[:limit] if limit else train.images
        identity = {"data": OmegaConf.to_container(data, resolve=True), "count": len(images)}
        return as_uint8(images), f"data={spec} (its first {len(images):,} training images)", identity
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"{spec} is neither a folder, a run dir nor a built-in data set ({', '.join(BUILT_IN)})")
    if (path / "samples.pt").is_file() and not (path / "images").is_dir():
        images = torch.load(path / "samples.pt", weights_only=True)[:limit]
        return as_uint8(images), f"{path / 'samples.pt'}", {"file": str(path.resolve()), **stat_of(path / "samples.pt")}
    folder = path / "images" if (path / "images").is_dir() else path
    _, files, _ = scan(OmegaConf.create({"path": str(folder), "labels": "none"}))
    files = files[:limit] if limit else files
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


@torch.no_grad()
def features(model, layer: str, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The extractor's features (N, D) of uint8 images, a batch at a time (with a progress bar)."""
    found = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                      disable=len(images) <= batch_size):
        batch = torch.stack([Images(images)[i] for i in range(start, min(start + batch_size, len(images)))])
        found.append(model.convert_features_tuple_to_dict(model(batch.to(device)))[layer].cpu())
    return torch.cat(found)


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


def metrics(generated: torch.Tensor, real: torch.Tensor, cfg: DictConfig) -> dict:
    """FID, KID (mean and std over subsets) and precision/recall of two feature sets, by
    torch-fidelity's functions (generated first, as it orders them)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    subset = min(cfg.kid_subset_size, len(generated), len(real))
    fid = fid_statistics_to_metric(fid_features_to_statistics(generated), fid_features_to_statistics(real), False)
    kid = kid_features_to_metric(generated, real, kid_subsets=cfg.kid_subsets, kid_subset_size=subset,
                                 rng_seed=cfg.seed, verbose=False)
    prc = prc_features_to_metric(generated, real, prc_neighborhood=cfg.prc_neighborhood, verbose=False)
    return {"fid": fid["frechet_inception_distance"], "kid_mean": kid["kernel_inception_distance_mean"],
            "kid_std": kid["kernel_inception_distance_std"], "precision": prc["precision"],
            "recall": prc["recall"], "kid_subset_size": subset}


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


@dataclass
class EvalConfig:
    """diffusion-eval's keys (conf/eval.yaml documents them)."""
    samples: str = MISSING
    reference: str = MISSING
    extractor: str = one_of(EXTRACTORS)
    weights: Optional[str] = None
    max_samples: Optional[int] = check(lambda v: v is None or v >= 2, "null (all) or an integer >= 2", None)
    max_reference: Optional[int] = check(lambda v: v is None or v >= 2, "null (all) or an integer >= 2", None)
    batch_size: int = positive()
    kid_subsets: int = positive()
    kid_subset_size: int = check(lambda v: v >= 2, "an integer >= 2", MISSING)
    prc_neighborhood: int = positive()
    seed: int = MISSING
    device: str = MISSING
    overwrite: bool = MISSING


@hydra.main(version_base="1.3", config_path="pkg://diffusion_cli.conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    from .cli import run_task  # cli.py imports config.py, which registers this module's schema
    run_task(evaluate_sets, cfg)


def cli() -> None:
    from .cli import console_script
    console_script(main)()

if __name__ == "__main__":
    cli()
