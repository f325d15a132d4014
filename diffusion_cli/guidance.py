"""Guidance as one wrapper of the denoiser: classifier-free guidance (Ho & Salimans 2022), which
needs a condition, and autoguidance (Karras et al. 2024), which guides a model by a weaker version
of itself and needs none."""

from typing import Callable

import torch
from torch import nn

Denoiser = Callable[..., torch.Tensor]  # (x_t, t) -> output; self-conditioned: also x0_hint=
# diffusion-sample guidance=: cfg (classifier-free, with a label or prompt) | auto (the run's guide)
GUIDANCE = ("cfg", "auto")


def guided(model: nn.Module, condition: torch.Tensor | None = None, unconditional: torch.Tensor | None = None,
           scale: float = 1.0) -> Denoiser:
    """(x_t, t) -> the model's output, conditioned on `condition` where given. A scale w != 1 is
    classifier-free guidance: out_u + w (out_c - out_u), out_u the output for `unconditional` (the
    null condition, or a negative prompt, as wide as `condition`: conditions.pair gives both), in
    one forward pass of both. The combination is linear, so it is the same in eps, x0 or v. A
    self-conditioned model's x0_hint= goes to both."""
    if condition is None:
        return model
    if scale == 1.0:
        return lambda x, t, **hint: model(x, t, condition, **hint)
    both = torch.cat([condition, unconditional])

    def guide(x: torch.Tensor, t: torch.Tensor, **hint) -> torch.Tensor:
        hint = {key: torch.cat([value, value]) for key, value in hint.items()}
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), both, **hint).chunk(2)
        return unconditional + scale * (conditional - unconditional)
    return guide


def autoguided(model: nn.Module, guide: nn.Module, condition: torch.Tensor | None = None,
               scale: float = 1.0) -> Denoiser:
    """(x_t, t) -> autoguidance: guide + w (model - guide), both on the same condition (or none),
    `guide` an early snapshot of the same run (trainer.guide_at). w = 1 is the model alone, w = 0
    the guide alone; w > 1 pushes the samples away from where the weaker model errs."""
    if scale == 1.0:
        return guided(model, condition)

    def guide_by_weaker(x: torch.Tensor, t: torch.Tensor, **hint) -> torch.Tensor:
        weaker = guide(x, t, condition, **hint)
        return weaker + scale * (model(x, t, condition, **hint) - weaker) if scale else weaker
    return guide_by_weaker
