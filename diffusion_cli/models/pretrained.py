"""Frozen pretrained networks, each an optional extra: CLIP's text model (transformers) for
text_encoder=clip, a diffusers AutoencoderKL for autoencoder=diffusers, and LPIPS (lpips) for
autoencoder.perceptual_weight. They are loaded once per process (from a local folder or a hub
name), with one line for a missing extra or weights that can't be had; a checkpoint keeps where
they came from and a fingerprint of their weights, never the weights themselves."""

import contextlib
import functools
import hashlib
import importlib
import logging
import warnings

import torch
from torch import nn

from ..errors import UserError

log = logging.getLogger(__name__)


def require(module: str, extra: str, what: str):
    """Import an optional dependency, or one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {extra!r} extra: pip install 'diffusion-cli[{extra}]'") from None


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's weights: checkpoints keep it to tell the same weights again."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode() + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def quiet_hub():
    """The Hugging Face libraries' warnings and retry logs kept off the console while they load:
    a failure is our one line."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "transformers", "diffusers")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def from_pretrained(load, path: str, key: str, what: str, **options):
    """`load(path, **options)`, with one line when the weights are not there (offline, a wrong
    name, a folder without them)."""
    log.debug(f"loading {what} from {path}")
    try:
        with quiet_hub():
            return load(path, **options)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UserError(f"{key}={path}: could not load {what} ({reason}); give a local folder saved "
                        f"with save_pretrained, or a hub name with internet access") from None


