"""The sampler contract and its one loop. A sampler is a small dataclass (its fields are its config
keys, `conf/sampler/<kind>.yaml` their defaults and docs) with two methods:

- `timesteps(schedule, steps)`: the model's timesteps, x_T's first;
- `step(x, t, t_next, denoised, run)`: x at t -> x at t_next (-1: the clean image), from the
  model's estimate at (x, t) (evaluated when the step first reads it) and, where it needs them,
  `run.noise()` (standard normal, from the run's generator) and `run.denoise(x, t)` (another
  model evaluation).

`draw` runs the loop: the timesteps, then a step from each to the next (feeding a
self-conditioned model the x0 estimate of its last evaluation). Subclasses register
themselves by `kind`; `samplers/__init__.py` imports every module of the package, so a new sampler
is its module plus its YAML.
"""

from dataclasses import dataclass
from functools import cached_property
from typing import Callable, ClassVar, NamedTuple

import torch

from ..guidance import Denoiser
from ..objectives import X0, Objective, objective
from ..progress import tqdm
from ..schedule import NoiseSchedule
from ..schema import check

FROM_X0 = X0()  # eps from a clipped x0 (Denoised.eps)

REGISTRY: dict[str, type["Sampler"]] = {}


def clamped(x0: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """x0 clipped to [-1, 1]: in place when it is a tensor of the step's own (one pass less),
    a copy when it is the caller's model output (an x0-predicting model)."""
    return x0.clamp(-1, 1) if x0 is output else x0.clamp_(-1, 1)


class Denoised:
    """The model's estimate at (x, t), evaluated when a step first asks for it: x0 (clipped to
    [-1, 1] with clip_x0) and eps. With clipping, eps is recomputed from the clipped x0 (diffusers'
    use_clipped_model_output=True), so that a step stays consistent with x_t."""

    def __init__(self, model: Callable[[], torch.Tensor], schedule: NoiseSchedule, index: int,
                 x: torch.Tensor, objective: Objective, clip_x0: bool,
                 seen: Callable[[torch.Tensor], None] = lambda x0: None):
        self.model, self.schedule, self.index, self.x = model, schedule, index, x
        self.objective, self.clip_x0 = objective, clip_x0
        self.seen = seen  # told the x0 estimate (draw: self-conditioning's next hint)

    @cached_property
    def estimates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) as the model's output implies them, x0 clipped with clip_x0."""
        output = self.model()
        eps, x0 = self.objective.eps_and_x0(self.schedule, self.x, self.index, output)
        x0 = clamped(x0, output) if self.clip_x0 else x0
        self.seen(x0)
        return eps, x0

    @property
    def x0(self) -> torch.Tensor:
        return self.estimates[1]

    @cached_property
    def eps(self) -> torch.Tensor:
        eps, x0 = self.estimates
        return FROM_X0.eps_and_x0(self.schedule, self.x, self.index, x0)[0] if self.clip_x0 else eps


class Run(NamedTuple):
    """What a step may draw on besides the model's estimate at (x, t)."""
    denoise: Callable[[torch.Tensor, int], Denoised]   # another model evaluation at (x, t)
    noise: Callable[[], torch.Tensor]                   # standard normal noise shaped like x


