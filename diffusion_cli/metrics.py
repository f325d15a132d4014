"""Sample quality measured inside the project."""

import torch

from .classifier import load_classifier
from .models import pretrained
from .data import DATASETS, gradient_grid

# A sample counts as a valid gradient when its residual RMS (in [0, 1] units) is below VALID_RMS
# and its fitted colors lie within [-COLOR_SLACK, 1 + COLOR_SLACK]: a gradient that overshoots the
# data's color range (and is clipped there) is not one of the data's.
VALID_RMS = 0.02
COLOR_SLACK = 0.02


def gradient_fit(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every image, per channel, by least squares to a + g (b - a), g the generators' fixed grid.

    images: (N, C, H, W) in [0, 1]. Returns (residual RMS per image (N,), fitted colors (N, C, 2)).
    """
    n, channels, height, width = images.shape
    g = gradient_grid(height, width).flatten()
    design = torch.stack([1 - g, g], dim=1)                       # (HW, 2): a (1-g) + b g
    targets = images.double().reshape(n * channels, -1).T         # (HW, N*C)
    colors = torch.linalg.pinv(design) @ targets                  # (2, N*C): least squares
    residual = (design @ colors - targets).reshape(-1, n, channels)
    rms = residual.pow(2).mean(dim=(0, 2)).sqrt()
    return rms.float(), colors.T.reshape(n, channels, 2).float()


def gradient_quality(images: torch.Tensor) -> dict[str, float]:
    """How close samples in [0, 1] are to the gradient data.

    rms: mean residual RMS of the per-channel fit (0 = perfect gradients);
    valid_frac: fraction of samples with residual RMS < VALID_RMS and every fitted color within
    COLOR_SLACK of [0, 1];
    clipped_frac: fraction of samples with a pixel at exactly 0 or 1 (where the sampler clips; the
    data has them only where a color is exactly 0 or 255: about 5% of images);
    color_std: spread of the fitted colors (the data's, uniform on [0, 1], is 0.289);
    color_ks: Kolmogorov-Smirnov distance between the fitted colors and Uniform[0, 1], the data's
    distribution (0 = the same spread; a model that paints few color pairs scores high).
    """
    images = images.cpu()
    rms, colors = gradient_fit(images)
    in_range = ((colors >= -COLOR_SLACK) & (colors <= 1 + COLOR_SLACK)).flatten(1).all(1)
    clipped = ((images == 0) | (images == 1)).flatten(1).any(1)
    values = colors.flatten().clamp(0, 1).sort().values
    n = len(values)
    below = torch.arange(1, n + 1) / n                      # empirical CDF just after each value
    ks = torch.maximum(below - values, values - (below - 1 / n)).max()
    return {
        "rms": rms.mean().item(),
        "valid_frac": ((rms < VALID_RMS) & in_range).float().mean().item(),
        "clipped_frac": clipped.float().mean().item(),
        "color_std": values.std().item(),
        "color_ks": ks.item(),
    }


# A sample counts as confidently classified when the classifier's top probability is above this.
CONFIDENT = 0.9


def frechet_distance(mean1: torch.Tensor, cov1: torch.Tensor, mean2: torch.Tensor, cov2: torch.Tensor
                     ) -> float:
    """||m1 - m2||^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the Fréchet distance between two Gaussians.
    Tr((C1 C2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of the
    symmetric S C2 S, S = C1^(1/2), in float64."""
    mean1, cov1, mean2, cov2 = (v.double() for v in (mean1, cov1, mean2, cov2))
    values, vectors = torch.linalg.eigh(cov1)
    root1 = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    return ((mean1 - mean2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * cross).item()


@torch.no_grad()
def mnist_quality(images: torch.Tensor, classifier, reference: dict,
                  labels: torch.Tensor | None = None) -> dict[str, float]:
    """How MNIST-like samples in [0, 1] (N, 1, 28, 28) are, by the project's classifier.

    classifier_fd: Fréchet distance between the classifier's penultimate features of the samples
    and of the MNIST test set (lower is better; not Inception FID);
    confident_frac: fraction of samples whose top class probability is above CONFIDENT;
    class_entropy: entropy in bits of the histogram of predicted classes (log2(10) = 3.32 for
    balanced classes; lower means some digits are missing: mode collapse);
    label_accuracy (with `labels`, the classes asked for): fraction classified as asked, overall
    and, as label_accuracy_by_class, for each class asked for.
    """
    images = images.cpu()
    features = torch.cat([classifier.features(chunk) for chunk in images.split(500)]).double()
    probabilities = torch.cat([classifier.head(chunk.float()).softmax(1) for chunk in features.split(500)])
    confidence, predicted = probabilities.max(1)
    histogram = torch.bincount(predicted, minlength=10).double() / len(predicted)
    nonzero = histogram[histogram > 0]
    result = {
        "classifier_fd": frechet_distance(features.mean(0), features.T.cov(), reference["test_mean"],
                                          reference["test_cov"]),
        "confident_frac": (confidence > CONFIDENT).double().mean().item(),
        "class_entropy": -(nonzero * nonzero.log2()).sum().item(),
    }
    if labels is not None:
        correct = (predicted == labels.cpu()).double()
        result["label_accuracy"] = correct.mean().item()
        result["label_accuracy_by_class"] = {int(k): correct[labels.cpu() == k].mean().item()
                                             for k in labels.unique()}
    return result


def clip_score(images: torch.Tensor, prompts: list[str], path: str) -> float:
    """CLIP score (Hessel et al. 2021, as torchmetrics has it): the mean over images of
    100 * max(0, cos(image embedding, its prompt's embedding)), by the whole CLIP model at `path`."""
    return (100 * clip_cosines(images, prompts, path).clamp(min=0)).mean().item()


@torch.no_grad()
def clip_cosines(images: torch.Tensor, prompts: list[str], path: str) -> torch.Tensor:
    """Each image's cosine with its prompt in CLIP's embedding space; images in [0, 1] are resized
    by the shorter side (bicubic) to CLIP's input size and center-cropped, as CLIP's processor does."""
    model, tokenizer, mean, std = pretrained.clip_pair(path)
    size = model.config.vision_config.image_size
    pixels = torch.nn.functional.interpolate(images.float().cpu().expand(-1, 3, -1, -1), scale_factor=size / min(
        images.shape[-2:]), mode="bicubic", antialias=True).clamp(0, 1)
    top, left = (pixels.shape[-2] - size) // 2, (pixels.shape[-1] - size) // 2
    pixels = (pixels[..., top:top + size, left:left + size] - mean[:, None, None]) / std[:, None, None]
    cosines = []
    for start in range(0, len(images), 64):
        text = tokenizer(prompts[start:start + 64], padding=True, truncation=True, return_tensors="pt")
        out = model(pixel_values=pixels[start:start + 64], **text)  # both embeddings, unit length
        cosines.append((out.image_embeds * out.text_embeds).sum(1))
    return torch.cat(cosines)


# The metrics each quality metric returns, in the order logs show them (label_accuracy: for a
# class-conditional model); FID/KID (fidelity.py) and CLIP score (for prompts) where a run has them.
GRADIENT_KEYS = ("rms", "valid_frac", "clipped_frac", "color_std", "color_ks")
CLASSIFIER_KEYS = ("classifier_fd", "confident_frac", "class_entropy", "label_accuracy")
FIDELITY_KEYS = ("fid", "kid_mean", "kid_std", "precision", "recall")
QUALITY_KEYS = GRADIENT_KEYS + CLASSIFIER_KEYS + FIDELITY_KEYS + ("clip_score",)


def classifier_quality(images: torch.Tensor, data_cfg, labels: torch.Tensor | None = None) -> dict:
    classifier, reference = load_classifier(data_cfg.root, data_cfg.download)
    return mnist_quality(images, classifier, reference, labels)


# The metrics the dataset registry (data.DATASETS) names.
QUALITY_METRICS = {
    "gradients": lambda images, data_cfg, labels: gradient_quality(images),
    "mnist_classifier": classifier_quality,
}


def quality_metric(data_cfg):
    """The in-project quality metric of the data's kind, or None (FID tools take over: see docs/guide/sampling.md)."""
    return QUALITY_METRICS.get(DATASETS[data_cfg.kind].quality)


def quality_keys(data_cfg) -> tuple[str, ...]:
    """The metrics quality_metric(data_cfg) returns (none without one)."""
    return {"gradients": GRADIENT_KEYS, "mnist_classifier": CLASSIFIER_KEYS}.get(DATASETS[data_cfg.kind].quality, ())


def sample_quality(images: torch.Tensor, data_cfg, labels: torch.Tensor | None = None) -> dict[str, float]:
    """The quality metrics of samples in [0, 1] of the `data` config group's kind ({} where it has
    none); `labels` are the classes a class-conditional model was asked for."""
    metric = quality_metric(data_cfg)
    return metric(images, data_cfg, labels) if metric else {}
