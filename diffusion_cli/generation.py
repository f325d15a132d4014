"""Many images from a denoiser: drawn in batches through samplers.sample, from per-image seeds, in
the run's space and decoded from it. Training grids, quality metrics, diffusion-sample and the
benchmarks all draw through sample_images."""

from typing import Iterator

import torch
from torch import nn

from .progress import tqdm

from .images import to_unit
from .samplers import model_device, sample, sampler_from_config
from .schedule import NoiseSchedule
from .spaces import PixelSpace


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each image's initial noise in sample_images."""
    return torch.randint(2 ** 62, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def sample_images(model: nn.Module, schedule: NoiseSchedule, sampler_cfg, shape, **options) -> torch.Tensor:
    """`shape[0]` images in [0, 1] on the CPU: every batch of sample_batches, in order."""
    return torch.cat([images for _, images in sample_batches(model, schedule, sampler_cfg, shape, **options)])


def sample_batches(model: nn.Module, schedule: NoiseSchedule, sampler_cfg, shape, *, batch_size: int,
                   seed: int, labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
                   negative: torch.Tensor | None = None, space=None, progress: bool = False,
                   done: frozenset = frozenset(), guide: nn.Module | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(index of the first image, images in [0, 1] on the CPU) for each batch of `shape[0]` images,
    drawn `batch_size` at a time with the sampler config, leaving out the batches whose first
    index is in `done` (drawn before: bulk sampling resumes). `labels` (N,) for a
    class-conditional model, (N, L) caption tokens for a text-conditioned one; `negative` (N, L)
    a negative prompt's tokens; `guide` autoguidance's weaker model (by guidance_scale). In a
    `space` (spaces.py; default the pixels of `shape`) the model draws its samples of `shape`,
    clipped where the space clips, and the space decodes them.
    Training grids, quality metrics and diffusion-sample all draw through here.

    All noise is drawn on the model's device, one batch at a time: image i's initial noise from
    a generator seeded with the i-th seed that `seed` gives, so deterministic samplers (DDIM,
    eta 0) give the same image for the same seed whatever batch_size splits the work; the
    stochastic steps' noise continues that generator, so a batch depends on its own images'
    seeds only. The same seed gives the same images on the same kind of device; a GPU's
    generator differs from the CPU's, so their images do too."""
    device = model_device(model, schedule)
    seeds = image_seeds(seed, shape[0])
    generator = torch.Generator(device)
    starts = range(0, shape[0], batch_size)
    space = space or PixelSpace(shape[1:])
    sampler = sampler_from_config(sampler_cfg, clip_x0=sampler_cfg["clip_x0"] and space.clip)
    left = [start for start in starts if start not in done]
    for start in tqdm(left, desc="batches", total=len(starts), initial=len(starts) - len(left),
                      disable=not progress or len(starts) == 1):
        x_T = torch.stack([torch.randn(tuple(shape[1:]), generator=generator.manual_seed(s), device=device)
                           for s in seeds[start:start + batch_size]])
        chunk = sample(model, schedule, x_T.shape, sampler=sampler, generator=generator, x_T=x_T,
                       progress=progress, clamp=space.clip, guidance_scale=guidance_scale, guide=guide,
                       labels=None if labels is None else labels[start:start + batch_size],
                       negative=None if negative is None else negative[start:start + batch_size])
        yield start, to_unit(space.decode(chunk)).cpu()
