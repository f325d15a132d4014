"""The conditioning shared by the models: the timestep, and the class label where there is one."""

import math

import torch
from torch import nn


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
