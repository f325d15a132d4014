"""A small U-Net in the style of the seed tutorials: double conv blocks, two down and two up stages
with skip connections, the timestep embedding added in every block."""

import math

import torch
from torch import nn
from torch.nn import functional as F

from .embedding import TimeEmbedding


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class DoubleConv(nn.Module):
    """conv3x3 -> GroupNorm -> SiLU, + time, conv3x3 -> GroupNorm -> SiLU."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm1 = group_norm(out_channels)
        self.time = nn.Linear(time_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = h + self.time(emb)[:, :, None, None]
        return F.silu(self.norm2(self.conv2(h)))


class UNet(nn.Module):
    """Widths: base at full resolution, 2*base at 1/2 and 1/4. H and W must be divisible by 4."""

    def __init__(self, image_shape: tuple[int, int, int], base_channels: int = 64, time_dim: int = 128,
                 num_classes: int = 0):
        super().__init__()
        channels, height, width = image_shape
        if height % 4 or width % 4:
            raise ValueError(f"model=unet needs image height and width divisible by 4 (two 2x "
                             f"down-samplings), got {height}x{width}; use model=mlp or another size")
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        b = base_channels
        self.time = TimeEmbedding(time_dim, num_classes)
        self.inc = DoubleConv(channels, b, time_dim)
        self.down1 = DoubleConv(b, 2 * b, time_dim)
        self.down2 = DoubleConv(2 * b, 2 * b, time_dim)
        self.up1 = DoubleConv(4 * b, b, time_dim)
        self.up2 = DoubleConv(2 * b, b, time_dim)
        self.out = nn.Conv2d(b, channels, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t, labels)
        h1 = self.inc(x, emb)                           # H
        h2 = self.down1(F.max_pool2d(h1, 2), emb)       # H/2
        h3 = self.down2(F.max_pool2d(h2, 2), emb)       # H/4
        h = self.up1(torch.cat([F.interpolate(h3, scale_factor=2), h2], dim=1), emb)
        h = self.up2(torch.cat([F.interpolate(h, scale_factor=2), h1], dim=1), emb)
        return self.out(h)
