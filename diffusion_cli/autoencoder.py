"""The autoencoder stage of latent diffusion: what `diffusion-train task=autoencoder` measures and
keeps (the held-out loss and PSNR, reconstruction grids, the latent scale in every checkpoint). The
frozen autoencoder that a denoiser trains on and samples through is spaces.LatentSpace."""

from dataclasses import dataclass
from typing import List, Optional

import torch
from omegaconf import MISSING, OmegaConf

from .data import Split, to_model_range
from .data.rows import RowFile
from .errors import UserError
from .schema import check, levels, non_negative, one_of, positive
from .images import save_grid, to_unit
from .models.autoencoder import AutoencoderKL, kl_divergence, perceptual_distance, psnr, reconstruction_error
from .runtime import eval_mode


ARCHITECTURE = ("base_channels", "channel_mults", "num_res_blocks", "z_channels")


def build_autoencoder(ae_cfg, data_cfg) -> AutoencoderKL:
    """The autoencoder of the `autoencoder` config (its ARCHITECTURE keys) for the data's images."""
    ae_cfg = OmegaConf.to_container(ae_cfg, resolve=True) if OmegaConf.is_config(ae_cfg) else ae_cfg
    options = {key: ae_cfg[key] for key in ARCHITECTURE}
    try:
        return AutoencoderKL((data_cfg.channels, data_cfg.height, data_cfg.width), **options)
    except ValueError as error:
        raise UserError(str(error)) from None


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


def first_images(split: Split, count: int) -> torch.Tensor:
    """The first `count` images of a training split as floats in [-1, 1]."""
    images = split.images
    head = images.subset(images.rows[:count]).read_all() if isinstance(images, RowFile) else images[:count]
    return to_model_range(head)


@torch.inference_mode()
def encode_means(model: AutoencoderKL, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The posterior means of images in [-1, 1], on the model's device."""
    device = next(model.parameters()).device
    with eval_mode(model):
        return torch.cat([model.encode(chunk.to(device))[0] for chunk in images.split(batch_size)])


def latent_statistics(model: AutoencoderKL, images: torch.Tensor, shift: bool, batch_size: int) -> dict:
    """The latent scale (Rombach et al. 2022, section 4.3 and G): 1 / the std of the encoded
    training images' latents (after subtracting each channel's mean, with `shift`), so that the
    denoiser sees latents of unit variance, as its noise schedule assumes."""
    latents = encode_means(model, images, batch_size).float()
    means = latents.mean((0, 2, 3)) if shift else torch.zeros(latents.shape[1], device=latents.device)
    std = (latents - means[None, :, None, None]).std().item()
    return {"scale": 1.0 / std, "shift": means.tolist(), "std": std, "images": len(images)}


class ReconstructionEvaluator:
    """task=autoencoder's periodic work on held-out images: the loss with the posterior mean
    (eval_loss) and the PSNR of the reconstructions, the latent scale's effect on them
    (latent_scaled_std, the aim being 1), and grids of originals over reconstructions."""

    def __init__(self, data: Split, cfg):
        self.images, self.cfg = data.images, cfg

    @torch.inference_mode()
    def measure(self, model: AutoencoderKL, latent: dict | None) -> dict:
        ae, batch_size = self.cfg.autoencoder, self.cfg.trainer.batch_size
        device = next(model.parameters()).device
        losses, ratios, latents = [], [], []
        with eval_mode(model):
            for chunk in self.images.split(batch_size):
                chunk = chunk.to(device)
                mean, log_variance = model.encode(chunk)
                decoded = model.decode(mean)
                losses.append((reconstruction_error(chunk, decoded, ae.loss) + ae.kl_weight * kl_divergence(mean, log_variance)).cpu())
                ratios.append(psnr(chunk, decoded).cpu())
                latents.append(mean.float().cpu())
        record = {"eval_loss": torch.cat(losses).mean().item() / self.images[0].numel(),
                  "psnr": torch.cat(ratios).mean().item()}
        if latent is not None:
            shift = torch.tensor(latent["shift"])[None, :, None, None]
            record.update(latent_scale=latent["scale"],
                          latent_scaled_std=((torch.cat(latents) - shift) * latent["scale"]).std().item())
        return record

    @torch.inference_mode()
    def grid(self, model: AutoencoderKL, path, count: int = 8):
        shown = self.images[:count].to(next(model.parameters()).device)
        with eval_mode(model):
            decoded = model.decode(model.encode(shown)[0]).clamp(-1, 1)
        return save_grid(to_unit(torch.cat([shown, decoded])), path, nrow=len(shown),
                         row_titles=["original", "decoded"])


def psnr_line(result: dict) -> str:
    scaled = f", scaled latents' std {result['latent_scaled_std']:.3f}" if "latent_scaled_std" in result else ""
    return f"held-out PSNR {result['psnr']:.2f} dB{scaled}"


# The config group's schema (conf/ holds the values and their docs).
AUTOENCODER_KINDS = ("kl", "diffusers")  # trained here with task=autoencoder; pretrained (spaces.py)


@dataclass
class AutoencoderConfig:
    kind: str = one_of(AUTOENCODER_KINDS)
    base_channels: int = positive()
    channel_mults: List[int] = levels()
    num_res_blocks: int = positive()
    z_channels: int = positive()
    loss: str = one_of(("l1", "l2"))
    kl_weight: float = non_negative("a number >= 0, e.g. 1e-6")
    shift: bool = MISSING
    perceptual_weight: float = check(lambda v: v >= 0, "a number >= 0 (0: no LPIPS term; Rombach et al.: 1)", 0.0)
    scale_images: int = positive()
    ckpt: Optional[str] = MISSING
    cache_latents: bool = MISSING


@dataclass
class DiffusersAutoencoderConfig:
    kind: str = one_of(AUTOENCODER_KINDS)
    path: Optional[str] = MISSING
    subfolder: Optional[str] = MISSING
    cache_latents: bool = MISSING
