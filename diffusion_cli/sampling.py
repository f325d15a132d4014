"""Samplers as plain functions: a small `*_step` holding the math, and a loop around it."""

import math
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .images import to_unit
from .models import null_condition
from .models.text_encoder import padded
from .runtime import eval_mode
from .schedule import NoiseSchedule, combine


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def denoiser(model: nn.Module, labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
             negative: torch.Tensor | None = None) -> Denoiser:
    """(x_t, t) -> the model's output, conditioned on `labels` (class indices, or caption tokens)
    where given. A guidance_scale w != 1 is classifier-free guidance (Ho & Salimans 2022):
    out_u + w (out_c - out_u), out_u the output for the null label or the empty caption, or for
    `negative` (a negative prompt's tokens) where given. The combination is linear, so it is the
    same in eps, x0 or v."""
    if labels is None:
        return model
    if guidance_scale == 1.0:
        return lambda x, t: model(x, t, labels)
    unconditional = negative if negative is not None else null_condition(model, labels)
    if labels.dim() == 2:  # caption tokens: a prompt and a negative prompt of different lengths
        width = max(labels.shape[1], unconditional.shape[1])
        labels, unconditional = padded(labels, width), padded(unconditional, width)
    both = torch.cat([labels, unconditional])

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        conditional, unconditional = model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        return unconditional + guidance_scale * (conditional - unconditional)
    return guided