class FrozenClip:
    """CLIP's tokenizer and text model, frozen, shared by every copy of the denoiser (the EMA's
    too: deepcopy returns it), with the token embeddings of each distinct caption computed once."""

    max_cached = 100_000  # captions whose embeddings are kept; beyond it they are recomputed

    def __init__(self, path: str):
        transformers = require("transformers", "clip", "text_encoder=clip")
        self.tokenizer = from_pretrained(transformers.AutoTokenizer.from_pretrained, path,
                                         "text_encoder.path", "CLIP's tokenizer")
        self.model = from_pretrained(transformers.CLIPTextModel.from_pretrained, path,
                                     "text_encoder.path", "CLIP's text model").eval().requires_grad_(False)
        self.width = self.model.config.hidden_size
        self.max_positions = self.model.config.max_position_embeddings
        self.fingerprint = fingerprint(self.model)
        self.cache: dict[bytes, torch.Tensor] = {}

    def __deepcopy__(self, memo):
        return self

    @torch.no_grad()
    def embed(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last hidden states (B, L, width) in fp32 of caption tokens (B, L) whose real tokens
        are `mask`; padding rows are zeros (the cross-attention masks them out)."""
        captions = [row[keep] for row, keep in zip(tokens.cpu(), mask.cpu())]
        keys = [caption.numpy().tobytes() for caption in captions]
        missing = {key: caption for key, caption in zip(keys, captions) if key not in self.cache}
        fresh = self._run(missing, tokens.device) if missing else {}
        states = [(fresh[key] if key in fresh else self.cache[key]).to(tokens.device) for key in keys]
        states = nn.utils.rnn.pad_sequence(states, batch_first=True)
        return nn.functional.pad(states, (0, 0, 0, tokens.shape[1] - states.shape[1]))

    def _run(self, captions: dict[bytes, torch.Tensor], device: torch.device) -> dict:
        """Each caption's hidden states, kept in the cache while it has room."""
        self.model.to(device)
        lengths = torch.tensor([len(ids) for ids in captions.values()])
        ids = nn.utils.rnn.pad_sequence(list(captions.values()), batch_first=True,
                                        padding_value=self.tokenizer.pad_token_id or 0)
        attention = torch.arange(ids.shape[1])[None] < lengths[:, None]
        with torch.autocast(device.type, enabled=False):  # the same embeddings under any precision
            states = self.model(input_ids=ids.to(device), attention_mask=attention.long().to(device))
        result = {key: state[:length] for key, state, length in
                  zip(captions, states.last_hidden_state.float(), lengths.tolist())}
        if len(self.cache) + len(result) <= self.max_cached:
            self.cache.update(result)
        return result


@functools.cache
def clip(path: str) -> FrozenClip:
    return FrozenClip(path)


@functools.cache
def is_full_clip(path: str) -> bool:
    """Whether `path` holds a whole CLIP model (its image tower too), not its text model alone."""
    transformers = require("transformers", "clip", "text_encoder=clip")
    config = from_pretrained(transformers.AutoConfig.from_pretrained, path, "text_encoder.path", "CLIP's config")
    return config.model_type == "clip"


@functools.cache
def clip_pair(path: str):
    """A whole CLIP model, frozen, its tokenizer and its image normalisation (mean, std): CLIP score's."""
    transformers = require("transformers", "clip", "clip_score")
    model = from_pretrained(transformers.CLIPModel.from_pretrained, path, "text_encoder.path", "a CLIP model")
    tokenizer = from_pretrained(transformers.AutoTokenizer.from_pretrained, path, "text_encoder.path", "CLIP's tokenizer")
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    return model.eval().requires_grad_(False), tokenizer, torch.tensor(OPENAI_CLIP_MEAN), torch.tensor(OPENAI_CLIP_STD)


class DiffusersAutoencoder(nn.Module):
    """A pretrained diffusers AutoencoderKL, frozen, in the form of models.autoencoder's: encode()
    -> (posterior mean, log variance), decode(), `factor` and `latent_shape`."""

    def __init__(self, path: str, subfolder: str | None, image_shape: tuple[int, int, int]):
        super().__init__()
        self.vae, self.fingerprint = diffusers_autoencoder(path, subfolder)
        config = self.vae.config
        self.factor = 2 ** (len(config.block_out_channels) - 1)
        self.image_shape = (config.in_channels, *image_shape[1:])
        self.latent_shape = (config.latent_channels, image_shape[1] // self.factor, image_shape[2] // self.factor)
        # Its own latent scale and shift (SD 1.x/2.x: 0.18215 and none; SD3, Flux: both).
        self.scale, self.shift = config.scaling_factor, config.get("shift_factor") or 0.0

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.logvar

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents).sample


@functools.cache
def diffusers_autoencoder(path: str, subfolder: str | None) -> tuple[nn.Module, str]:
    """A diffusers AutoencoderKL, frozen, and its fingerprint; loaded once per process."""
    diffusers = require("diffusers", "diffusers", "autoencoder=diffusers")
    options = {"subfolder": subfolder} if subfolder else {}
    vae = from_pretrained(diffusers.AutoencoderKL.from_pretrained, path, "autoencoder.path",
                          "a diffusers AutoencoderKL", **options).eval().requires_grad_(False)
    return vae, fingerprint(vae)


@functools.cache
def lpips_vgg(random_trunk: bool = False) -> nn.Module:
    """LPIPS on VGG-16 features (Zhang et al. 2018), frozen: the perceptual term of
    autoencoder.perceptual_weight, as Rombach et al. train their autoencoders with. Its layer
    weights ship with the lpips package; the VGG-16 trunk is torchvision's ImageNet weights, which
    torch downloads once into its cache. random_trunk (tests): a randomly initialised trunk."""
    lpips = require("lpips", "lpips", "autoencoder.perceptual_weight > 0")
    try:
        with quiet_hub():  # lpips still passes torchvision's old `pretrained=`: a warning
            model = lpips.LPIPS(net="vgg", pnet_rand=random_trunk, verbose=False)
    except (OSError, RuntimeError) as error:  # offline: a URLError, an OSError
        raise UserError(f"autoencoder.perceptual_weight: could not load LPIPS's VGG-16 weights "
                        f"({str(error).strip()[:200] or type(error).__name__}); connect to the internet once "
                        f"(torch keeps them in ~/.cache/torch), or set autoencoder.perceptual_weight=0") from None
    return model.eval().requires_grad_(False)
