"""The conditioning shared by the models: the timestep, the class label where there is one, and a
caption's token embeddings, which the ResUNet and the DiT attend to (cross-attention)."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .text_encoder import PAD, build_text_encoder, padded


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of integer timesteps, (B,) -> (B, dim), as in the Transformer."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of t through a small MLP: (B,) -> (B, out_dim), out_dim default dim.

    With num_classes > 0, a learned embedding of the class label is added: labels are 0 ...
    num_classes - 1, and num_classes is the null label (no class), which label dropout trains and
    classifier-free guidance uses. Without labels a conditional model gets the null label."""

    def __init__(self, dim: int, num_classes: int = 0, out_dim: int | None = None):
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        out_dim = out_dim or dim
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))
        self.label = nn.Embedding(num_classes + 1, out_dim) if num_classes > 0 else None

    def forward(self, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.mlp(timestep_embedding(t, self.dim))
        if self.label is not None:
            if labels is None:
                labels = torch.full_like(t, self.num_classes)
            emb = emb + self.label(labels)
        elif labels is not None:
            raise ValueError("labels given to a model without classes (model.num_classes=0)")
        return emb


class TextConditioning(nn.Module):
    """Caption tokens (B, L) -> (the masked mean of the token embeddings, projected to the time
    embedding's width and added to it, as Imagen does; (token embeddings, mask) for the
    cross-attention layers). The pooled path gives every residual block the caption at once, as
    a class embedding does; cross-attention lets each position look up the words it needs."""

    def __init__(self, text_cfg: dict, emb_dim: int):
        super().__init__()
        self.encoder = build_text_encoder(text_cfg)
        self.width = self.encoder.width
        self.pooled = nn.Linear(self.width, emb_dim)
        empty, _ = self.encoder.tokenizer([""])  # the start token (tiny), start and end (clip)
        self.register_buffer("empty", empty[:, : int((empty != PAD).sum())], persistent=False)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        context, mask = self.encoder(tokens)
        weights = mask.to(context.dtype)[..., None]
        pooled = (context * weights).sum(1) / weights.sum(1)
        return self.pooled(pooled), (context, mask)

    def null(self, count: int, length: int | None = None) -> torch.Tensor:
        """The empty caption's tokens, (count, length): the unconditional input."""
        return padded(self.empty, length or self.empty.shape[1]).expand(count, -1)


class CrossAttention(nn.Module):
    """Tokens (B, N, dim) attend to a caption's token embeddings (B, L, context_dim), its padding
    masked out; a residual branch whose output layer starts at zero."""

    def __init__(self, dim: int, context_dim: int, heads: int = 4):
        super().__init__()
        if dim % heads:
            raise ValueError(f"cross-attention needs a width divisible by its {heads} heads, got "
                             f"{dim}: change model.base_channels or model.width")
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.out = nn.Linear(dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, context: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        tokens, mask = context
        b, n, dim = x.shape
        head = dim // self.heads
        q = self.q(self.norm(x)).view(b, n, self.heads, head).transpose(1, 2)
        k, v = self.kv(tokens.to(x.dtype)).view(b, -1, 2, self.heads, head).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + self.out(attended.transpose(1, 2).reshape(b, n, dim))


def conditioning(model: nn.Module, t: torch.Tensor, cond: torch.Tensor | None):
    """(the embedding of t and of the condition, the caption's (token embeddings, mask) for
    cross-attention or None) for a model with `time` and `text` (None without captions). cond:
    class indices (B,), caption tokens (B, L), or None for the null label or the empty caption."""
    if model.text is None:
        return model.time(t, cond), None
    if cond is None:
        cond = model.text.null(len(t))
    pooled, context = model.text(cond)
    return model.time(t) + pooled, context