def randn(shape, generator: torch.Generator | None, device) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device and moved to `device` (a no-op when
    the generator is on `device`, as sample_images' generators are)."""
    noise_device = generator.device if generator is not None else device
    return torch.randn(tuple(shape), generator=generator, device=noise_device).to(device)


def model_device(model: nn.Module, schedule: NoiseSchedule) -> torch.device:
    """Where the model's weights are; the schedule's device for a model without parameters."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else schedule.betas.device


def clamped(x0: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """x0 clipped to [-1, 1]: in place when it is a tensor of the step's own (one pass less),
    a copy when it is the caller's model output (an x0-predicting model)."""
    return x0.clamp(-1, 1) if x0 is output else x0.clamp_(-1, 1)


def ddpm_step(schedule: NoiseSchedule, output: torch.Tensor, i: int, x: torch.Tensor,
              noise: torch.Tensor | None, clip_x0: bool = True, prediction: str = "eps") -> torch.Tensor:
    """One ancestral step x_i -> x_{i-1} through x0 and the posterior q(x_{i-1} | x_i, x0) (Ho et
    al. eq. 7); `output` is the model's, of the `prediction` kind. With clip_x0=False and eps this
    equals Algorithm 2. At i = 0 the variance is 0: no noise. The coefficients at the int i are
    Python numbers: a handful of elementwise ops per step."""
    _, x0 = schedule.eps_and_x0(x, i, output, prediction)
    if clip_x0:
        x0 = clamped(x0, output)
    mean, variance = schedule.posterior_mean_variance(x0, x, i)
    if i == 0 or noise is None:
        return mean
    return mean.add_(noise, alpha=math.sqrt(variance))


def ddpm(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, *, prediction: str = "eps",
         clip_x0: bool = True, generator: torch.Generator | None = None,
         return_all_steps: bool = False, progress: bool = False) -> torch.Tensor:
    """Ancestral sampling from x = x_T over every step of `schedule` (respaced or not)."""
    trajectory = [x]
    for i in tqdm(range(schedule.T - 1, -1, -1), desc="sampling", disable=not progress, leave=False):
        output = denoise(x, schedule.timesteps[i].expand(x.shape[0])).to(x.dtype)  # fp32 under autocast
        noise = randn(x.shape, generator, x.device) if i > 0 else None
        x = ddpm_step(schedule, output, i, x, noise, clip_x0, prediction)
        if return_all_steps:
            trajectory.append(x)
    return torch.stack(trajectory) if return_all_steps else x


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """"Trailing" spacing (diffusers' timestep_spacing="trailing"): T-1, T-1-T/steps, ...; the step
    after the last one goes to alpha_bar = 1."""
    return [round(T - k * T / steps) - 1 for k in range(steps)]


def ddim_step(schedule: NoiseSchedule, output: torch.Tensor, t: int, t_prev: int, x: torch.Tensor,
              eta: float, noise: torch.Tensor | None, clip_x0: bool = True, prediction: str = "eps"
              ) -> torch.Tensor:
    """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12); t_prev = -1 means alpha_bar = 1.
    eta = 0 is deterministic, eta = 1 has the variance of DDPM's posterior. When x0 is clipped, eps
    is recomputed from it (diffusers' use_clipped_model_output=True), so the step stays consistent
    with x_t: keeping the model's eps next to a clipped x0 blows images out under guidance."""
    ab = schedule.numbers["alpha_bars"][t]
    ab_prev = schedule.numbers["alpha_bars"][t_prev] if t_prev >= 0 else 1.0
    eps, x0 = schedule.eps_and_x0(x, t, output, prediction)
    if clip_x0:
        x0 = clamped(x0, output)
        eps, _ = schedule.eps_and_x0(x, t, x0, "x0")
    sigma = eta * math.sqrt((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev))
    x_prev = combine(math.sqrt(ab_prev), x0, math.sqrt(1 - ab_prev - sigma ** 2), eps)
    return x_prev.add_(noise, alpha=sigma) if eta > 0 and noise is not None else x_prev


def ddim(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, *, steps: int, eta: float = 0.0,
         prediction: str = "eps", clip_x0: bool = True, generator: torch.Generator | None = None,
         return_all_steps: bool = False, progress: bool = False) -> torch.Tensor:
    """DDIM sampling from x = x_T over `steps` trailing-spaced timesteps of the training schedule."""
    timesteps = ddim_timesteps(schedule.T, steps)
    trajectory = [x]
    for k, t in enumerate(tqdm(timesteps, desc="sampling", disable=not progress, leave=False)):
        t_prev = timesteps[k + 1] if k + 1 < len(timesteps) else -1
        output = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        noise = randn(x.shape, generator, x.device) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(schedule, output, t, t_prev, x, eta, noise, clip_x0, prediction)
        if return_all_steps:
            trajectory.append(x)
    return torch.stack(trajectory) if return_all_steps else x


def alpha_sigma(schedule: NoiseSchedule, t: int) -> tuple[float, float]:
    """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)): x_t = alpha x0 + sigma eps. t = -1 is the clean
    image, (1, 0)."""
    if t < 0:
        return 1.0, 0.0
    return (schedule.numbers["sqrt_alpha_bars"][t], schedule.numbers["sqrt_one_minus_alpha_bars"][t])


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), DPM-Solver's time variable; inf for the clean image."""
    return math.log(alpha / sigma) if sigma > 0 else math.inf


def dpmpp_2m_step(x: torch.Tensor, x0: torch.Tensor, previous_x0: torch.Tensor | None, h: float,
                  ratio: float | None, now: tuple[float, float], then: tuple[float, float], eta: float,
                  noise: torch.Tensor | None) -> torch.Tensor:
    """One DPM-Solver++(2M) step (Lu et al. 2022, multistep second order, midpoint form as in
    diffusers) from noise level `now` = (alpha, sigma) to `then`, in the half log-SNR
    lambda = log(alpha / sigma): with h = lambda_then - lambda_now (given),
        x_then = (sigma_then / sigma_now) e^(-eta h) x + alpha_then (1 - e^(-(1 + eta) h)) D
                 + sigma_then sqrt(1 - e^(-2 eta h)) z,
    D = x0 + (x0 - previous_x0) / (2 r), r = h_previous / h (`ratio`), or x0 alone on the first
    and last steps. eta = 0 is the ODE solver (DPMSolverMultistepScheduler's "dpmsolver++"), eta = 1
    the SDE one ("sde-dpmsolver++"). The last step, to sigma = 0, returns x0."""
    sigma_now, (alpha_then, sigma_then) = now[1], then
    if sigma_then == 0:
        return x0
    denoised = x0 if previous_x0 is None else combine(1 + 0.5 / ratio, x0, -0.5 / ratio, previous_x0)
    x_then = combine(sigma_then / sigma_now * math.exp(-eta * h), x,
                     alpha_then * -math.expm1(-(1 + eta) * h), denoised)
    if eta > 0 and noise is not None:
        x_then.add_(noise, alpha=sigma_then * math.sqrt(-math.expm1(-2 * eta * h)))
    return x_then


