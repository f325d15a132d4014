"""Euler and Heun on the rectified-flow ODE dx_u/du = eps - x0 (SD3's samplers; diffusers'
FlowMatchEulerDiscreteScheduler and FlowMatchHeunDiscreteScheduler), in the flow time u = s / (a + s)
of any schedule, over timesteps evenly spaced in u after SD3's `shift`. Any model samples with them:
the velocity is eps - x0 of its estimate."""

from dataclasses import dataclass

import torch

from ..schedule import NoiseSchedule
from ..schema import check
from .base import Denoised, Run, Sampler, alpha_sigma, noise_levels


def flow_point(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(u, a + s) at timestep t (t = -1: the clean image, (0, 1)): x_u = x_t / (a + s)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return sigma / (alpha + sigma), alpha + sigma


def shifted(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift (Esser et al. 2024, eq. 23): u -> shift u / (1 + (shift - 1) u); shift > 1
    spends more of the steps at high noise, where large images decide their layout."""
    return shift * u / (1 + (shift - 1) * u)


def flow_timesteps(schedule: NoiseSchedule, steps: int, shift: float) -> list[int]:
    """`steps` timesteps from T-1 down, evenly spaced in u from the top u to the lowest (as diffusers'
    linspace of sigmas), then shifted, each rounded to the nearest training timestep in u."""
    levels = noise_levels(schedule)  # s / a of every timestep: u = s / (a + s)
    u = levels / (1 + levels)
    targets = shifted(torch.linspace(u[-1].item(), u[0].item(), steps, dtype=torch.float64), shift)
    nearest = (u[None] - targets[:, None]).abs().argmin(1).tolist()
    return sorted(set([schedule.T - 1] + nearest[1:]), reverse=True)


@dataclass
class FlowEuler(Sampler):
    """x_u' = x_u + (u' - u) v with v = eps - x0: on a straight path with the estimate held fixed this
    lands on (1 - u') x0 + u' eps, DDIM's (eta 0) step, over its own spacing."""
    kind = "flow_euler"
    shift: float = check(lambda v: v > 0, "a number > 0 (1: no shift; SD3: 3)", 1.0)

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        return flow_timesteps(schedule, steps, self.shift)

    def flow_step(self, x: torch.Tensor, t: int, t_next: int, velocity: torch.Tensor) -> torch.Tensor:
        """x at t -> x at t_next along `velocity`, through the flow's x_u."""
        (u, scale), (u_next, scale_next) = flow_point(self.schedule, t), flow_point(self.schedule, t_next)
        return (x / scale).add_(velocity, alpha=u_next - u).mul_(scale_next)

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        return self.flow_step(x, t, t_next, denoised.eps - denoised.x0)


@dataclass
class FlowHeun(FlowEuler):
    """Heun's correction: the mean of the velocities at both ends of each Euler step (two model
    evaluations a step, one on the last, to the clean image)."""
    kind = "flow_heun"
    evaluations_per_step = 2

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        velocity = denoised.eps - denoised.x0
        euler = self.flow_step(x, t, t_next, velocity)
        if t_next < 0:
            return euler
        end = run.denoise(euler, t_next)
        return self.flow_step(x, t, t_next, velocity.add_(end.eps - end.x0).mul_(0.5))
