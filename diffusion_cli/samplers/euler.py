"""Euler's method on the probability-flow ODE over Karras-spaced timesteps (Karras et al. 2022),
with their stochastic "churn" (Algorithm 2) as an option."""

import math
from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule
from ..schema import check
from .base import Denoised, Run, Sampler, alpha_sigma, karras_timesteps, level, nearest_timesteps
from .heun import ode_step


@dataclass
class Euler(Sampler):
    """One model evaluation per step: in y = x / alpha and s = sigma / alpha, y_next = y + (s_next -
    s) eps. With s_churn > 0, each step whose level s lies in [s_tmin, s_tmax] first adds noise to
    raise it to s (1 + gamma), gamma = min(s_churn / steps, sqrt(2) - 1), and steps from there:
    the stochastic sampler of Karras et al. Our model knows only its training levels, so the raised
    level is rounded to the nearest one (no churn where that is s itself)."""
    kind = "euler"
    s_churn: float = check(lambda v: v >= 0, "a number >= 0 (0: deterministic)", 0.0)
    s_tmin: float = check(lambda v: v >= 0, "a number >= 0", 0.0)
    s_tmax: float | None = check(lambda v: v is None or v > 0, "null (no bound) or a number > 0", None)
    s_noise: float = check(lambda v: v > 0, "a number > 0, e.g. 1.003", 1.0)

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        return karras_timesteps(schedule, steps)

    def start(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        timesteps = super().start(schedule, steps)
        self.gamma = min(self.s_churn / len(timesteps), math.sqrt(2) - 1)
        return timesteps

    def churned(self, t: int) -> int:
        """The timestep whose level is nearest to the churn's raised level at t (t: no churn)."""
        s = level(self.schedule, t)
        if self.gamma == 0 or s < self.s_tmin or (self.s_tmax is not None and s > self.s_tmax):
            return t
        return max(t, nearest_timesteps(self.schedule, torch.tensor([s * (1 + self.gamma)], dtype=torch.float64))[0])

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        t_hat = self.churned(t)
        if t_hat != t:  # y_hat = y + sqrt(s_hat^2 - s^2) z, at the level of t_hat
            (alpha, _), (alpha_hat, _) = alpha_sigma(self.schedule, t), alpha_sigma(self.schedule, t_hat)
            spread = math.sqrt(level(self.schedule, t_hat) ** 2 - level(self.schedule, t) ** 2)
            x = (x / alpha).add_(run.noise(), alpha=spread * self.s_noise).mul_(alpha_hat)
            t, denoised = t_hat, run.denoise(x, t_hat)
        return ode_step(x, denoised.eps, alpha_sigma(self.schedule, t), alpha_sigma(self.schedule, t_next))
