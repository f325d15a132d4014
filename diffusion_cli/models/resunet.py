"""The standard diffusion U-Net (Ho et al. 2020; Nichol & Dhariwal 2021), sized for small images:
residual blocks with GroupNorm and SiLU, the time (and label) embedding through an MLP into every
block, self-attention at the lowest resolution, dropout, skip connections between the halves;
with captions, cross-attention to their token embeddings (Rombach et al. 2022)."""

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import CrossAttention, TextConditioning, TimeEmbedding, conditioning
from .unet import group_norm


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialise the last layer of a residual branch: each block starts as the identity."""
    for parameter in module.parameters():
        nn.init.zeros_(parameter)
    return module


class ResBlock(nn.Module):
    """x + conv(dropout(SiLU(GN(conv(SiLU(GN(x))) + emb)))), with a 1x1 skip when widths differ;
    then self-attention when `attention`, and cross-attention to a caption of width
    `context_dim` when it is > 0."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float,
                 attention: bool = False, context_dim: int = 0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.attention = Attention(out_channels) if attention else nn.Identity()
        self.cross = CrossAttention(out_channels, context_dim) if context_dim else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context=None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        h = self.attention(self.skip(x) + h)
        if self.cross is None:
            return h
        b, c, height, width = h.shape
        pixels = self.cross(h.flatten(2).transpose(1, 2), context)       # (b, hw, c)
        return pixels.transpose(1, 2).reshape(b, c, height, width)


class Attention(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, as a residual branch."""

    def __init__(self, channels: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = zero(nn.Conv2d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).transpose(-1, -2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v)           # (b, heads, hw, c / heads)
        return x + self.out(attended.transpose(-1, -2).reshape(b, c, h, w))


class ResUNet(nn.Module):
    """Levels of widths base_channels * channel_mults[i], halving the resolution between levels;
    num_res_blocks residual blocks per level on the way down, one more on the way up; the middle
    is ResBlock, Attention (if `attention`), ResBlock; the blocks of levels whose resolution (the
    image height divided by 2^level) is in `attention_resolutions` add self-attention too. With
    `text` (a text_encoder config) the model takes caption tokens in place of labels, and the
    blocks of the levels at `cross_attention_resolutions` (None: every level below the full
    resolution) and the middle attend to the caption. With `self_condition` (Chen et al. 2022)
    the input also holds an estimate of x0 (`x0_hint`, zeros where none is given), concatenated
    to x_t's channels. H and W must be divisible by 2^(levels - 1)."""

    def __init__(self, image_shape: tuple[int, int, int], base_channels: int = 16,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1,
                 attention: bool = True, dropout: float = 0.1, num_classes: int = 0,
                 attention_resolutions: tuple[int, ...] = (), text: dict | None = None,
                 cross_attention_resolutions: tuple[int, ...] | None = None, self_condition: bool = False):
        super().__init__()
        channels, height, width = image_shape
        factor = 2 ** (len(channel_mults) - 1)
        if height % factor or width % factor:
            raise ValueError(f"model=resunet with {len(channel_mults)} levels needs image height and "
                             f"width divisible by {factor}, got {height}x{width}; use fewer "
                             f"model.channel_mults or another size")
        widths = [base_channels * mult for mult in channel_mults]
        attends = [height // 2 ** level in attention_resolutions for level in range(len(widths))]
        if any(width_ % 4 for width_, on in zip(widths + widths[-1:], attends + [attention]) if on):
            raise ValueError("model.attention and model.attention_resolutions need the widths of "
                             "their levels divisible by the 4 heads: change model.base_channels")
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        emb_dim = 4 * base_channels
        self.time = TimeEmbedding(base_channels, num_classes, out_dim=emb_dim)
        self.text = TextConditioning(text, emb_dim) if text else None
        context = self.text.width if text else 0
        if cross_attention_resolutions is None:
            cross_attention_resolutions = [height // 2 ** level for level in range(1, len(widths))]
        crosses = [context if height // 2 ** level in cross_attention_resolutions else 0
                   for level in range(len(widths))]
        self.self_condition = self_condition
        self.inp = nn.Conv2d(channels * (2 if self_condition else 1), widths[0], 3, padding=1)

        self.down, skip_widths, current = nn.ModuleList(), [widths[0]], widths[0]
        for level, width_ in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(ResBlock(current, width_, emb_dim, dropout, attends[level], crosses[level]))
                current = width_
                skip_widths.append(current)
            if level < len(widths) - 1:
                self.down.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
                skip_widths.append(current)

        self.middle1 = ResBlock(current, current, emb_dim, dropout, context_dim=context)
        self.attention = Attention(current) if attention else nn.Identity()
        self.middle2 = ResBlock(current, current, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, width_ in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResBlock(current + skip_widths.pop(), width_, emb_dim, dropout,
                                        attends[level], crosses[level]))
                current = width_
            if level > 0:
                self.up.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                             nn.Conv2d(current, current, 3, padding=1)))
        self.out = nn.Sequential(group_norm(current), nn.SiLU(),
                                 zero(nn.Conv2d(current, channels, 3, padding=1)))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None,
                x0_hint: torch.Tensor | None = None) -> torch.Tensor:
        emb, context = conditioning(self, t, cond)
        if self.self_condition:
            x = torch.cat([x, torch.zeros_like(x) if x0_hint is None else x0_hint], dim=1)
        h = self.inp(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, context) if isinstance(layer, ResBlock) else layer(h)
            skips.append(h)
        h = self.middle2(self.attention(self.middle1(h, emb, context)), emb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, skips.pop()], dim=1), emb, context)
            else:
                h = layer(h)
        return self.out(h)
