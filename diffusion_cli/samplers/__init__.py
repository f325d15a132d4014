"""The samplers, one module each (samplers/base.py has the contract and the one loop), and
`sample`, the public way in: a batch of x_T to samples (generation.sample_images draws many images
in batches through it)."""

import importlib
import pkgutil
from contextlib import nullcontext
from dataclasses import fields, replace

import torch
from torch import nn

from ..conditions import condition_of
from ..guidance import autoguided, guided
from ..runtime import eval_mode
from ..schedule import NoiseSchedule
from .base import REGISTRY, Sampler, draw, randn

for _module in pkgutil.iter_modules(__path__):  # each module registers its sampler
    importlib.import_module(f"{__name__}.{_module.name}")

SAMPLERS = REGISTRY  # kind -> class, e.g. SAMPLERS["ddim"](steps=50, eta=0.0)


def sampler_from_config(sampler_cfg, **changes) -> Sampler:
    """The sampler a `sampler` config group (or a dict of its keys) describes, with `changes`."""
    cls = SAMPLERS[sampler_cfg["kind"]]
    options = {f.name: sampler_cfg[f.name] for f in fields(cls) if f.name in sampler_cfg}
    return replace(cls(**options), **changes)


def evaluations(sampler_cfg, T: int) -> int:
    """Model evaluations per image of a sampler config, at most (Heun's last step has one)."""
    sampler = sampler_from_config(sampler_cfg)
    return sampler.evaluations_per_step * (sampler.steps or T)


def describe(sampler_cfg, T: int) -> str:
    """A sampler config in words: 'dpmpp_2m, 10 steps, eta 1.0'."""
    eta = sampler_cfg.get("eta")
    return f"{sampler_cfg['kind']}, {sampler_cfg['steps'] or T} steps" + (f", eta {eta}" if eta else "")


def model_device(model: nn.Module, schedule: NoiseSchedule) -> torch.device:
    """Where the model's weights are; the schedule's device for a model without parameters."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else schedule.betas.device


# The keywords sample() took before the sampler contract, still accepted (its docstring says each).
LEGACY = ("clip_x0", "x_T", "return_all_steps", "progress", "labels", "guidance_scale", "negative",
          "prediction", "clamp")


@torch.inference_mode()
def sample(model: nn.Module, schedule: NoiseSchedule, shape, *, sampler: str | Sampler = "ddpm",
           steps: int | None = None, eta: float | None = None, generator: torch.Generator | None = None,
           device=None, guide: nn.Module | None = None, **options) -> torch.Tensor:
    """Draw images of `shape` (B, C, H, W) from the model, in [-1, 1].

    sampler: a kind of SAMPLERS ("ddpm", "ddim", "dpmpp_2m", "heun", "euler") or a Sampler object
    (which carries its own options, e.g. DDIM(steps=50, eta=1.0)); steps: sampling steps, default
    the sampler's, else all T (DDPM with fewer uses respaced betas, the others their own spacing);
    eta: the noise of DDIM and DPM-Solver++ (0 = deterministic); generator: the initial noise and
    each step's; device: default the model's, else the schedule's; guide: autoguidance's weaker
    model (guidance.autoguided, by guidance_scale, on the labels where given).

    options, as before the sampler contract: clip_x0 (default true), x_T (the initial noise),
    return_all_steps (every state from x_T, stacked), progress, labels / guidance_scale / negative
    (classifier-free guidance: see guidance.guided), prediction (default the model's), clamp (the
    result to [-1, 1]; default true).
    """
    unknown = set(options) - set(LEGACY)
    if unknown:
        raise TypeError(f"sample() got unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
        sampler = SAMPLERS[sampler]()
    changes = {"steps": steps, "eta": eta, "clip_x0": options.get("clip_x0")}
    sampler = replace(sampler, **{key: value for key, value in changes.items()
                                  if value is not None and key in {f.name for f in fields(sampler)}})
    device = torch.device(device) if device is not None else model_device(model, schedule)
    x_T = options.get("x_T")
    x = randn(shape, generator, device) if x_T is None else x_T.to(device)
    labels, negative, scale = options.get("labels"), options.get("negative"), options.get("guidance_scale", 1.0)
    with eval_mode(model), eval_mode(guide) if guide is not None else nullcontext():
        denoise = model
        if guide is not None:
            denoise = autoguided(model, guide, None if labels is None else labels.to(device), scale)
        elif labels is not None:  # guidance pairs the condition with the null one (or a negative prompt)
            labels, unconditional = labels.to(device), None
            if scale != 1.0:
                negative = None if negative is None else negative.to(device)
                labels, unconditional = condition_of(model).pair(labels, negative)
            denoise = guided(model, labels, unconditional, scale)
        prediction = options.get("prediction") or getattr(model, "prediction", "eps")
        result = draw(sampler, denoise, schedule, x, prediction=prediction, generator=generator,
                      progress=options.get("progress", False), trajectory=options.get("return_all_steps", False),
                      self_condition=getattr(model, "self_condition", False))
    return result if options.get("return_all_steps") or not options.get("clamp", True) else result.clamp(-1, 1)
