"""Classifier-free guidance (Ho & Salimans 2022) as one wrapper of the denoiser."""

from typing import Callable

import torch
from torch import nn

from .models import null_condition
from .models.text_encoder import padded

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided(model: nn.Module, condition: torch.Tensor | None = None, scale: float = 1.0,
           negative: torch.Tensor | None = None) -> Denoiser:
    """(x_t, t) -> the model's output, conditioned on `condition` (class indices, or caption tokens)
    where given. A scale w != 1 is classifier-free guidance: out_u + w (out_c - out_u), out_u the
    output for the null label or the empty caption, or for `negative` (a negative prompt's tokens)
    where given. The combination is linear, so it is the same in eps, x0 or v."""
    if condition is None:
        return model
    if scale == 1.0:
        return lambda x, t: model(x, t, condition)
    unconditional = negative if negative is not None else null_condition(model, condition)
    if condition.dim() == 2:  # caption tokens: a prompt and a negative prompt of different lengths
        width = max(condition.shape[1], unconditional.shape[1])
        condition, unconditional = padded(condition, width), padded(unconditional, width)
    both = torch.cat([condition, unconditional])

    def guide(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return unconditional + scale * (conditional - unconditional)
    return guide
