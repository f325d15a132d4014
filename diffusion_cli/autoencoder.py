"""The autoencoder stage of latent diffusion: what `diffusion-train task=autoencoder` measures and
keeps (the held-out loss and PSNR, reconstruction grids, the latent scale in every checkpoint), and
LatentSpace, the frozen autoencoder that a denoiser trains on and samples through."""

import hashlib
import json
import logging

import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from .atomic import atomic_write
from .data import Split, to_model_range
from .data.rows import RowFile, cache_dir
from .errors import UserError
from .images import save_grid, to_unit
from .models import image_shape
from .models.autoencoder import AutoencoderKL, kl_divergence, psnr, reconstruction_error
from .models.pretrained import DiffusersAutoencoder, fingerprint
from .runtime import eval_mode

log = logging.getLogger(__name__)


ARCHITECTURE = ("base_channels", "channel_mults", "num_res_blocks", "z_channels")


def build_autoencoder(ae_cfg, data_cfg) -> AutoencoderKL:
    """The autoencoder of the `autoencoder` config (its ARCHITECTURE keys) for the data's images."""
    ae_cfg = OmegaConf.to_container(ae_cfg, resolve=True) if OmegaConf.is_config(ae_cfg) else ae_cfg
    options = {key: ae_cfg[key] for key in ARCHITECTURE}
    try:
        return AutoencoderKL((data_cfg.channels, data_cfg.height, data_cfg.width), **options)
    except ValueError as error:
        raise UserError(str(error)) from None


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


class LatentSpace:
    """An autoencoder (trained here, or pretrained), frozen, with its latent scale and shift:
    encode() takes images in [-1, 1] to the denoiser's latents, (posterior mean - shift) x scale;
    decode() takes them back. Decoding runs in fp32 or bf16, never fp16 (where the decoder's
    activations overflow to NaN). state() is what a denoiser's checkpoint embeds, so that it
    samples without the autoencoder's run dir."""

    def __init__(self, model: AutoencoderKL, config: dict, image_shape: tuple, latent: dict, source: str):
        self.model = model.eval().requires_grad_(False)
        self.config, self.image_shape, self.latent, self.source = config, tuple(image_shape), latent, source
        device = next(model.parameters()).device
        self.scale = latent["scale"]
        self.shift = torch.tensor(latent["shift"], device=device)[None, :, None, None]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(images.device.type, enabled=False):
            return (self.model.encode(images.float())[0] - self.shift) * self.scale

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (not clamped); in bf16 under a bf16 autocast, else in fp32."""
        device = latents.device.type
        bf16 = torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.bfloat16
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return self.model.decode(latents.float() / self.scale + self.shift).float()

    def state(self) -> dict:
        """The LatentSpace whole; a pretrained autoencoder's weights are left out (its config keeps
        where they came from and their fingerprint)."""
        weights = {} if self.config["kind"] == "diffusers" else {"model": self.model.state_dict()}
        return {"config": self.config, "image_shape": list(self.image_shape), "latent_shape": list(self.shape),
                "latent": self.latent, "source": self.source, **weights}

    @classmethod
    def from_state(cls, state: dict, device="cpu") -> "LatentSpace":
        if state["config"]["kind"] == "diffusers":
            config = state["config"]
            return pretrained_latent_space(config["path"], config["subfolder"], state["image_shape"], device,
                                           expected=config["fingerprint"])
        channels, height, width = state["image_shape"]
        model = build_autoencoder(state["config"], OmegaConf.create(
            {"channels": channels, "height": height, "width": width}))
        model.load_state_dict(state["model"])
        return cls(model.to(device), state["config"], state["image_shape"], state["latent"], state["source"])


def latent_diffusion(cfg) -> bool:
    """Whether a run's denoiser learns latents: of a task=autoencoder run (autoencoder.ckpt) or of a
    pretrained diffusers autoencoder (autoencoder=diffusers)."""
    return cfg.get("task", "diffusion") == "diffusion" and (
        cfg.autoencoder.kind == "diffusers" or cfg.autoencoder.get("ckpt") is not None)


def frozen_autoencoder(cfg, device="cpu") -> LatentSpace:
    """The LatentSpace of a latent_diffusion() run's `autoencoder` config."""
    if cfg.autoencoder.kind == "diffusers":
        return pretrained_latent_space(cfg.autoencoder.path, cfg.autoencoder.subfolder, image_shape(cfg.data), device)
    from .checkpoint import load_autoencoder

    return load_autoencoder(cfg.autoencoder.ckpt, device)


def pretrained_latent_space(path: str, subfolder: str | None, shape, device="cpu",
                            expected: str | None = None) -> LatentSpace:
    """autoencoder=diffusers: the pretrained AutoencoderKL at `path` with its own scale and shift;
    `expected`, the fingerprint of the weights a checkpoint was trained with, must match."""
    model = DiffusersAutoencoder(path, subfolder, tuple(shape))
    config = {"kind": "diffusers", "path": path, "subfolder": subfolder, "fingerprint": model.fingerprint}
    if expected is not None and expected != config["fingerprint"]:
        raise UserError(f"autoencoder.path={path} holds other weights than the autoencoder this model was "
                        f"trained with: give the same diffusers AutoencoderKL")
    latent = {"scale": model.scale, "shift": [model.shift] * model.latent_shape[0]}
    return LatentSpace(model.to(device), config, model.image_shape, latent, source=path)


def encode_all(latents: LatentSpace, images: torch.Tensor | RowFile, batch_size: int, stored: bool = True,
               progress: bool = False) -> torch.Tensor:
    """The latents of images on the CPU: stored ones (uint8, floats in [0, 1], a RowFile), or with
    stored=False floats in [-1, 1] (as load_data gives the held-out split)."""
    device = next(latents.model.parameters()).device
    count = len(images)
    chunks = []
    for start in tqdm(range(0, count, batch_size), desc="encoding latents (once)", unit="batch",
                      disable=not progress, dynamic_ncols=True):
        if isinstance(images, RowFile):
            chunk = to_model_range(images.subset(images.rows[start:start + batch_size]).read_all())
        else:
            chunk = images[start:start + batch_size]
            chunk = to_model_range(chunk) if stored else chunk
        chunks.append(latents.encode(chunk.to(device)).cpu())
    return torch.cat(chunks)


def cached_latents(latents: LatentSpace, split: Split, batch_size: int) -> Split:
    """autoencoder.cache_latents: the training split with its images encoded once, kept in the
    cache ($DIFFUSION_CLI_CACHE/latents, beside the images) under a key of the autoencoder's
    weights and scale and the images, so that later runs on them skip the encoder."""
    digest = hashlib.sha256((json.dumps(latents.latent, sort_keys=True) + fingerprint(latents.model)).encode())
    images = split.images
    if isinstance(images, RowFile):
        digest.update(str(images.path).encode() + images.rows.numpy().tobytes())
    else:
        digest.update(images.contiguous().numpy().tobytes())
    path = cache_dir() / "latents" / f"{digest.hexdigest()[:20]}.pt"
    if path.is_file():
        log.info(f"cached latents: {path}")
        return split._replace(images=torch.load(path, weights_only=True))
    encoded = encode_all(latents, images, batch_size, progress=True)
    with atomic_write(path, "wb") as file:
        torch.save(encoded, file)
    log.info(f"encoded {len(encoded):,} training images once into {path}")
    return split._replace(images=encoded)
