"""The DDPM noise schedule (Ho et al. 2020): every coefficient in one place, computed once.

Timesteps are 0-based, t = 0 ... T-1, as in diffusers. Every method takes `t` as a LongTensor of
shape (B,), one timestep per sample, or as an int, one timestep for the whole batch (the samplers'
steps), and works for x of any shape (B, ...).
"""

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from omegaconf import MISSING

from .schema import check, one_of, plain

# The schedule group's kinds: each one's keys (conf/schedule/<kind>.yaml has their defaults and docs).
def _steps(): return check(lambda v: v >= 1, "an integer >= 1")
def _beta(): return check(lambda v: 0 < v < 1, "a number strictly between 0 and 1", MISSING)


TIME_DENSITIES = ("uniform", "logit_normal")


@dataclass
class Cosine:
    T: int = _steps()
    time_density: str = one_of(TIME_DENSITIES)
    logit_mean: float = plain()  # any number
    logit_std: float = check(lambda v: v > 0, "a number > 0, e.g. 1.0", MISSING)


@dataclass
class Linear(Cosine):
    beta_start: float = _beta()
    beta_end: float = _beta()


@dataclass
class EDM:
    T: int = _steps()
    sigma_min: float = check(lambda v: v > 0, "a number > 0, e.g. 0.002")
    sigma_max: float = check(lambda v: v > 0, "a number > 0, e.g. 80")
    rho: float = check(lambda v: v > 0, "a number > 0, e.g. 7")
    p_mean: float = field()  # any number
    p_std: float = check(lambda v: v > 0, "a number > 0, e.g. 1.2")


@dataclass
class Flow(Cosine):
    """schedule=flow: its keys are cosine's."""


SCHEDULES = {"linear": Linear, "cosine": Cosine, "edm": EDM, "flow": Flow}
SCHEDULE_KINDS = tuple(SCHEDULES)


