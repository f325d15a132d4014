"""The sample table: the project's sampler steps against floor loops and diffusers' schedulers."""

import math

import torch
from torch import nn

from ..samplers import sample
from ..samplers.base import trailing_timesteps
from ..schedule import NoiseSchedule
from .timing import interleaved, spread, table

SAMPLE_SHAPE = (64, 1, 28, 28)


class Trivial(nn.Module):
    """A stand-in network, x * 0.1, so the table shows the samplers' own cost."""
    prediction, num_classes = "eps", 0

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # where sample() reads the device from

    def forward(self, x, t, labels=None):
        return x * 0.1


def floor_ddpm(model, schedule: NoiseSchedule, x: torch.Tensor, generator) -> torch.Tensor:
    """The least a clipped-x0 ancestral step can do: coefficients precomputed as numbers, one randn,
    in-place fused ops."""
    n = schedule.numbers
    a, s = n["sqrt_alpha_bars"], n["sqrt_one_minus_alpha_bars"]
    c0, ct, var = n["posterior_mean_x0_coef"], n["posterior_mean_xt_coef"], n["posterior_variance"]
    sigma = [math.sqrt(v) for v in var]
    for i in range(schedule.T - 1, -1, -1):
        eps = model(x, schedule.timesteps[i].expand(x.shape[0]))
        x0 = torch.add(x, eps, alpha=-s[i]).mul_(1 / a[i]).clamp_(-1, 1)
        x = torch.add(x0.mul_(c0[i]), x, alpha=ct[i])
        if i > 0:
            x.add_(torch.randn(x.shape, generator=generator, device=x.device), alpha=sigma[i])
    return x


def floor_ddim(model, schedule: NoiseSchedule, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The least a clipped-x0 DDIM step (eta 0, eps recomputed from the clipped x0) can do."""
    ab = schedule.numbers["alpha_bars"]
    timesteps = trailing_timesteps(schedule.T, steps)
    for k, t in enumerate(timesteps):
        prev = ab[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        eps = model(x, torch.full((x.shape[0],), t, device=x.device))
        x0 = torch.add(x, eps, alpha=-math.sqrt(1 - ab[t])).mul_(1 / math.sqrt(ab[t])).clamp_(-1, 1)
        eps = torch.add(x, x0, alpha=-math.sqrt(ab[t])).mul_(1 / math.sqrt(1 - ab[t]))
        x = torch.add(eps.mul_(math.sqrt(1 - prev)), x0, alpha=math.sqrt(prev))
    return x


def bench_sample(device: torch.device, repeats: int, ddim_steps: int, T: int) -> str:
    """Microseconds per step of the project's DDPM and DDIM samplers with a trivial model, against
    the floor loops and, if installed, diffusers' DDPMScheduler and DDIMScheduler."""
    model, schedule = Trivial().to(device), NoiseSchedule(T=T).to(device)
    x_T = torch.randn(SAMPLE_SHAPE, device=device)
    generator = torch.Generator(device).manual_seed(0)
    rounds = max(1, T // ddim_steps)  # DDIM runs as many steps per repetition as DDPM does
    arms = {
        ("DDPM", "floor loop"): (lambda: floor_ddpm(model, schedule, x_T, generator), T),
        ("DDPM", "diffusion-cli sample()"): (lambda: sample(model, schedule, SAMPLE_SHAPE, generator=generator,
                                                            x_T=x_T), T),
        ("DDIM", "floor loop"): (lambda: floor_ddim(model, schedule, x_T, ddim_steps), ddim_steps),
        ("DDIM", "diffusion-cli sample()"): (lambda: sample(model, schedule, SAMPLE_SHAPE, sampler="ddim",
                                                            steps=ddim_steps, x_T=x_T), ddim_steps),
    }
    arms.update(diffusers_samplers(model, x_T, generator, T, ddim_steps))
    arms = {name: (function, count) if name[0] == "DDPM" else
            (lambda function=function: [function() for _ in range(rounds)], count * rounds)
            for name, (function, count) in arms.items()}
    with torch.inference_mode():
        seconds = interleaved({name: function for name, (function, _) in arms.items()}, repeats, device)
    rows = []
    for (sampler, name), (_, count) in arms.items():
        micros = [s / count * 1e6 for s in seconds[(sampler, name)]]
        floor = [s / count * 1e6 for s in seconds[(sampler, "floor loop")]]
        rows.append([sampler, name, spread(micros, 1), spread([m / f for m, f in zip(micros, floor)], 2)])
    return table(["sampler", "loop", "us per step", "x floor (target <= 1.1)"], rows)


def diffusers_samplers(model, x_T, generator, T: int, ddim_steps: int) -> dict:
    """diffusers' schedulers driving the same trivial model, configured as our samplers are."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError:
        return {}
    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  clip_sample=True)
    ddpm = DDPMScheduler(**common)
    ddpm.set_timesteps(T)
    ddim = DDIMScheduler(**common, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(ddim_steps)

    def run(scheduler, **options):
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **options).prev_sample
        return x
    return {("DDPM", "diffusers DDPMScheduler"): (lambda: run(ddpm, generator=generator), T),
            ("DDIM", "diffusers DDIMScheduler"): (lambda: run(ddim, eta=0.0, use_clipped_model_output=True),
                                                  ddim_steps)}
