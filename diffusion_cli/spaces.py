"""Where the denoiser works: the data's pixels, or the latents of a frozen autoencoder (latent
diffusion, Rombach et al. 2022: one trained here with task=autoencoder, or a pretrained diffusers
AutoencoderKL). Both have one interface: `shape` (the denoiser's input), `clip` (whether x0
estimates and samples are clipped to [-1, 1]: images yes, latents no), `encode` and `decode` a
batch, `held_out` (the eval images in the space), `training` (the training split and how each batch
enters the space), and `state` for the checkpoint. A run carries one space; nothing outside this
module asks which."""

import hashlib
import json
import logging
from typing import Callable, NamedTuple

import torch
from omegaconf import OmegaConf

from . import checkpoint
from .atomic import atomic_write
from .autoencoder import build_autoencoder
from .conditions import moved_text_encoder
from .data import Split, to_model_range
from .data.rows import RowFile, cache_dir
from .errors import UserError
from .models import image_shape, size_factor
from .models.autoencoder import AutoencoderKL
from .models.pretrained import DiffusersAutoencoder, fingerprint
from .progress import tqdm

log = logging.getLogger(__name__)


class Training(NamedTuple):
    """A training split as the denoiser learns it: its images (stored pixels, or latents encoded
    once), how a batch of them in [-1, 1] enters the space, and whether they are latents already."""
    split: Split
    encode: Callable[[torch.Tensor], torch.Tensor]
    encoded: bool


def unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


class PixelSpace:
    """The data's own images: nothing to encode or decode; clipped to [-1, 1]."""
    clip, label = True, None

    def __init__(self, shape):
        self.shape = tuple(shape)

    encode = decode = staticmethod(unchanged)

    def held_out(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        return images

    def training(self, split: Split, cfg) -> Training:
        return Training(split, unchanged, False)

    def state(self) -> None:
        return None


class LatentSpace:
    """An autoencoder (trained here, or pretrained), frozen, with its latent scale and shift:
    encode() takes images in [-1, 1] to the denoiser's latents, (posterior mean - shift) x scale;
    decode() takes them back. Decoding runs in fp32 or bf16, never fp16 (where the decoder's
    activations overflow to NaN). state() is what a denoiser's checkpoint embeds, so that it
    samples without the autoencoder's run dir. Latents are never clipped."""
    clip = False

    def __init__(self, model: AutoencoderKL, config: dict, image_shape: tuple, latent: dict, source: str):
        self.model = model.eval().requires_grad_(False)
        self.config, self.image_shape, self.latent, self.source = config, tuple(image_shape), latent, source
        device = next(model.parameters()).device
        self.scale = latent["scale"]
        self.shift = torch.tensor(latent["shift"], device=device)[None, :, None, None]

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.shape))} latents"

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

    def held_out(self, images: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The held-out images (floats in [-1, 1]) as latents."""
        return encode_all(self, images, batch_size, stored=False)

    def training(self, split: Split, cfg) -> Training:
        """Encoded per batch, or with autoencoder.cache_latents once (and kept in the cache)."""
        if not cfg.autoencoder.cache_latents:
            return Training(split, self.encode, False)
        if cfg.data.hflip:
            log.warning("data.hflip is not applied to cached latents (autoencoder.cache_latents=true): "
                        "a flipped latent is not the latent of a flipped image")
        return Training(cached_latents(self, split, cfg.trainer.batch_size), unchanged, True)

    def describe(self, held_out: torch.Tensor) -> str:
        size = "x".join(map(str, self.image_shape))
        return (f"latent diffusion: {self.source} encodes {size} images to {self.label} (scale {self.scale:.4f}; "
                f"the scaled latents' std on {len(held_out)} held-out images: {held_out.std():.3f})")

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
            try:
                return pretrained_latent_space(config["path"], config["subfolder"], state["image_shape"], device,
                                               expected=config["fingerprint"])
            except UserError as error:  # a run from another machine, most often
                raise UserError(f"{error} (a run moved from another machine: autoencoder.path=DIR names where "
                                f"its weights are on this one)") from None
        channels, height, width = state["image_shape"]
        model = build_autoencoder(state["config"], OmegaConf.create(
            {"channels": channels, "height": height, "width": width}))
        model.load_state_dict(state["model"])
        return cls(model.to(device), state["config"], state["image_shape"], state["latent"], state["source"])


Space = PixelSpace | LatentSpace


def latent_diffusion(cfg) -> bool:
    """Whether a run's denoiser learns latents: of a task=autoencoder run (autoencoder.ckpt) or of a
    pretrained diffusers autoencoder (autoencoder=diffusers)."""
    return cfg.get("task", "diffusion") == "diffusion" and (
        cfg.autoencoder.kind == "diffusers" or cfg.autoencoder.get("ckpt") is not None)


_LOADED: dict[tuple, LatentSpace] = {}  # the autoencoders of this process, loaded once each


def run_space(cfg, state: dict | None = None, device="cpu") -> Space:
    """A training run's space: the autoencoder a resumed run's checkpoint embeds (so that it needs
    no other file), else the config's (loaded once per process: the checks before the run and the
    run share it), else the data's pixels."""
    if state is not None:
        return checkpoint_space(state, device)
    if not latent_diffusion(cfg):
        return PixelSpace(image_shape(cfg.data))
    ae, shape = cfg.autoencoder, image_shape(cfg.data)
    if ae.kind == "diffusers":
        key = ("diffusers", ae.path, ae.subfolder, shape, str(device))
        load = lambda: pretrained_latent_space(ae.path, ae.subfolder, shape, device)  # noqa: E731
    else:
        path = checkpoint.resolve(ae.ckpt, key="autoencoder.ckpt")
        key = ("ckpt", str(path.resolve()), path.stat().st_mtime_ns, str(device))
        load = lambda: load_autoencoder(ae.ckpt, device)  # noqa: E731
    if key not in _LOADED:
        _LOADED[key] = load()
    return _LOADED[key]


