"""x0 and v objectives, min-SNR weights, label dropout, EMA and classifier-free guidance."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from diffusion_cli.ema import EMA
from diffusion_cli.guidance import guided
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
