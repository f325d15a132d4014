"""The training objectives. The denoiser's (Ho et al. 2020): draw one timestep t per sample
(uniformly, or as the schedule says) and noise eps, form x_t = q_sample(x0, t, eps), and regress
the model's output on its target (eps, x0 or v, as model.prediction says) with an MSE loss,
optionally min-SNR weighted. The autoencoder's: reconstruction plus a small KL term."""

import torch

from .models.autoencoder import kl_divergence, perceptual_distance, reconstruction_error
from .schedule import NoiseSchedule

MIN_SNR_GAMMA = 5.0


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, weighting: str
                ) -> torch.Tensor:
    """Per-sample loss weights. min_snr (Hang et al. 2023): min(SNR, gamma) / SNR for eps, carried
    over to the other objectives as min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0."""
    if weighting == "none":
        return torch.ones(t.shape, device=t.device)
    snr = schedule.snr[t]
    clipped = snr.clamp(max=MIN_SNR_GAMMA)
    return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]


def training_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator,
                  labels: torch.Tensor | None = None, cond_drop_prob: float = 0.0,
                  loss_weighting: str = "none", *, prediction: str | None = None,
                  num_classes: int | None = None, null: torch.Tensor | None = None) -> torch.Tensor:
    """The loss on a batch: the MSE between the model's output and its target, per sample
    weighted. A conditional model sees the unconditional input `null` (default: the null label,
    index num_classes; for captions the empty caption's tokens) with probability cond_drop_prob,
    which trains the unconditional model that guidance needs. `prediction` and `num_classes`
    default to the model's own attributes (a DDP wrapper has none: pass them)."""
    prediction = prediction or model.prediction
    t = schedule.training_timesteps(x0.shape[0], generator, x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    if labels is not None:
        if null is None:
            null = torch.tensor(model.num_classes if num_classes is None else num_classes, device=x0.device)
        dropped = torch.rand(labels.shape[:1], generator=generator, device=x0.device) < cond_drop_prob
        labels = torch.where(dropped.view(-1, *[1] * (labels.dim() - 1)), null, labels)
    output = model(schedule.q_sample(x0, t, noise), t, labels)
    errors = (output - schedule.target(x0, t, noise, prediction)).pow(2).flatten(1).mean(1)
    return (loss_weight(schedule, t, prediction, loss_weighting) * errors).mean()


def autoencoder_loss(model, images: torch.Tensor, generator: torch.Generator, reconstruction: str = "l1",
                     kl_weight: float = 1e-6, lpips: torch.nn.Module | None = None,
                     perceptual_weight: float = 0.0) -> torch.Tensor:
    """The KL autoencoder's loss on a batch (Rombach et al. 2022, without the GAN): the L1 or L2
    reconstruction error of a latent drawn from the posterior, with `lpips` perceptual_weight x
    the LPIPS distance added at every pixel as theirs does, plus kl_weight x the KL divergence
    from N(0, I); all summed per image as in the paper, then divided by the pixels per image so
    that the learning rate does not depend on the image size."""
    decoded, mean, log_variance = model(images, generator)
    per_image = reconstruction_error(images, decoded, reconstruction) + kl_weight * kl_divergence(mean, log_variance)
    if lpips is not None:
        per_image = per_image + perceptual_weight * images[0].numel() * perceptual_distance(lpips, images, decoded)
    return per_image.mean() / images[0].numel()