def checkpoint_space(state: dict, device="cpu") -> Space:
    """The space a denoiser's checkpoint was trained in."""
    if "autoencoder" in state:
        return LatentSpace.from_state(state["autoencoder"], device)
    return PixelSpace(image_shape(OmegaConf.create(state["config"]["data"])))


def relocated(state: dict, text_encoder_path: str | None, autoencoder_path: str | None) -> dict:
    """A checkpoint whose pretrained parts load from other folders (a run moved to another
    machine): text_encoder.path for its CLIP, autoencoder.path for its diffusers autoencoder. The
    fingerprints it keeps still refuse other weights."""
    state = moved_text_encoder(state, text_encoder_path)
    if autoencoder_path is None:
        return state
    if state.get("autoencoder", {}).get("config", {}).get("kind") != "diffusers":
        raise UserError(f"autoencoder.path={autoencoder_path}: this model has no pretrained autoencoder to load "
                        f"(its own autoencoder, if any, is inside the checkpoint); leave it out")
    state["autoencoder"]["config"]["path"] = state["config"]["autoencoder"]["path"] = autoencoder_path
    return state


def load_autoencoder(path, device="cpu") -> LatentSpace:
    """autoencoder.ckpt=: a task=autoencoder run dir or checkpoint, as a frozen LatentSpace."""
    state = checkpoint.read(path, map_location=device, key="autoencoder.ckpt")
    config = state["config"]
    if config.get("task") != "autoencoder" or "latent" not in state:
        raise UserError(f"autoencoder.ckpt={path} is not an autoencoder (it was trained with task="
                        f"{config.get('task', 'diffusion')}): give the run dir of a diffusion-train "
                        f"task=autoencoder run")
    data = config["data"]
    return LatentSpace.from_state({
        "config": config["autoencoder"], "latent": state["latent"], "source": str(checkpoint.resolve(path)),
        "image_shape": [data["channels"], data["height"], data["width"]],
        "model": state.get("ema", state["model"])}, device)


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
    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding latents (once)", unit="batch",
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


def check_config(cfg) -> None:
    """Before a latent diffusion run (autoencoder.ckpt= or autoencoder=diffusers): the autoencoder
    must be one, for images of the data's channels, and both it and the denoiser must divide the
    image size. It is loaded now, and kept for the run (once per process). A resumed run uses the
    autoencoder its checkpoint embeds: nothing to check."""
    kind = cfg.autoencoder.kind
    if kind == "diffusers" and cfg.autoencoder.path is None:
        raise UserError("autoencoder=diffusers needs autoencoder.path: a hub name (stabilityai/sd-vae-ft-mse) "
                        "or a local folder with a diffusers AutoencoderKL")
    if not latent_diffusion(cfg) or cfg.get("resume") is not None:
        return
    latents = run_space(cfg)
    key = "autoencoder.path" if kind == "diffusers" else "autoencoder.ckpt"
    channels, height, width = image_shape(cfg.data)
    if channels != latents.image_shape[0]:
        raise UserError(f"{key}={latents.source} encodes {latents.image_shape[0]}-channel images, data="
                        f"{cfg.data.kind} has {channels}: train an autoencoder on this data "
                        f"(diffusion-train task=autoencoder data=...)")
    f, m = latents.model.factor, size_factor(cfg.model)
    if height % (f * m) or width % (f * m):
        raise UserError(f"latent diffusion: the autoencoder (f={f}) and model={cfg.model.kind} (which divides "
                        f"its input by {m}) need image sizes divisible by {f * m}, got {height}x{width}: use "
                        f"such a size (data.image_size={-(-height // (f * m)) * f * m}), or a model for "
                        f"{height // f}x{width // f} latents (fewer model.channel_mults, or model.patch_size=1)")
