"""The denoiser's objectives (conf/objective/): what the network outputs, eps (Ho et al. 2020), x0,
v (Salimans & Ho 2022) or the flow velocity (rectified flow), and how its loss is weighted over
the timesteps. An objective gives the target for x_t = q_sample(x0, t, eps), turns a model's
output back into (eps, x0) for the samplers, and weighs each sample's MSE (none, or min-SNR:
Hang et al. 2023)."""

from dataclasses import dataclass
from typing import ClassVar

import torch

from .schedule import NoiseSchedule, combine
from .schema import one_of

MIN_SNR_GAMMA = 5.0
WEIGHTINGS = ("none", "min_snr")


@dataclass
class Objective:
    """One kind of network output. Subclasses give the target, the inverse and the min-SNR
    weight min(SNR, gamma) / SNR carried over to their output (`min_snr`)."""
    weighting: str = "none"
    prediction: ClassVar[str]

    def target(self, schedule: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor
               ) -> torch.Tensor:
        raise NotImplementedError

    def eps_and_x0(self, schedule: NoiseSchedule, x_t: torch.Tensor, t, output: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) that the model's `output` at (x_t, t) implies. Unclipped."""
        raise NotImplementedError

    def min_snr(self, clipped: torch.Tensor, snr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight(self, schedule: NoiseSchedule, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights at timesteps t."""
        if self.weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = schedule.snr[t]
        return self.min_snr(snr.clamp(max=MIN_SNR_GAMMA), snr)

    def loss(self, model, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator,
             cond: torch.Tensor | None = None, drop_prob: float = 0.0, null: torch.Tensor | None = None
             ) -> torch.Tensor:
        """The weighted MSE between the model's output and its target on a batch, one timestep t
        per sample (as the schedule draws them). A conditional model sees the unconditional input
        `null` (the null label, or the empty caption's tokens) instead of `cond` with probability
        drop_prob, which trains the unconditional model that guidance needs."""
        t = schedule.training_timesteps(x0.shape[0], generator, x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        if cond is not None:
            dropped = torch.rand(cond.shape[:1], generator=generator, device=x0.device) < drop_prob
            cond = torch.where(dropped.view(-1, *[1] * (cond.dim() - 1)), null, cond)
        x_t = schedule.q_sample(x0, t, noise)
        output = model(x_t, t, cond, **self.hint(model, schedule, x_t, t, cond, generator))
        errors = (output - self.target(schedule, x0, t, noise)).pow(2).flatten(1).mean(1)
        return (self.weight(schedule, t) * errors).mean()

    def hint(self, model, schedule: NoiseSchedule, x_t: torch.Tensor, t: torch.Tensor,
             cond: torch.Tensor | None, generator: torch.Generator) -> dict:
        """Self-conditioning (Chen et al. 2022), for a model with `self_condition`: half the samples
        see the model's own x0 estimate at (x_t, t), without its gradient, as `x0_hint`, the others
        zeros; so the model learns to refine the estimate that sampling feeds back from the step
        before. The estimate's pass skips a DDP wrapper: it needs no gradients to synchronise."""
        network = getattr(model, "module", model)
        if not getattr(network, "self_condition", False):
            return {}
        chosen = torch.rand(x_t.shape[:1], generator=generator, device=x_t.device) < 0.5
        hint = torch.zeros_like(x_t)
        if chosen.any():
            x, t = x_t[chosen], t[chosen]
            with torch.no_grad():
                estimate = network(x, t, None if cond is None else cond[chosen])
                hint[chosen] = self.eps_and_x0(schedule, x, t, estimate)[1].to(hint.dtype)
        return {"x0_hint": hint}


class Eps(Objective):
    prediction = "eps"

    def target(self, schedule, x0, t, noise):
        return noise

    def eps_and_x0(self, schedule, x_t, t, output):
        return output, schedule.predict_x0(x_t, t, output)

    def min_snr(self, clipped, snr):
        return clipped / snr


class X0(Objective):
    prediction = "x0"

    def target(self, schedule, x0, t, noise):
        return x0

    def eps_and_x0(self, schedule, x_t, t, output):
        a, s = schedule.signal_and_noise(t, x_t)
        return combine(1 / s, x_t, -a / s, output), output

    def min_snr(self, clipped, snr):
        return clipped


class V(Objective):
    """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0: with a^2 + s^2 = 1 both x0 and eps are
    one combination of x_t and v away."""
    prediction = "v"

    def target(self, schedule, x0, t, noise):
        a, s = schedule.signal_and_noise(t, x0)
        return combine(a, noise, -s, x0)

    def eps_and_x0(self, schedule, x_t, t, output):
        a, s = schedule.signal_and_noise(t, x_t)
        return combine(s, x_t, a, output), combine(a, x_t, -s, output)

    def min_snr(self, clipped, snr):
        return clipped / (snr + 1)


def flow_time(schedule: NoiseSchedule, t, x: torch.Tensor):
    """(u, 1 / (a + s)) at t: the rectified-flow time u = s / (a + s) whose path x_u = (1 - u) x0 +
    u eps is the timestep's x_t = a x0 + s eps divided by a + s (the same signal-to-noise ratio)."""
    a, s = schedule.signal_and_noise(t, x)
    return s / (a + s), 1 / (a + s)


class Flow(Objective):
    """Rectified flow (Liu et al. 2022; Lipman et al. 2022; SD3: Esser et al. 2024): the network
    predicts the velocity eps - x0 of the straight path x_u = (1 - u) x0 + u eps. On any schedule
    the path is x_t / (a + s) at u = s / (a + s), so the samplers and schedules stay as they are; the
    network sees x_t itself, of unit variance, as every objective's network does (EDM's c_in),
    and schedule=flow spaces the timesteps evenly in u (with time_density=logit_normal: SD3's)."""
    prediction = "flow"

    def target(self, schedule, x0, t, noise):
        return noise - x0

    def eps_and_x0(self, schedule, x_t, t, output):
        u, scale = flow_time(schedule, t, x_t)
        return combine(scale, x_t, 1 - u, output), combine(scale, x_t, -u, output)

    def min_snr(self, clipped, snr):
        # eps's error is (1 - u) = sqrt(snr) / (sqrt(snr) + 1) times the velocity's.
        return clipped / (snr.sqrt() + 1) ** 2


OBJECTIVES = {kind.prediction: kind for kind in (Eps, X0, V, Flow)}


def objective(prediction: str, weighting: str = "none") -> Objective:
    """The objective of a model's `prediction` kind (eps | x0 | v | flow)."""
    if prediction not in OBJECTIVES:
        raise ValueError(f"prediction={prediction!r} is unknown; choose one of: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[prediction](weighting)


# The objective group's schema (conf/objective/<prediction>.yaml holds the values and their docs).
@dataclass
class ObjectiveConfig:
    prediction: str = one_of(OBJECTIVES)
    weighting: str = one_of(WEIGHTINGS)
