"""The toy denoiser: the flattened image and the timestep -> residual MLP blocks -> eps."""

import math

import torch
from torch import nn

from .embedding import TimeEmbedding


class ResidualBlock(nn.Module):
    """h + Linear(SiLU(Linear(LayerNorm(h) + time)))."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.time = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(self.norm(h) + self.time(emb))


class MLP(nn.Module):
    """eps = Linear(blocks(x, t)) + Linear(x) * gain(t).

    The gated linear path keeps the full rank of the image, so the hidden width may be smaller
    than the number of pixels: much of the noise is a linear function of x_t whose scale depends
    on t (1 / sqrt(1 - alpha_bar_t) off the data), which the per-feature gain of t can express."""

    def __init__(self, image_shape: tuple[int, int, int], width: int = 256, depth: int = 2,
                 num_classes: int = 0):
        super().__init__()
        self.image_shape, self.num_classes = tuple(image_shape), num_classes
        features = math.prod(image_shape)
        self.time = TimeEmbedding(width, num_classes)
        self.inp = nn.Linear(features, width)
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, features))
        self.skip = nn.Linear(features, features)
        nn.init.eye_(self.skip.weight)  # start from eps = x_t, right for pure noise
        nn.init.zeros_(self.skip.bias)
        self.gain = nn.Linear(width, features)  # log-gain: the scale spans 1 to ~100 over t
        nn.init.zeros_(self.gain.weight)
        nn.init.zeros_(self.gain.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.time(t, labels)
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        return (self.out(h) + self.skip(x.flatten(1)) * self.gain(emb).exp()).view_as(x)