def dpmpp_2m(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, *, steps: int,
             eta: float = 0.0, prediction: str = "eps", clip_x0: bool = True,
             generator: torch.Generator | None = None, return_all_steps: bool = False,
             progress: bool = False) -> torch.Tensor:
    """DPM-Solver++(2M) over `steps` trailing-spaced timesteps (one model evaluation each); eta > 0
    adds the SDE variant's noise."""
    timesteps = ddim_timesteps(schedule.T, steps) + [-1]
    trajectory, previous_x0, previous_h = [x], None, None
    for k, t in enumerate(tqdm(timesteps[:-1], desc="sampling", disable=not progress, leave=False)):
        output = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        _, x0 = schedule.eps_and_x0(x, t, output, prediction)
        if clip_x0:
            x0 = clamped(x0, output)
        now, then = alpha_sigma(schedule, t), alpha_sigma(schedule, timesteps[k + 1])
        h = half_log_snr(*then) - half_log_snr(*now)
        noise = randn(x.shape, generator, x.device) if eta > 0 and then[1] > 0 else None
        ratio = previous_h / h if previous_h is not None else None
        x = dpmpp_2m_step(x, x0, previous_x0, h, ratio, now, then, eta, noise)
        previous_x0, previous_h = x0, h
        if return_all_steps:
            trajectory.append(x)
    return torch.stack(trajectory) if return_all_steps else x


SIGMA_MAX = 80.0  # Karras et al.'s top noise level: above it the ODE is a straight line


def karras_timesteps(schedule: NoiseSchedule, steps: int, rho: float = 7.0) -> list[int]:
    """`steps` timesteps from T-1 down to 0 whose noise levels s = sigma / alpha follow Karras et al.
    2022 (eq. 5): evenly spaced in s^(1/rho) from min(s at T-1, SIGMA_MAX) to s at 0, so the steps
    shrink with the noise level; the first is T-1 itself, where sampling starts. Each level is
    rounded (in log s) to the nearest training timestep, so the model sees only timesteps it was
    trained on. Uniform timesteps would take the first step from s in the thousands (cosine) or
    hundreds (linear) to a few in one go: too far for a trapezoid rule."""
    s = (schedule.sqrt_one_minus_alpha_bars / schedule.sqrt_alpha_bars).double().cpu()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    top, bottom = min(s[-1].item(), SIGMA_MAX) ** (1 / rho), s[0] ** (1 / rho)
    targets = (top + ramp * (bottom - top)) ** rho
    nearest = (s.log()[None] - targets.log()[:, None]).abs().argmin(1).tolist()
    return sorted(set([schedule.T - 1] + nearest[1:]), reverse=True)


