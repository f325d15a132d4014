"""DDPM ancestral sampling (Ho et al. 2020), through x0 and the posterior q(x_{t-1} | x_t, x0)."""

import math
from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule
from .base import Denoised, Run, Sampler


def ddpm_step(schedule: NoiseSchedule, x0: torch.Tensor, i: int, x: torch.Tensor,
              noise: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step x_i -> x_{i-1} of `schedule` from the x0 estimate, through the posterior
    mean and variance (Ho et al. eq. 7); with an unclipped eps estimate this equals Algorithm 2. At
    i = 0 the variance is 0: no noise."""
    mean, variance = schedule.posterior_mean_variance(x0, x, i)
    if i == 0 or noise is None:
        return mean
    return mean.add_(noise, alpha=math.sqrt(variance))


@dataclass
class DDPM(Sampler):
    """Ancestral sampling over every timestep, or with fewer `steps` over a respaced schedule whose
    betas keep alpha_bar exact at the kept timesteps (Nichol & Dhariwal 2021)."""
    kind = "ddpm"

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        return schedule.respaced(steps).timesteps.flip(0).tolist()

    def start(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        self.respaced = schedule.respaced(steps)
        timesteps = self.respaced.timesteps.tolist()
        self.index = {t: i for i, t in enumerate(timesteps)}
        return timesteps[::-1]

    def coefficients(self, t: int) -> tuple[NoiseSchedule, int]:
        return self.respaced, self.index[t]

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        i = self.index[t]
        return ddpm_step(self.respaced, denoised.x0, i, x, run.noise() if i > 0 else None)
