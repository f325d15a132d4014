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
        """The timesteps, and once per run the one each churned step raises its level to."""
        timesteps = super().start(schedule, steps)
        gamma = min(self.s_churn / len(timesteps), math.sqrt(2) - 1)
        levels = {t: level(schedule, t) for t in timesteps}
        churned = [t for t in timesteps if gamma > 0 and self.s_tmin <= levels[t]
                   and (self.s_tmax is None or levels[t] <= self.s_tmax)]
        raised = nearest_timesteps(schedule, torch.tensor([levels[t] * (1 + gamma) for t in churned],
                                                          dtype=torch.float64)) if churned else []
        self.raised = {t: max(t, r) for t, r in zip(churned, raised)}
        return timesteps

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        t_hat = self.raised.get(t, t)  # t itself: no churn
        if t_hat != t:  # y_hat = y + sqrt(s_hat^2 - s^2) z, at the level of t_hat
            (alpha, _), (alpha_hat, _) = alpha_sigma(self.schedule, t), alpha_sigma(self.schedule, t_hat)
            spread = math.sqrt(level(self.schedule, t_hat) ** 2 - level(self.schedule, t) ** 2)
            x = (x / alpha).add_(run.noise(), alpha=spread * self.s_noise).mul_(alpha_hat)
            t, denoised = t_hat, run.denoise(x, t_hat)
        return ode_step(x, denoised.eps, alpha_sigma(self.schedule, t), alpha_sigma(self.schedule, t_next))
