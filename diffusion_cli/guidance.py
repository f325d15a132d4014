"""Classifier-free guidance (Ho & Salimans 2022) as one wrapper of the denoiser."""

from typing import Callable

import torch
from torch import nn

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided(model: nn.Module, condition: torch.Tensor | None = None, unconditional: torch.Tensor | None = None,
           scale: float = 1.0) -> Denoiser:
    """(x_t, t) -> the model's output, conditioned on `condition` where given. A scale w != 1 is
    classifier-free guidance: out_u + w (out_c - out_u), out_u the output for `unconditional` (the
    null condition, or a negative prompt, as wide as `condition`: conditions.pair gives both), in
    one forward pass of both. The combination is linear, so it is the same in eps, x0 or v."""
    if condition is None:
        return model
    if scale == 1.0:
        return lambda x, t: model(x, t, condition)
    both = torch.cat([condition, unconditional])

    def guide(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return unconditional + scale * (conditional - unconditional)
    return guide
