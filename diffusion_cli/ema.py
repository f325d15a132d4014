"""An exponential moving average of the model's weights: the weights sampling uses."""

import copy

import torch
from torch import nn


class EMA:
    """ema = decay_n * ema + (1 - decay_n) * weights after every optimizer step n, with the warm-up
    decay_n = min(decay, (1 + n) / (10 + n)): early on the average forgets the random
    initialisation fast, later it averages over about 1 / (1 - decay) steps. Buffers are copied."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, weight: torch.Tensor | None = None) -> None:
        """`weight` (a 0-dim tensor on the device, 0 or 1) turns the update off without a host
        sync: the training step passes 0 for a skipped step. ema += rate (weights - ema) with
        sub, mul and add, whose multiply has a Tensor overload: a tensor given to _foreach_lerp_
        would take its Scalar overload and be read back to the host."""
        rate = 1 - min(self.decay, (1 + step) / (10 + step))
        averages = list(self.model.parameters())
        delta = torch._foreach_sub(list(model.parameters()), averages)
        torch._foreach_mul_(delta, rate if weight is None else weight * rate)
        torch._foreach_add_(averages, delta)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)
