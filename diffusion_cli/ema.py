"""Exponential moving averages of the model's weights: the weights sampling uses. Two kinds: a fixed
decay (with a warm-up), and EDM2's power EMA (Karras et al. 2024), whose window grows with the run
and is set by its relative length sigma_rel, so that a short run averages over its own scale."""

import copy

import numpy as np
import torch
from torch import nn


MAX_SIGMA_REL = 12 ** -0.5  # gamma = 0: the plain average of the whole run, the longest profile


def power_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power EMA whose averaging profile, proportional to tau^gamma over
    the steps tau in [0, t], has the standard deviation sigma_rel * t: sigma_rel^2 =
    (gamma + 1) / ((gamma + 2)^2 (gamma + 3)), a cubic in gamma (its largest real root)."""
    inverse = sigma_rel ** -2
    return float(np.roots([1, 7, 16 - inverse, 12 - inverse]).real.max())


class EMA:
    """ema = (1 - rate_n) * ema + rate_n * weights after every optimizer step n = 1, 2, ...

    Fixed decay d: rate_n = 1 - min(d, (1 + n) / (10 + n)): early on the average forgets the random
    initialisation fast, later it averages over about 1 / (1 - d) steps.
    Power EMA (sigma_rel): rate_n = 1 - (1 - 1/n)^(gamma + 1), which weighs step k by
    k^(gamma+1) - (k-1)^(gamma+1): the profile tau^gamma of power_gamma, exactly, at every n.
    Buffers are copied."""

    def __init__(self, model: nn.Module, decay: float = 0.0, sigma_rel: float | None = None):
        self.decay, self.sigma_rel = decay, sigma_rel
        self.gamma = power_gamma(sigma_rel) if sigma_rel is not None else None
        self.model = frozen_copy(model)

    def rate(self, step: int) -> float:
        if self.gamma is None:
            return 1 - min(self.decay, (1 + step) / (10 + step))
        return 1 - (1 - 1 / step) ** (self.gamma + 1)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int, weight: torch.Tensor | None = None) -> None:
        """`weight` (a 0-dim tensor on the device, 0 or 1) turns the update off without a host
        sync: the training step passes 0 for a skipped step. ema += rate (weights - ema) with
        sub, mul and add, whose multiply has a Tensor overload: a tensor given to _foreach_lerp_
        would take its Scalar overload and be read back to the host."""
        rate = self.rate(step)
        averages = list(self.model.parameters())
        delta = torch._foreach_sub(list(model.parameters()), averages)
        torch._foreach_mul_(delta, rate if weight is None else weight * rate)
        torch._foreach_add_(averages, delta)
        for average, buffer in zip(self.model.buffers(), model.buffers()):
            average.copy_(buffer)


def profile_key(sigma_rel: float) -> str:
    """The checkpoint key of the power EMA of sigma_rel (diffusion-sample ema=SIGMA_REL reads it)."""
    return f"ema_{sigma_rel:g}"


def frozen_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model).eval().requires_grad_(False)


class Averages:
    """What a run keeps of its weights besides the weights: the EMA that sampling uses
    (trainer.ema_decay, or ema_sigma_rel), the power EMAs of trainer.ema_profiles (so that the EMA
    length can be chosen after training), and autoguidance's guide: the sampling weights at
    trainer.guide_at of the run, an early and weaker version of the model (Karras et al. 2024)."""

    def __init__(self, model: nn.Module, tc):
        self.ema = EMA(model, tc.ema_decay, tc.ema_sigma_rel) if tc.ema_decay > 0 or tc.ema_sigma_rel else None
        self.profiles = {profile_key(s): EMA(model, sigma_rel=s) for s in tc.ema_profiles}
        self.guide_step = round(tc.guide_at * tc.max_steps) if tc.guide_at > 0 else 0
        self.guide = None

    def update(self, model: nn.Module, step: int, weight: torch.Tensor | None = None) -> None:
        for average in ([self.ema] if self.ema else []) + list(self.profiles.values()):
            average.update(model, step, weight)
        if step == self.guide_step:
            self.guide = frozen_copy(self.ema.model if self.ema else model)

    def state(self) -> dict:
        """The checkpoint's entries: ema, ema_<sigma_rel> and guide, those the run has."""
        state = {key: average.model.state_dict() for key, average in self.profiles.items()}
        if self.ema:
            state["ema"] = self.ema.model.state_dict()
        if self.guide is not None:
            state["guide"] = self.guide.state_dict()
        return state

    def restore(self, state: dict, model: nn.Module) -> None:
        """From a checkpoint: an average it lacks (an older run's) starts from the weights."""
        for key, average in ([("ema", self.ema)] if self.ema else []) + list(self.profiles.items()):
            average.model.load_state_dict(state.get(key, state["model"]))
        if "guide" in state:
            self.guide = frozen_copy(model)
            self.guide.load_state_dict(state["guide"])