@dataclass
class Sampler:
    """The fields every sampler has; subclasses add theirs and set `kind`."""
    kind: ClassVar[str] = ""
    evaluations_per_step: ClassVar[int] = 1  # model evaluations per step, at most
    steps: int | None = check(lambda v: v is None or v >= 1, "null (all T) or an integer >= 1", None)
    clip_x0: bool = True  # clip the x0 estimate to [-1, 1] at every evaluation

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.kind:
            REGISTRY[cls.kind] = cls

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        raise NotImplementedError

    def start(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        """Set up one run (a sampler with state resets it here); its timesteps."""
        self.schedule = schedule
        return self.timesteps(schedule, steps)

    def coefficients(self, t: int) -> tuple[NoiseSchedule, int]:
        """The schedule and index whose coefficients hold at the model's timestep t."""
        return self.schedule, t

    def step(self, x: torch.Tensor, t: int, t_next: int, denoised: Denoised, run: Run) -> torch.Tensor:
        raise NotImplementedError


def randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device and moved to `device` (a no-op when
    the generator is on `device`, as sample_images' generators are)."""
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)


def draw(sampler: Sampler, denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, *,
         prediction: str, generator: torch.Generator | None = None, progress: bool = False,
         trajectory: bool = False, self_condition: bool = False) -> torch.Tensor:
    """The one sampling loop: from x = x_T over the sampler's timesteps to the sample (or, with
    `trajectory`, every state from x_T on, stacked). `denoise` is the model, or a guidance wrapper
    of it, as (x_t, t) -> output of the `prediction` kind; with `self_condition` it also takes the
    x0 estimate of the evaluation before (none at the first) as x0_hint=."""
    timesteps = sampler.start(schedule, sampler.steps or schedule.T) + [-1]
    output_kind = objective(prediction)
    hint = {}  # self-conditioning: {"x0_hint": the last evaluation's x0}
    remember = (lambda x0: hint.update(x0_hint=x0)) if self_condition else (lambda x0: None)

    def evaluate(x: torch.Tensor, t: int) -> Denoised:
        def model() -> torch.Tensor:  # fp32 under autocast too
            t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            return denoise(x, t_batch, **hint).to(x.dtype)
        return Denoised(model, *sampler.coefficients(t), x, output_kind, sampler.clip_x0, remember)

    states = [x]
    for t, t_next in zip(tqdm(timesteps[:-1], desc="sampling", disable=not progress, leave=False), timesteps[1:]):
        x = sampler.step(x, t, t_next, evaluate(x, t), Run(evaluate, lambda: randn(x.shape, generator, x.device)))
        if trajectory:
            states.append(x)
    return torch.stack(states) if trajectory else x


@dataclass
class TrailingSampler(Sampler):
    """A sampler over trailing-spaced timesteps whose steps add `eta`-scaled noise (DDIM, DPM-Solver++)."""
    eta: float = check(lambda v: 0 <= v <= 1, "a number from 0 (deterministic) to 1", 0.0)

    def timesteps(self, schedule: NoiseSchedule, steps: int) -> list[int]:
        return trailing_timesteps(schedule.T, steps)


# Timestep spacings shared by several samplers.

def trailing_timesteps(T: int, steps: int) -> list[int]:
    """"Trailing" spacing (diffusers' timestep_spacing="trailing"): T-1, T-1-T/steps, ...; the step
    after the last one goes to alpha_bar = 1."""
    return [round(T - k * T / steps) - 1 for k in range(steps)]


SIGMA_MAX = 80.0  # Karras et al.'s top noise level: above it the ODE is a straight line


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> list[int]:
    """`steps` timesteps from T-1 down to 0 whose noise levels s = sigma / alpha follow Karras et al.
    2022 (eq. 5): evenly spaced in s^(1/rho) from min(s at T-1, SIGMA_MAX) to s at 0, so the steps
    shrink with the noise level; the first is T-1 itself, where sampling starts. Each level is
    rounded (in log s) to the nearest training timestep, so the model sees only timesteps it was
    trained on. Uniform timesteps would take the first step from s in the thousands (cosine) or
    hundreds (linear) to a few in one go: too far for an ODE step."""
    s = noise_levels(schedule)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    top, bottom = min(s[-1].item(), SIGMA_MAX) ** (1 / rho), s[0] ** (1 / rho)
    targets = (top + ramp * (bottom - top)) ** rho
    return sorted(set([schedule.T - 1] + nearest_timesteps(schedule, targets)[1:]), reverse=True)


def noise_levels(schedule: NoiseSchedule) -> torch.Tensor:
    """s_t = sigma_t / alpha_t of every timestep, in float64 on the CPU."""
    return (schedule.sqrt_one_minus_alpha_bars.cpu() / schedule.sqrt_alpha_bars.cpu()).double()  # MPS: no float64


def nearest_timesteps(schedule: NoiseSchedule, levels: torch.Tensor) -> list[int]:
    """The training timestep whose noise level is nearest (in log s) to each of `levels`."""
    return (noise_levels(schedule).log()[None] - levels.log()[:, None]).abs().argmin(1).tolist()


def alpha_sigma(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)): x_t = alpha x0 + sigma eps. t = -1 is the clean
    image, (1, 0)."""
    if t < 0:
        return 1.0, 0.0
    return (schedule.numbers["sqrt_alpha_bars"][t], schedule.numbers["sqrt_one_minus_alpha_bars"][t])


def level(schedule: NoiseSchedule, t: int) -> float:
    """The noise level s = sigma / alpha at t (0 for the clean image, t = -1)."""
    alpha, sigma = alpha_sigma(schedule, t)
    return sigma / alpha
