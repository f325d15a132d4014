"""Samplers as plain functions: a small `*_step` holding the math, and a loop around it."""

import torch
from torch import nn
from tqdm.auto import tqdm

from .images import to_unit
from .schedule import NoiseSchedule


def randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device and moved to `device`: a seeded CPU
    generator gives the same images on the CPU and on a GPU."""
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)


def ddpm_step(schedule: NoiseSchedule, eps: torch.Tensor, i: int, x: torch.Tensor,
              noise: torch.Tensor | None, clip_x0: bool = True) -> torch.Tensor:
    """One ancestral step x_i -> x_{i-1} through x0 and the posterior q(x_{i-1} | x_i, x0) (Ho et
    al. eq. 7). With clip_x0=False this equals Algorithm 2. At i = 0 the variance is 0: no noise."""
    index = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
    x0 = schedule.predict_x0(x, index, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, variance = schedule.posterior_mean_variance(x0, x, index)
    if i == 0 or noise is None:
        return mean
    return mean + variance.sqrt() * noise


def ddpm(model: nn.Module, schedule: NoiseSchedule, x: torch.Tensor, *, clip_x0: bool = True,
         generator: torch.Generator | None = None, return_all_steps: bool = False,
         progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from x = x_T over every step of `schedule` (respaced or not)."""
    trajectory = [x]
    for i in tqdm(range(schedule.T - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
        eps = model(x, schedule.timesteps[i].expand(x.shape[0]))
        noise = randn(x.shape, generator, x.device) if i > 0 else None
        x = ddpm_step(schedule, eps, i, x, noise, clip_x0)
        if return_all_steps:
            trajectory.append(x)
    return torch.stack(trajectory) if return_all_steps else x


SAMPLERS = {"ddpm": ddpm}


@torch.no_grad()
def sample(model: nn.Module, schedule: NoiseSchedule, shape, *, sampler: str = "ddpm",
           steps: int | None = None, clip_x0: bool = True, generator: torch.Generator | None = None,
           device=None, return_all_steps: bool = False, progress: bool = False) -> torch.Tensor:
    """Draw images of `shape` (B, C, H, W) from the model, in [-1, 1].

    steps: sampling steps, default all T; fewer use respaced betas (Nichol & Dhariwal 2021).
    return_all_steps: also return every intermediate x, as a (steps + 1, B, ...) tensor from x_T.
    The model and schedule must be on `device` (default: the model's device).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    x = randn(shape, generator, device)
    was_training = model.training
    model.eval()
    try:
        result = SAMPLERS[sampler](model, schedule.respaced(steps or schedule.T), x, clip_x0=clip_x0,
                                   generator=generator, return_all_steps=return_all_steps,
                                   progress=progress)
    finally:
        model.train(was_training)
    return result if return_all_steps else result.clamp(-1, 1)


def sample_images(model: nn.Module, schedule: NoiseSchedule, sampler_cfg, shape, *, batch_size: int,
                  seed: int, progress: bool = False) -> torch.Tensor:
    """`shape[0]` images in [0, 1] on the CPU, drawn `batch_size` at a time with the sampler config
    (kind, steps, clip_x0) from one CPU generator seeded with `seed`: the same seed gives the same
    images on any device. Training grids and diffusion-sample both draw through here."""
    generator = torch.Generator().manual_seed(seed)
    total, chunks = shape[0], []
    batches = range(0, total, batch_size)
    for start in tqdm(batches, desc="batches", disable=not progress or len(batches) == 1):
        chunk = sample(model, schedule, (min(batch_size, total - start), *shape[1:]),
                       sampler=sampler_cfg.kind, steps=sampler_cfg.steps, clip_x0=sampler_cfg.clip_x0,
                       generator=generator, progress=progress)
        chunks.append(to_unit(chunk).cpu())
    return torch.cat(chunks)
