"""The diffusion transformer (Peebles & Xie 2023, "DiT"): the image cut into patch tokens, transformer
blocks conditioned on t (and the label) by adaLN-Zero, the tokens put back into an image. With
captions every block also attends to the caption's token embeddings (as PixArt-alpha does)."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import CrossAttention, TextConditioning, TimeEmbedding, conditioning


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def sinusoidal_positions(rows: int, cols: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position features, (rows * cols, width): half for the row, half for
    the column."""
    quarter = width // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter) / quarter)
    def axis(n):
        angles = torch.arange(n).float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)            # (n, width / 2)
    r, c = axis(rows), axis(cols)
    return torch.cat([r[:, None].expand(rows, cols, -1), c[None].expand(rows, cols, -1)], -1).reshape(rows * cols, -1)


class DiTBlock(nn.Module):
    """Self-attention and an MLP, each a residual branch whose LayerNorm is shifted and scaled,
    and whose output is gated, by values regressed from the conditioning; the regression starts at
    zero (adaLN-Zero), so each block starts as the identity. With context_dim > 0, cross-attention
    to the caption comes between the two (adaLN keeps conditioning on t)."""

    def __init__(self, width: int, heads: int, context_dim: int = 0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * width, width))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)
        self.cross = CrossAttention(width, context_dim, heads) if context_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context=None) -> torch.Tensor:
        b, n, width = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(cond)[:, None].chunk(6, dim=-1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).view(
            b, n, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, width)
        x = x + gate1 * self.proj(attended)
        if self.cross is not None:
            x = self.cross(x, context)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """(B, C, H, W) -> patch_size x patch_size patches -> (B, N, width) tokens plus position
    embeddings -> `depth` DiT blocks -> a modulated LayerNorm and a linear layer back to the
    patches' pixels (zero-initialised) -> (B, C, H, W)."""

    def __init__(self, image_shape: tuple[int, int, int], patch_size: int = 2, width: int = 128,
                 depth: int = 6, heads: int = 4, position: str = "learned", num_classes: int = 0,
                 text: dict | None = None):
        super().__init__()
        channels, height, width_px = image_shape
        if height % patch_size or width_px % patch_size:
            raise ValueError(f"model=dit with model.patch_size={patch_size} needs image height and "
                             f"width divisible by it, got {height}x{width_px}: choose a patch size "
                             f"that divides both")
        if width % heads or (width // heads) % 2:
            raise ValueError(f"model.width={width} must split into model.heads={heads} heads of "
                             f"an even size: change model.width or model.heads")
        if position == "sinusoidal" and width % 4:
            raise ValueError(f"model.position=sinusoidal needs model.width divisible by 4, got {width}")
        self.image_shape, self.num_classes, self.patch_size = tuple(image_shape), num_classes, patch_size
        self.grid = (height // patch_size, width_px // patch_size)
        tokens = self.grid[0] * self.grid[1]
        self.patchify = nn.Conv2d(channels, width, patch_size, stride=patch_size)
        if position == "learned":
            self.position = nn.Parameter(torch.randn(1, tokens, width) * 0.02)
        else:
            self.register_buffer("position", sinusoidal_positions(*self.grid, width)[None], persistent=False)
        self.time = TimeEmbedding(width, num_classes)
        self.text = TextConditioning(text, width) if text else None
        self.blocks = nn.ModuleList(DiTBlock(width, heads, self.text.width if text else 0)
                                    for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final = nn.Linear(width, patch_size * patch_size * channels)
        for layer in (self.final_modulation[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        cond, context = conditioning(self, t, labels)
        tokens = self.patchify(x).flatten(2).transpose(1, 2) + self.position      # (B, N, width)
        for block in self.blocks:
            tokens = block(tokens, cond, context)
        shift, scale = self.final_modulation(cond)[:, None].chunk(2, dim=-1)
        patches = self.final(modulate(self.final_norm(tokens), shift, scale))    # (B, N, p*p*C)
        return self.unpatchify(patches)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C) -> (B, C, H, W)."""
        (rows, cols), p, channels = self.grid, self.patch_size, self.image_shape[0]
        patches = patches.reshape(len(patches), rows, cols, p, p, channels)
        return patches.permute(0, 5, 1, 3, 2, 4).reshape(len(patches), channels, rows * p, cols * p)
