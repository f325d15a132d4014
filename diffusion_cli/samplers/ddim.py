"""DDIM (Song et al. 2021) over trailing-spaced timesteps."""

import math
from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule, combine
from .base import Denoised, Run, TrailingSampler


def ddim_step(schedule: NoiseSchedule, x0: torch.Tensor, eps: torch.Tensor, t: int, t_prev: int,
              x: torch.Tensor, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12) from the estimates x0 and eps;
    t_prev = -1 means alpha_bar = 1. eta = 0 is deterministic, eta = 1 has the variance of DDPM's
    posterior."""
    ab = schedule.numbers["alpha_bars"][t]
    ab_prev = schedule.numbers["alpha_bars"][t_prev] if t_prev >= 0 else 1.0
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    x_prev = combine(math.sqrt(ab_prev), x0, math.sqrt(1 - ab_prev - sigma ** 2), eps)
    return x_prev.add_(noise, alpha=sigma) if eta > 0 and noise is not None else x_prev


@dataclass
class DDIM(TrailingSampler):
    """eta = 0: deterministic; 1: the noise of DDPM's posterior."""
    kind = "ddim"

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        noise = run.noise() if self.eta > 0 and t_next >= 0 else None
        return ddim_step(self.schedule, denoised.x0, denoised.eps, t, t_next, x, self.eta, noise)