def heun(denoise: Denoiser, schedule: NoiseSchedule, x: torch.Tensor, *, steps: int,
         prediction: str = "eps", clip_x0: bool = True, generator: torch.Generator | None = None,
         return_all_steps: bool = False, progress: bool = False) -> torch.Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, Algorithm 1,
    deterministic) over `steps` Karras-spaced timesteps, then to the clean image: 2 steps - 1
    model evaluations (2 steps - 2 from a top above SIGMA_MAX, as linear's and cosine's). In y = x / alpha and s = sigma / alpha the ODE is dy/ds = eps(x, t): an Euler
    step is a DDIM step, and Heun averages eps at both of its ends. Two steps stay Euler steps: the
    last, to s = 0, and the first where it comes down from above SIGMA_MAX (there eps is constant
    to a few parts in a million, and half the difference of two such values times a step of
    thousands would be the only error)."""
    timesteps = karras_timesteps(schedule, steps) + [-1]

    def eps_at(x: torch.Tensor, t: int) -> torch.Tensor:
        output = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        eps, x0 = schedule.eps_and_x0(x, t, output, prediction)
        if clip_x0:  # as DDIM: eps consistent with the clipped x0
            eps, _ = schedule.eps_and_x0(x, t, clamped(x0, output), "x0")
        return eps

    trajectory = [x]
    for k, t in enumerate(tqdm(timesteps[:-1], desc="sampling", disable=not progress, leave=False)):
        (alpha, sigma), (alpha_next, sigma_next) = alpha_sigma(schedule, t), alpha_sigma(schedule, timesteps[k + 1])
        ds = sigma_next / alpha_next - sigma / alpha
        eps = eps_at(x, t)
        euler = combine(alpha_next / alpha, x, alpha_next * ds, eps)   # alpha' (y + ds eps)
        if sigma_next > 0 and (k > 0 or sigma / alpha < 1.01 * SIGMA_MAX):
            eps = eps.add_(eps_at(euler, timesteps[k + 1])).mul_(0.5)
            euler = combine(alpha_next / alpha, x, alpha_next * ds, eps)
        x = euler
        if return_all_steps:
            trajectory.append(x)
    return torch.stack(trajectory) if return_all_steps else x


SAMPLERS = ("ddpm", "ddim", "dpmpp_2m", "heun")


def sampler_timesteps(sampler: str, schedule: NoiseSchedule, steps: int) -> list[int]:
    """The timestep of each state a sampler steps from, x_T first (the last state is the sample)."""
    if sampler == "ddpm":
        return schedule.respaced(steps).timesteps.flip(0).tolist()
    if sampler == "heun":
        return karras_timesteps(schedule, steps)
    return ddim_timesteps(schedule.T, steps)


@torch.inference_mode()
def sample(model: nn.Module, schedule: NoiseSchedule, shape, *, sampler: str = "ddpm",
           steps: int | None = None, clip_x0: bool = True, eta: float = 0.0,
           generator: torch.Generator | None = None, device=None, return_all_steps: bool = False,
           progress: bool = False, x_T: torch.Tensor | None = None,
           labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
           negative: torch.Tensor | None = None, prediction: str | None = None, clamp: bool = True) -> torch.Tensor:
    """Draw images of `shape` (B, C, H, W) from the model, in [-1, 1].

    sampler: "ddpm" (ancestral), "ddim" (Song et al. 2021, with `eta` from 0 = deterministic
    to 1 = DDPM-like noise), "dpmpp_2m" (DPM-Solver++(2M), Lu et al. 2022; `eta` 1 = its SDE form)
    or "heun" (Karras et al. 2022; two model evaluations per step, but one on the last step and
    on a first step from above SIGMA_MAX).
    steps: sampling steps, default all T; DDPM with fewer uses respaced betas (Nichol & Dhariwal
    2021), the others trailing-spaced timesteps.
    return_all_steps: also return every intermediate x, as a (steps + 1, B, ...) tensor from x_T.
    x_T: the initial noise; drawn from `generator` when not given.
    labels: (B,) class indices for a class-conditional model, (B, L) caption tokens for a
    text-conditioned one; guidance_scale: classifier-free guidance weight (1 = plain conditional,
    0 = unconditional); negative: (B, L) tokens guidance pushes away from (default: the empty
    caption).
    prediction: what the model outputs (eps, x0 or v); default the model's own `prediction`.
    clamp: clamp the result to [-1, 1] (images; latents are not clamped).
    The model and schedule must be on `device` (default: the model's device, else the schedule's).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown; choose one of: {', '.join(SAMPLERS)}")
    device = torch.device(device) if device is not None else model_device(model, schedule)
    x = randn(shape, generator, device) if x_T is None else x_T.to(device)
    steps = steps or schedule.T
    labels = labels.to(device) if labels is not None else None
    negative = negative.to(device) if negative is not None else None
    options = dict(prediction=prediction or getattr(model, "prediction", "eps"), clip_x0=clip_x0,
                   generator=generator, return_all_steps=return_all_steps, progress=progress)
    with eval_mode(model):
        denoise = denoiser(model, labels, guidance_scale, negative)
        if sampler == "ddpm":
            result = ddpm(denoise, schedule.respaced(steps), x, **options)
        elif sampler == "heun":
            result = heun(denoise, schedule, x, steps=steps, **options)
        else:
            result = {"ddim": ddim, "dpmpp_2m": dpmpp_2m}[sampler](denoise, schedule, x, steps=steps,
                                                                  eta=eta, **options)
    return result if return_all_steps or not clamp else result.clamp(-1, 1)