def make_betas(kind: str, T: int, beta_start: float | None = None, beta_end: float | None = None
               ) -> torch.Tensor:
    """The betas of a schedule, in float64.

    linear: evenly spaced from beta_start to beta_end (Ho et al. 2020).
    cosine: alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2) with s = 0.008, betas = 1 -
    alpha_bar(t+1)/alpha_bar(t) capped at 0.999 (Nichol & Dhariwal 2021); beta_start/end unused.
    flow: the straight path x_u = (1 - u) x0 + u eps at u = (t + 1) / (T + 1), evenly spaced in
    u short of pure noise, as the variance-preserving x_t = x_u (a + s): alpha_bar = (1 - u)^2 /
    ((1 - u)^2 + u^2) (rectified flow's time, Liu et al. 2022).
    """
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if kind == "cosine":
        s = 0.008
        f = torch.cos((torch.arange(T + 1, dtype=torch.float64) / T + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - f[1:] / f[:-1]).clamp(max=0.999)
    if kind == "flow":
        u = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
        alpha_bars = (1 - u) ** 2 / ((1 - u) ** 2 + u ** 2)
        return 1 - alpha_bars / torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    raise ValueError(f"schedule.kind={kind!r} has no beta formula; choose linear, cosine or flow (edm: edm_schedule)")


def edm_levels(T: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """The noise levels s_t = sigma_t / alpha_t of schedule=edm, t = 0 ... T-1, in float64: Karras et
    al. 2022 (eq. 5), evenly spaced in s^(1/rho) from sigma_min up to sigma_max."""
    ramp = torch.linspace(0, 1, T, dtype=torch.float64)
    return (sigma_min ** (1 / rho) + ramp * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho


def edm_schedule(T: int, sigma_min: float, sigma_max: float, rho: float, p_mean: float, p_std: float
                 ) -> "NoiseSchedule":
    """EDM (Karras et al. 2022) as a discrete variance-preserving schedule. EDM's x = x0 + s n, fed
    to the network as c_in x = x / sqrt(1 + s^2) (for sigma_data = 1), is the VP x_t with
    alpha_bar_t = 1 / (1 + s_t^2); its preconditioned output and loss weighting are then those of
    v-prediction with an unweighted loss (objective=v). What it adds: noise levels from
    sigma_min to sigma_max on the Karras grid, and training levels drawn from EDM's log-normal,
    ln s ~ N(p_mean, p_std^2) (discretised onto the grid), which spends the training on the middle
    noise levels instead of uniformly in t."""
    levels = edm_levels(T, sigma_min, sigma_max, rho)
    alpha_bars = 1 / (1 + levels ** 2)
    previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
    log_levels = levels.log()
    widths = torch.gradient(log_levels)[0]           # each level's share of the ln s axis
    density = torch.exp(-0.5 * ((log_levels - p_mean) / p_std) ** 2)
    return NoiseSchedule(betas=1 - alpha_bars / previous, train_weights=density * widths)


def logit_normal_weights(alpha_bars: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """Training weights of the timesteps under SD3's logit-normal time (Esser et al. 2024): flow
    time u = sigmoid(N(mean, std^2)) with x_u = (1 - u) x0 + u eps, whose log-SNR is
    lambda = -2 logit(u), so lambda ~ N(-2 mean, (2 std)^2): each timestep gets that density at
    its lambda times its share of the lambda axis. The same density on any schedule; uniform
    time on the linear schedule spends most of training at very low or very high noise."""
    log_snr = (alpha_bars / (1 - alpha_bars)).log()
    density = torch.exp(-0.5 * ((log_snr + 2 * mean) / (2 * std)) ** 2)
    return density * torch.gradient(log_snr)[0].abs()


def combine(a, x: torch.Tensor, b, y: torch.Tensor) -> torch.Tensor:
    """a x + b y, with a and b numbers or per-sample (B, 1, ...) tensors, in a single new tensor:
    every formula of the schedule has this form, and on a sampler's hot path each allocation and
    each pass over the batch shows."""
    out = x * a
    return out.add_(y, alpha=b) if isinstance(b, float) else out.addcmul_(y, b)


class NoiseSchedule(nn.Module):
    """betas, alphas = 1 - betas, alpha_bars = cumprod(alphas), and what follows from them.

    All coefficients are computed in float64 and stored as float32 buffers, so they move with
    `.to(device)` and are saved with the module.
    """

    def __init__(self, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 kind: str = "linear", *, betas: torch.Tensor | None = None,
                 timesteps: torch.Tensor | None = None, train_weights: torch.Tensor | None = None):
        super().__init__()
        betas = make_betas(kind, T, beta_start, beta_end) if betas is None else betas.double()
        self.T = len(betas)
        self._betas64 = betas  # kept in float64 on the CPU for respacing
        alphas = 1.0 - betas
        alpha_bars = torch.cumprod(alphas, dim=0)
        alpha_bars_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])

        coefficients = {
            "betas": betas,
            "alphas": alphas,
            "alpha_bars": alpha_bars,
            "alpha_bars_prev": alpha_bars_prev,
            "sqrt_alpha_bars": alpha_bars.sqrt(),
            "sqrt_one_minus_alpha_bars": (1.0 - alpha_bars).sqrt(),
            "snr": alpha_bars / (1.0 - alpha_bars),  # signal-to-noise ratio, for loss weighting
            # q(x_{t-1} | x_t, x0) = N(c1 x0 + c2 x_t, var): Ho et al. eq. 6-7.
            "posterior_variance": betas * (1.0 - alpha_bars_prev) / (1.0 - alpha_bars),
            "posterior_mean_x0_coef": betas * alpha_bars_prev.sqrt() / (1.0 - alpha_bars),
            "posterior_mean_xt_coef": (1.0 - alpha_bars_prev) * alphas.sqrt() / (1.0 - alpha_bars),
        }
        for name, value in coefficients.items():
            self.register_buffer(name, value.float(), persistent=False)
        # The same float32 values as Python numbers, for the samplers' steps, where the whole
        # batch is at one timestep: a number costs no indexing and no kernel.
        self.numbers = {name: value.float().tolist() for name, value in coefficients.items()}
        # The timestep the model sees at each step of this schedule: 0..T-1, or a subset of the
        # training timesteps for a respaced schedule.
        if timesteps is None:
            timesteps = torch.arange(self.T)
        self.register_buffer("timesteps", timesteps.long(), persistent=False)
        # How often training draws each timestep, relative: None is uniform.
        self.register_buffer("train_weights", None if train_weights is None else train_weights.float(),
                             persistent=False)

    def training_timesteps(self, n: int, generator: torch.Generator, device) -> torch.Tensor:
        """n timesteps for a training batch, one per sample: uniform on 0 ... T-1, or drawn by
        the schedule's `train_weights`."""
        if self.train_weights is None:
            return torch.randint(0, self.T, (n,), generator=generator, device=device)
        return torch.multinomial(self.train_weights.to(device), n, replacement=True, generator=generator)

    def coefficient(self, name: str, t: torch.Tensor | int, x: torch.Tensor) -> torch.Tensor | float:
        """The coefficient `name` at t: for a (B,) tensor, shaped (B, 1, 1, ...) to broadcast
        against x; for an int (one timestep for the whole batch), a Python number."""
        if isinstance(t, int):
            return self.numbers[name][t]
        return getattr(self, name)[t].reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise (Ho et al. eq. 4)."""
        a, s = self.signal_and_noise(t, x0)
        return combine(a, x0, s, noise)

    def signal_and_noise(self, t: torch.Tensor | int, x: torch.Tensor):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)): what x_t holds of x0 and of the noise."""
        return self.coefficient("sqrt_alpha_bars", t, x), self.coefficient("sqrt_one_minus_alpha_bars", t, x)

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample for x0 given the noise. Never clips: the sampler decides that."""
        a, s = self.signal_and_noise(t, x_t)
        return combine(1 / a, x_t, -s / a, eps)

    def posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(mean, variance) of q(x_{t-1} | x_t, x0), Ho et al. eq. 7. The variance is 0 at t = 0."""
        mean = combine(self.coefficient("posterior_mean_x0_coef", t, x_t), x0,
                       self.coefficient("posterior_mean_xt_coef", t, x_t), x_t)
        return mean, self.coefficient("posterior_variance", t, x_t)

    def respaced(self, steps: int) -> "NoiseSchedule":
        """A schedule over `steps` of the T training timesteps, evenly spaced from T-1 down to 0,
        whose betas keep alpha_bar at those timesteps exact (Nichol & Dhariwal 2021, sec. 4). T-1
        is always kept, so sampling starts from pure noise: a single step is the x0 estimate at
        T-1, not a "denoising" of noise at t = 0."""
        if steps == self.T:
            return self
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampler.steps={steps} must be between 1 and schedule.T={self.T}")
        # Spaced from the top (linspace of one point is its start), then put in increasing order.
        kept = torch.linspace(self.T - 1, 0, steps, dtype=torch.float64).round().long().flip(0)
        alpha_bars = torch.cumprod(1.0 - self._betas64, dim=0)[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bars[:-1]])
        betas = 1.0 - alpha_bars / previous
        return NoiseSchedule(betas=betas, timesteps=self.timesteps[kept]).to(self.betas.device)

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        if cfg.kind == "edm":
            return edm_schedule(cfg.T, cfg.sigma_min, cfg.sigma_max, cfg.rho, cfg.p_mean, cfg.p_std)
        weights = None
        if cfg.get("time_density", "uniform") == "logit_normal":  # older checkpoints: uniform
            betas = make_betas(cfg.kind, cfg.T, cfg.get("beta_start"), cfg.get("beta_end"))
            weights = logit_normal_weights(torch.cumprod(1 - betas, 0), cfg.logit_mean, cfg.logit_std)
        return cls(T=cfg.T, beta_start=cfg.get("beta_start"), beta_end=cfg.get("beta_end"), kind=cfg.kind,
                   train_weights=weights)

    def extra_repr(self) -> str:
        return f"T={self.T}"

