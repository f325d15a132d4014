"""Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1)."""

from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule, combine
from .base import SIGMA_MAX, Denoised, Run, Sampler, alpha_sigma, karras_timesteps


def ode_step(x: torch.Tensor, eps: torch.Tensor, now: tuple[float, float], then: tuple[float, float]
             ) -> torch.Tensor:
    """An Euler step of the probability-flow ODE from noise level `now` = (alpha, sigma) to `then`.
    In y = x / alpha and s = sigma / alpha the ODE is dy/ds = eps(x, t), so
    x_then = alpha_then (y + (s_then - s_now) eps): a DDIM step at eta = 0."""
    (alpha, sigma), (alpha_next, sigma_next) = now, then
    ds = sigma_next / alpha_next - sigma / alpha
    return combine(alpha_next / alpha, x, alpha_next * ds, eps)


@dataclass
class Heun(Sampler):
    """Karras-spaced timesteps, then the clean image; each step averages eps at both of its ends: 2
    steps - 1 model evaluations (2 steps - 2 from a top above SIGMA_MAX, as linear's and cosine's).
    Two steps stay Euler steps: the last, to s = 0, and the first where it comes down from above
    SIGMA_MAX (there eps is constant to a few parts in a million, and half the difference of two
    such values times a step of thousands would be the only error)."""
    kind = "heun"
    evaluations_per_step = 2

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        return karras_timesteps(schedule, steps)

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        now, then = alpha_sigma(self.schedule, t), alpha_sigma(self.schedule, t_next)
        eps = denoised.eps
        euler = ode_step(x, eps, now, then)
        first_from_the_top = t == self.schedule.T - 1 and now[1] / now[0] >= 1.01 * SIGMA_MAX
        if then[1] > 0 and not first_from_the_top:
            eps = eps.add_(run.denoise(euler, t_next).eps).mul_(0.5)
            euler = ode_step(x, eps, now, then)
        return euler
