"""FID, KID and precision/recall (Kynkäänniemi et al. 2019) of two image sets through torch-fidelity
(the `eval` extra): its feature extractors (Inception-v3 as TF-FID has it; DINOv2 ViT-S/14, whose
Fréchet distance Stein et al. 2023 recommend) or the project's MNIST classifier registered as one of
them, and its math. diffusion-eval (score.py) is the command around it."""

import contextlib
import importlib.resources
import importlib.util
import io
import logging
import warnings
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .data.rows import RowFile
from .errors import UserError
from .metrics import quality_metric
from .models.pretrained import fingerprint, require
from .progress import tqdm

log = logging.getLogger(__name__)

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity 0.4's download
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
# extractor= -> (torch-fidelity's name, the feature layer, what resizes the images for it)
EXTRACTORS = {
    "inception": ("inception-v3-compat", "2048", "bilinear to 299x299 inside Inception (TF-FID's)"),
    "dinov2": ("dinov2-vit-s-14", "dinov2", "bicubic to 224x224 inside DINOv2"),
    "mnist": ("diffusion-cli-mnist", "features", "bilinear to 28x28 grayscale (the project's MNIST classifier)"),
}
FID_BIASED_BELOW = 2000  # FID's estimate is biased upward at small N (Binkowski et al. 2018): KID is not


def extractor(cfg: DictConfig, device: torch.device, key: str = "weights"):
    """The feature extractor of extractor= on `device`, loaded before any image is read: weights
    that can't be had are one line naming the file and where it goes (and the `key` that gives it)."""
    fidelity = require("torch_fidelity", "eval", "diffusion-eval")
    register_mnist(fidelity)
    name, layer, _ = EXTRACTORS[cfg.extractor]
    if cfg.extractor == "inception" and cfg.weights is None:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
        hint = (f"extractor=inception needs {INCEPTION_FILE}: download it from {INCEPTION_URL} and give "
                f"{key}=PATH, or put it in {cached.parent}")
    elif cfg.extractor == "dinov2":
        if cfg.weights is not None:
            raise UserError(f"extractor=dinov2 loads from torch.hub's cache only (torch-fidelity 0.4 takes no "
                            f"weights file for it): leave {key} out")
        hint = (f"extractor=dinov2 needs facebookresearch/dinov2 in torch.hub's cache ({torch.hub.get_dir()}): "
                f"run once with internet access, or copy that folder from a machine that has it")
    else:
        hint = f"{key}={cfg.weights} could not be loaded as {name}'s weights"
    if cfg.weights is not None and not Path(cfg.weights).is_file():
        raise UserError(f"{key}={cfg.weights} is not a file: {hint}")
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


@torch.no_grad()
def features(model, layer: str, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """The extractor's features (N, D) of uint8 images, a batch at a time (with a progress bar)."""
    found, dataset = [], Images(images)
    for start in tqdm(range(0, len(images), batch_size), desc="features", unit="batch",
                      disable=len(images) <= batch_size):
        batch = torch.stack([dataset[i] for i in range(start, min(start + batch_size, len(images)))])
        found.append(model.convert_features_tuple_to_dict(model(batch.to(device)))[layer].cpu())
    return torch.cat(found)


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


def chosen(count: int, limit: int | None, seed: int) -> torch.Tensor:
    """Which of `count` images to read: all, or `limit` of them drawn with `seed` (in order): a set's
    first images can be one kind of its images (MNIST's are grouped by writer)."""
    if not limit or limit >= count:
        return torch.arange(count)
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:limit].sort().values


def training_extractor(tc: DictConfig, data_cfg: DictConfig) -> str | None:
    """The extractor of training's FID/KID (None: none): trainer.quality_extractor, where `auto` is
    inception on data without an in-project metric (folders) when the eval extra and Inception's
    weights (trainer.quality_weights, or torch.hub's cache) are here."""
    if not tc.num_quality_images or tc.quality_extractor == "none":
        return None
    if tc.quality_extractor != "auto":
        return tc.quality_extractor
    weights = tc.quality_weights or Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    found = importlib.util.find_spec("torch_fidelity") is not None and Path(weights).is_file()
    return "inception" if quality_metric(data_cfg) is None and found else None


def without_fidelity(data_cfg: DictConfig) -> str:
    """Why a run on data without an in-project metric measures no sample quality, and what would."""
    return (f"quality: data={data_cfg.kind} has no in-project metric, and FID/KID during training need "
            f"pip install 'diffusion-cli[eval]' and {INCEPTION_FILE} (trainer.quality_weights=PATH, or "
            f"torch.hub's cache): none this run (diffusion-eval measures samples afterwards)")


class Fidelity:
    """Training's FID, KID and precision/recall: diffusion-eval's extractor and math, on the quality
    images against as many training images (drawn with the run's seed; their features computed once).
    N is small (trainer.num_quality_images): FID is biased upward there, so compare runs at one N."""

    def __init__(self, name: str, weights: str | None, train_images, count: int, seed: int, device: torch.device):
        settings = OmegaConf.create(importlib.resources.files("diffusion_cli.conf").joinpath("eval.yaml").read_text())
        self.cfg = OmegaConf.create({key: settings[key] for key in
                                     ("batch_size", "kid_subsets", "kid_subset_size", "prc_neighborhood")})
        self.cfg.update(extractor=name, weights=weights, seed=seed)
        self.model, self.layer = extractor(self.cfg, device, "trainer.quality_weights")
        self.device = device
        rows = chosen(len(train_images), count, seed)
        real = train_images.subset(rows).read_all() if isinstance(train_images, RowFile) else train_images[rows]
        self.real = features(self.model, self.layer, as_uint8(real), self.cfg.batch_size, device)
        self.label = f"{name} features (weights {fingerprint(self.model)}) vs {len(rows):,} training images"

    def __call__(self, images: torch.Tensor) -> dict:
        """The metrics of samples in [0, 1] (FIDELITY_KEYS)."""
        generated = features(self.model, self.layer, as_uint8(images), self.cfg.batch_size, self.device)
        result = metrics(generated, self.real, self.cfg)
        del result["kid_subset_size"]
        return result