def sampler_options(sampler_cfg, latent: bool = False) -> dict:
    """The keyword arguments of `sample` that a `sampler` config group sets; for `latent`
    diffusion no x0 clipping (a latent is not in [-1, 1]: clipping it would distort it)."""
    return dict(sampler=sampler_cfg.kind, steps=sampler_cfg.steps, clip_x0=sampler_cfg.clip_x0 and not latent,
                eta=sampler_cfg.get("eta", 0.0))


def class_rows(num_classes: int, per_class: int) -> torch.Tensor:
    """Labels for a grid with one row per class: per_class 0s, then per_class 1s, ..."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def image_seeds(seed: int, count: int) -> list[int]:
    """The seed of each image's initial noise in sample_images."""
    return torch.randint(2 ** 62, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def sample_images(model: nn.Module, schedule: NoiseSchedule, sampler_cfg, shape, *, batch_size: int,
                  seed: int, labels: torch.Tensor | None = None, guidance_scale: float = 1.0,
                  negative: torch.Tensor | None = None, latents=None, progress: bool = False) -> torch.Tensor:
    """`shape[0]` images in [0, 1] on the CPU, drawn `batch_size` at a time with the sampler config
    (kind, steps, clip_x0, and eta for DDIM). `labels` (N,) for a class-conditional model, (N, L)
    caption tokens for a text-conditioned one; `negative` (N, L) a negative prompt's tokens.
    With `latents` (a LatentSpace) the model draws latents of `shape`, never clipped, which are
    decoded to images.
    Training grids, quality metrics and diffusion-sample all draw through here.

    All noise is drawn on the model's device, one batch at a time: image i's initial noise from
    a generator seeded with the i-th seed that `seed` gives, so deterministic samplers (DDIM,
    eta 0) give the same image for the same seed whatever batch_size splits the work; the
    stochastic steps' noise continues that generator. The same seed gives the same images on
    the same kind of device; a GPU's generator differs from the CPU's, so their images do too."""
    device = model_device(model, schedule)
    seeds = image_seeds(seed, shape[0])
    generator = torch.Generator(device)
    total, chunks = shape[0], []
    batches = range(0, total, batch_size)
    options = sampler_options(sampler_cfg, latent=latents is not None)
    for start in tqdm(batches, desc="batches", disable=not progress or len(batches) == 1):
        x_T = torch.stack([torch.randn(tuple(shape[1:]), generator=generator.manual_seed(s), device=device)
                           for s in seeds[start:start + batch_size]])
        chunk = sample(model, schedule, x_T.shape, **options, clamp=latents is None,
                       generator=generator, progress=progress, x_T=x_T,
                       labels=None if labels is None else labels[start:start + batch_size],
                       guidance_scale=guidance_scale,
                       negative=None if negative is None else negative[start:start + batch_size])
        chunks.append(to_unit(chunk if latents is None else latents.decode(chunk)).cpu())
    return torch.cat(chunks)
