"""DPM-Solver++(2M) (Lu et al. 2022): second-order multistep, one model evaluation per step."""

import math
from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule, combine
from .base import Denoised, Run, TrailingSampler, alpha_sigma


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), DPM-Solver's time variable; inf for the clean image."""
    return math.log(alpha / sigma) if sigma > 0 else math.inf


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, previous_x0: torch.Tensor | None, h: float,
                  ratio: float | None, now: tuple[float, float], then: tuple[float, float], eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (midpoint form as in diffusers) from noise level `now` =
    (alpha, sigma) to `then`, in the half log-SNR lambda = log(alpha / sigma): with
    h = lambda_then - lambda_now (given),
        x_then = (sigma_then / sigma_now) e^(-eta h) x + alpha_then (1 - e^(-(1 + eta) h)) D
                 + sigma_then sqrt(1 - e^(-2 eta h)) z,
    D = x0 + (x0 - previous_x0) / (2 r), r = h_previous / h (`ratio`), or x0 alone on the first
    and last steps. eta = 0 is the ODE solver (DPMSolverMultistepScheduler's "dpmsolver++"), eta = 1
    the SDE one ("sde-dpmsolver++"). The last step, to sigma = 0, returns x0."""
    sigma_now, (alpha_then, sigma_then) = now[1], then
    if sigma_then == 0:
        return x0
    denoised = x0 if previous_x0 is None else combine(1 + 0.5 / ratio, x0, -0.5 / ratio, previous_x0)
    x_then = combine(sigma_then / sigma_now * math.exp(-eta * h), x,
                     alpha_then * -math.expm1(-(1 + eta) * h), denoised)
    if eta > 0 and noise is not None:
        x_then.add_(noise, alpha=sigma_then * math.sqrt(-math.expm1(-2 * eta * h)))
    return x_then


@dataclass
class DPMSolverPP2M(TrailingSampler):
    """Over trailing-spaced timesteps like DDIM; eta = 1 is its SDE form, which adds noise."""
    kind = "dpmpp_2m"

    def start(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        self.previous_x0 = self.previous_h = None  # the multistep memory
        return super().start(schedule, steps)

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        now, then = alpha_sigma(self.schedule, t), alpha_sigma(self.schedule, t_next)
        h = half_log_snr(*then) - half_log_snr(*now)
        noise = run.noise() if self.eta > 0 and then[1] > 0 else None
        ratio = self.previous_h / h if self.previous_h is not None else None
        x = dpmpp_2m_step(x, denoised.x0, self.previous_x0, h, ratio, now, then, self.eta, noise)
        self.previous_x0, self.previous_h = denoised.x0, h
        return x
