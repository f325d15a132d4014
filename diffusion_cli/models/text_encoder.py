"""Text encoders: a caption -> tokens -> token embeddings that the denoiser attends to.

Every encoder writes a caption as a LongTensor of token ids padded with PAD (-1) to its
`max_length`, so that a batch of captions is one tensor that the data, the samplers and the
checkpoint treat like class labels, and the padding mask is `tokens != PAD` whatever the
vocabulary. The empty caption (its start token alone) is the null condition that caption dropout
trains and classifier-free guidance uses.

- tiny: UTF-8 bytes (no vocabulary file to download) and a small transformer trained with the
  denoiser.
- clip: transformers' CLIP tokenizer and text model (text_encoder.path), frozen: its weights stay
  out of the denoiser's parameters, EMA and checkpoints, which keep a fingerprint of them instead.
"""

import logging
from dataclasses import dataclass

import torch
from omegaconf import MISSING
from torch import nn
from torch.nn import functional as F

from ..errors import UserError
from ..schema import check, non_negative, one_of, positive
from . import pretrained

log = logging.getLogger(__name__)

PAD = -1


class ByteTokenizer:
    """A caption's UTF-8 bytes (ids 0..255) after a start token (256), cut at max_length tokens."""

    start = 256
    vocab_size = 257

    def __init__(self, max_length: int):
        if max_length < 2:
            raise ValueError(f"text_encoder.max_length={max_length} leaves no room for a caption: "
                             f"use at least 2 (the start token and a byte), e.g. 64")
        self.max_length = max_length

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, int]:
        """(tokens (N, max_length), how many captions were cut to fit)."""
        return rows([[self.start, *caption.encode("utf-8")] for caption in captions], self.max_length)


def rows(ids: list[list[int]], max_length: int, keep_last: bool = False) -> tuple[torch.Tensor, int]:
    """Token id lists as one (N, max_length) tensor padded with PAD, each cut to max_length (the
    last token kept where `keep_last`: CLIP's end token), and how many were cut."""
    tokens = torch.full((len(ids), max_length), PAD, dtype=torch.long)
    truncated = 0
    for row, caption in enumerate(ids):
        if len(caption) > max_length:
            truncated += 1
            caption = caption[: max_length - 1] + caption[-1:] if keep_last else caption[:max_length]
        tokens[row, : len(caption)] = torch.tensor(caption, dtype=torch.long)
    return tokens, truncated


class TransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention over the caption's tokens (padding masked) and an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = x + self.proj(attended.transpose(1, 2).reshape(b, n, width))
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module):
    """Byte tokens -> embeddings plus learned positions -> `depth` transformer blocks -> LayerNorm:
    (B, L) tokens -> ((B, L, width) embeddings, (B, L) mask of the real tokens)."""

    def __init__(self, width: int = 128, depth: int = 2, heads: int = 4, max_length: int = 64):
        super().__init__()
        if width % heads:
            raise ValueError(f"text_encoder.width={width} must split into text_encoder.heads={heads} "
                             f"heads: change one of them")
        self.tokenizer = ByteTokenizer(max_length)
        self.width = width
        self.embed = nn.Embedding(ByteTokenizer.vocab_size, width)
        self.position = nn.Parameter(torch.randn(1, max_length, width) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens != PAD
        x = self.embed(tokens.clamp(min=0)) + self.position[:, : tokens.shape[1]]
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x), mask


class ClipTokenizer:
    """CLIP's tokenizer in the ByteTokenizer's form: start and end tokens around the caption's
    BPE tokens, padded with PAD, the end token kept when a caption is cut."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, int]:
        return rows(self.tokenizer(captions)["input_ids"], self.max_length, keep_last=True)


class ClipTextEncoder(nn.Module):
    """A pretrained CLIP text model, frozen: tokens -> (its last hidden states, mask). The
    embeddings of each distinct caption are computed once (pretrained.FrozenClip). The only state
    is the weights' fingerprint: loading a checkpoint made with other CLIP weights is refused."""

    def __init__(self, path: str, max_length: int = 77):
        super().__init__()
        self.path, self.frozen = path, pretrained.clip(path)
        if not 2 <= max_length <= self.frozen.max_positions:
            raise ValueError(f"text_encoder.max_length={max_length} is not allowed: CLIP at {path} takes "
                             f"2 to {self.frozen.max_positions} tokens")
        self.tokenizer = ClipTokenizer(self.frozen.tokenizer, max_length)
        self.width = self.frozen.width
        self.register_buffer("fingerprint", torch.tensor(int(self.frozen.fingerprint[:15], 16)))

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = tokens != PAD
        return self.frozen.embed(tokens, mask), mask

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "fingerprint")
        if saved is not None and int(saved) != int(self.fingerprint):
            raise UserError(f"text_encoder.path={self.path} holds other CLIP weights than the ones this "
                            f"model was trained with: give the same CLIP model")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


ENCODERS = {"tiny": TinyTextEncoder, "clip": ClipTextEncoder}


def build_text_encoder(text_cfg: dict) -> nn.Module:
    options = {key: value for key, value in text_cfg.items() if key != "kind"}
    return ENCODERS[text_cfg["kind"]](**options)


def tokenize(encoder: nn.Module, captions: list[str], what: str = "captions") -> torch.Tensor:
    """The captions' tokens, as wide as the longest (padding changes nothing, and costs time in
    every layer); one warning when some were longer than the encoder's max_length."""
    tokens, truncated = encoder.tokenizer(captions)
    if truncated:
        log.warning(f"{truncated} of {len(captions)} {what} are longer than text_encoder.max_length="
                    f"{encoder.tokenizer.max_length} tokens and were cut to fit")
    return tokens[:, : int((tokens != PAD).sum(1).max())]


def padded(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens (N, L) padded with PAD to (N, length)."""
    return F.pad(tokens, (0, length - tokens.shape[1]), value=PAD)


# The config group's schema (conf/ holds the values and their docs).
@dataclass
class TextEncoderConfig:
    kind: str = one_of(ENCODERS)
    width: int = positive()
    depth: int = non_negative()
    heads: int = positive("an integer >= 1 that divides text_encoder.width")
    max_length: int = check(lambda v: v >= 2, "an integer >= 2 (tokens, the start token included)", MISSING)


@dataclass
class ClipTextEncoderConfig:
    kind: str = one_of(ENCODERS)
    path: str = MISSING
    max_length: int = check(lambda v: v >= 2, "an integer >= 2 (tokens, the start token included)", MISSING)
