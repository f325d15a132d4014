"""x0 and v objectives, min-SNR weights, label dropout, the EMAs, classifier-free guidance and
autoguidance."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from diffusion_cli.ema import EMA, power_gamma
from diffusion_cli.guidance import autoguided, guided
from diffusion_cli.models import MLP
from diffusion_cli.samplers import sample
from diffusion_cli.samplers.base import Denoised
from diffusion_cli.samplers.ddim import ddim_step
from diffusion_cli.samplers.ddpm import ddpm_step
from diffusion_cli.objectives import MIN_SNR_GAMMA, OBJECTIVES, objective
from diffusion_cli.schedule import NoiseSchedule

torch.manual_seed(0)
SCHEDULE = NoiseSchedule(T=1000)
X0, EPS = torch.rand(6, 1, 4, 4) * 2 - 1, torch.randn(6, 1, 4, 4)
T = torch.tensor([0, 1, 10, 300, 700, 999])


def test_v_is_sqrt_ab_eps_minus_sqrt_one_minus_ab_x0():
    ab = SCHEDULE.alpha_bars[T].reshape(-1, 1, 1, 1)
    expected = ab.sqrt() * EPS - (1 - ab).sqrt() * X0
    torch.testing.assert_close(objective("v").target(SCHEDULE, X0, T, EPS), expected)


@pytest.mark.parametrize("prediction", OBJECTIVES)
def test_every_prediction_converts_back_to_eps_and_x0(prediction):
    x_t, kind = SCHEDULE.q_sample(X0, T, EPS), objective(prediction)
    eps, x0 = kind.eps_and_x0(SCHEDULE, x_t, T, kind.target(SCHEDULE, X0, T, EPS))
    # x0 from eps divides by sqrt(alpha_bar), ~0.006 at t = 999: float32 error grows there.
    torch.testing.assert_close(x0, X0, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(eps, EPS, atol=2e-3, rtol=1e-3)


def test_min_snr_weights_follow_hang_et_al():
    alpha_bars = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[T]
    snr = alpha_bars / (1 - alpha_bars)
    clipped = snr.clamp(max=MIN_SNR_GAMMA)
    for prediction, expected in (("eps", clipped / snr), ("v", clipped / (snr + 1)), ("x0", clipped)):
        torch.testing.assert_close(objective(prediction, "min_snr").weight(SCHEDULE, T).double(), expected,
                                   rtol=1e-4, atol=0)
    assert torch.equal(objective("eps").weight(SCHEDULE, T), torch.ones(len(T)))
    # Noisy timesteps (SNR < 5) keep weight 1 with eps; clean ones are down-weighted to 5 / SNR.
    weights = objective("eps", "min_snr").weight(SCHEDULE, T)
    assert weights[-1] == 1 and weights[0] < 1e-3


class Recorder(nn.Module):
    """A model that outputs zeros and records the labels it was given."""

    def __init__(self, num_classes=0, prediction="eps"):
        super().__init__()
        self.num_classes, self.prediction, self.seen = num_classes, prediction, []
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels=None):
        self.seen.append(labels)
        return x * self.weight


@pytest.mark.parametrize("prediction", OBJECTIVES)
def test_training_loss_is_the_mse_to_the_objectives_target(prediction):
    model = Recorder(prediction=prediction)
    generator = torch.Generator().manual_seed(3)
    loss = objective(prediction).loss(model, SCHEDULE, X0, generator)
    replay = torch.Generator().manual_seed(3)
    t = torch.randint(0, SCHEDULE.T, (len(X0),), generator=replay)
    noise = torch.randn(X0.shape, generator=replay)
    torch.testing.assert_close(loss, objective(prediction).target(SCHEDULE, X0, t, noise).pow(2).mean())


def test_label_dropout_gives_the_null_label_at_the_asked_rate():
    model = Recorder(num_classes=10)
    labels = torch.arange(4000) % 10
    x0 = torch.zeros(4000, 1, 2, 2)
    for probability in (0.0, 0.1, 1.0):
        objective("eps").loss(model, SCHEDULE, x0, torch.Generator().manual_seed(0), labels, probability,
                              torch.tensor(10))
        seen = model.seen[-1]
        dropped = (seen == 10).float().mean().item()
        assert abs(dropped - probability) < 0.02
        assert torch.equal(seen[seen != 10], labels[seen != 10])


def test_ema_follows_the_warm_up_formula():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.999)
    expected = [p.detach().clone() for p in model.parameters()]
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        ema.update(model, step)
        decay = min(0.999, (1 + step) / (10 + step))
        expected = [decay * e + (1 - decay) * p.detach() for e, p in zip(expected, model.parameters())]
    for e, p in zip(expected, ema.model.parameters()):
        torch.testing.assert_close(p, e)
    assert not any(p.requires_grad for p in ema.model.parameters())


@pytest.mark.parametrize("sigma_rel", [0.05, 0.1, 0.2])
def test_power_ema_averages_with_the_profile_of_its_sigma_rel(sigma_rel):
    """Fed the step number itself (and its square) as the weight, the EMA gives the mean and the
    second moment of its averaging profile over the steps: its standard deviation relative to the
    run's length is sigma_rel (EDM2), the profile's exact position (gamma+1)/(gamma+2)."""
    steps = 4000
    model = nn.Linear(1, 1, bias=True)
    ema = EMA(model, sigma_rel=sigma_rel)
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.weight.fill_(step / steps)
            model.bias.fill_((step / steps) ** 2)
        ema.update(model, step)
    mean, second = ema.model.weight.item(), ema.model.bias.item()
    gamma = power_gamma(sigma_rel)
    assert (mean * (1 - 1e-3) < (gamma + 1) / (gamma + 2) < mean * (1 + 1e-3))
    assert math.sqrt(second - mean ** 2) == pytest.approx(sigma_rel, rel=0.01)
    # The closed form of sigma_rel from gamma.
    assert math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))) == pytest.approx(sigma_rel, rel=1e-9)


def test_power_ema_copies_the_weights_at_the_first_step():
    model = nn.Linear(2, 2)
    ema = EMA(model, sigma_rel=0.1)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 1)
    assert torch.equal(ema.model.weight, model.weight)


def test_autoguidance_at_1_is_the_model_and_at_0_the_guide():
    """out = guide + w (model - guide), on the same condition for both (or none)."""
    class Shift(nn.Module):
        def __init__(self, by):
            super().__init__()
            self.by = by

        def forward(self, x, t, labels=None):
            return x + self.by + (0 if labels is None else labels.float().reshape(-1, 1, 1, 1))

    good, bad = Shift(1.0), Shift(-2.0)
    x, t = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    labels = torch.tensor([0, 3, 7])
    for condition in (None, labels):
        assert torch.equal(autoguided(good, bad, condition, 1.0)(x, t), good(x, t, condition))
        assert torch.equal(autoguided(good, bad, condition, 0.0)(x, t), bad(x, t, condition))
        torch.testing.assert_close(autoguided(good, bad, condition, 2.5)(x, t),
                                   bad(x, t, condition) + 2.5 * 3.0)
    # Through sample(): w = 1 draws what the model alone draws, w = 0 what the guide alone draws.
    schedule = NoiseSchedule(T=20)
    mlp, weaker = MLP((1, 4, 4), width=16), MLP((1, 4, 4), width=16)
    for w, alone in ((1.0, mlp), (0.0, weaker)):
        guided_images = sample(mlp, schedule, (2, 1, 4, 4), sampler="ddim", steps=5, guide=weaker,
                               guidance_scale=w, generator=torch.Generator().manual_seed(0))
        expected = sample(alone, schedule, (2, 1, 4, 4), sampler="ddim", steps=5,
                          generator=torch.Generator().manual_seed(0))
        assert torch.equal(guided_images, expected)


def test_guidance_is_unconditional_plus_w_times_the_difference():
    class ByLabel(nn.Module):
        num_classes = 10

        def forward(self, x, t, labels):
            return x + labels.float().reshape(-1, 1, 1, 1)  # the null label is 10

    x, t, labels = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long), torch.tensor([0, 3, 7])
    for w in (0.0, 1.0, 3.0):
        out = guided(ByLabel(), labels, torch.full_like(labels, 10), w)(x, t)
        expected = 10 + w * (labels.float() - 10)
        torch.testing.assert_close(out[:, 0, 0, 0], expected)


@pytest.mark.parametrize("prediction, diffusers_name", [("v", "v_prediction"), ("x0", "sample")])
def test_ddpm_step_matches_diffusers_for_x0_and_v(prediction, diffusers_name):
    reference = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              prediction_type=diffusers_name, variance_type="fixed_small")
    x, output = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for i in (999, 500, 10, 0):
        # diffusers draws its variance noise from the generator: the same draw as `noise`.
        expected = reference.step(output, i, x, generator=torch.Generator().manual_seed(i),
                                  return_dict=False)[0]
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        # diffusers forms the posterior coefficients in float32 (1 - alpha_bar loses digits at
        # small t); ours come from float64: they differ by ~1e-4 at t = 10.
        x0 = Denoised(lambda: output, SCHEDULE, i, x, objective(prediction), clip_x0=True).x0
        torch.testing.assert_close(ddpm_step(SCHEDULE, x0, i, x, noise),
                                   expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("prediction, diffusers_name", [("v", "v_prediction"), ("x0", "sample")])
def test_ddim_step_matches_diffusers_for_x0_and_v(prediction, diffusers_name):
    reference = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True,
                              prediction_type=diffusers_name, timestep_spacing="trailing",
                              set_alpha_to_one=True)
    reference.set_timesteps(50)
    timesteps = reference.timesteps.tolist()
    x, output = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    for k in (0, 25, 49):
        t, t_prev = timesteps[k], timesteps[k + 1] if k + 1 < 50 else -1
        expected = reference.step(output, t, x, eta=0.0, use_clipped_model_output=True,
                                  return_dict=False)[0]
        denoised = Denoised(lambda: output, SCHEDULE, t, x, objective(prediction), clip_x0=True)
        torch.testing.assert_close(ddim_step(SCHEDULE, denoised.x0, denoised.eps, t, t_prev, x, 0.0, None),
                                   expected, atol=1e-5, rtol=1e-5)


def test_the_flow_objective_is_diffusers_flow_matching_on_the_straight_path():
    """objective=flow: the network sees x_t of its schedule, which is the straight path's x_u =
    (1 - u) x0 + u eps (diffusers' FlowMatchEulerDiscreteScheduler.scale_noise) times (a + s), at
    u = s / (a + s); its target is the velocity eps - x0 (SD3's training scripts)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_cli.objectives import flow_time

    for schedule in (SCHEDULE, NoiseSchedule(T=1000, kind="flow")):
        u, scale = flow_time(schedule, T, X0)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
        scheduler.set_timesteps(sigmas=u.flatten().tolist())
        for k, t in enumerate(scheduler.timesteps):
            expected = scheduler.scale_noise(X0[k:k + 1], t[None], EPS[k:k + 1])
            x_t = schedule.q_sample(X0[k:k + 1], T[k:k + 1], EPS[k:k + 1])
            torch.testing.assert_close(x_t * scale[k], expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(objective("flow").target(schedule, X0, T, EPS), EPS - X0)
