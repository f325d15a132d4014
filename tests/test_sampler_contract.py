"""Every sampler of the registry under one contract (shapes, range, seeds, batch splits, its own
timesteps, its config group), and Euler against diffusers' EulerDiscreteScheduler."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_cli.models import MLP
from diffusion_cli.generation import sample_images
from diffusion_cli.samplers import SAMPLERS, sample, sampler_from_config
from diffusion_cli.samplers.euler import Euler
from diffusion_cli.schedule import NoiseSchedule

ROOT = Path(__file__).resolve().parents[1]
SCHEDULE = NoiseSchedule(T=100)


def tiny_model(shape=(1, 4, 4)):
    torch.manual_seed(0)
    return MLP(shape, width=16, depth=1).eval()


class Counting(torch.nn.Module):
    """eps = x / 2, counting its evaluations; no parameters."""
    prediction, num_classes = "eps", 0

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, labels=None):
        self.calls += 1
        return x / 2


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_every_sampler_keeps_the_contract(kind):
    model, shape = tiny_model(), (5, 1, 4, 4)
    sampler = SAMPLERS[kind](steps=6)
    a = sample(model, SCHEDULE, shape, sampler=sampler, generator=torch.Generator().manual_seed(1))
    b = sample(model, SCHEDULE, shape, sampler=sampler, generator=torch.Generator().manual_seed(1))
    c = sample(model, SCHEDULE, shape, sampler=sampler, generator=torch.Generator().manual_seed(2))
    assert a.shape == shape and torch.isfinite(a).all() and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, b) and not torch.allclose(a, c)
    timesteps = sampler.timesteps(SCHEDULE, 6)
    assert timesteps[0] == SCHEDULE.T - 1 and timesteps == sorted(set(timesteps), reverse=True)
    trajectory = sample(model, SCHEDULE, shape, sampler=sampler, return_all_steps=True)
    assert trajectory.shape == (len(timesteps) + 1, *shape)
    counting = Counting()
    sample(counting, SCHEDULE, shape, sampler=sampler)
    assert len(timesteps) <= counting.calls <= 2 * len(timesteps)


@pytest.mark.parametrize("kind", [kind for kind in SAMPLERS if kind != "ddpm"])  # ancestral: noisy steps
def test_deterministic_samplers_give_the_same_images_whatever_the_batch_split(kind):
    cfg = OmegaConf.create({"kind": kind, "steps": 4, "clip_x0": True, "eta": 0.0, "s_churn": 0.0})
    model = tiny_model((1, 3, 5))
    whole = sample_images(model, SCHEDULE, cfg, (9, 1, 3, 5), batch_size=9, seed=3)
    split = sample_images(model, SCHEDULE, cfg, (9, 1, 3, 5), batch_size=4, seed=3)
    torch.testing.assert_close(whole, split)


@pytest.mark.parametrize("kind", list(SAMPLERS))
def test_every_sampler_has_a_config_group_whose_keys_are_its_fields(kind):
    from dataclasses import fields
    cfg = OmegaConf.load(ROOT / "conf" / "sampler" / f"{kind}.yaml")
    keys = set(cfg) - {"defaults"}
    assert keys == {"kind"} | {f.name for f in fields(SAMPLERS[kind])}
    built = sampler_from_config(cfg)
    assert type(built) is SAMPLERS[kind] and built.steps == cfg.steps


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_euler_trajectory_matches_diffusers_euler_discrete_scheduler(kind):
    """diffusers works in y = x / alpha (sample scaled by 1/sqrt(1 + s^2) for the model): the same
    ODE steps on the same Karras-spaced training timesteps. Its levels are set to ours (they agree to
    1e-3; its float32 cumprod drifts by more at cosine's top, s ~ 2e4, and one step from there
    multiplies that drift by s) and its y is kept in float64, for the same reason."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[kind],
        final_sigmas_type="zero")
    s, model, shape = NoiseSchedule(T=1000, kind=kind), tiny_model(), (3, 1, 4, 4)
    sampler = Euler(steps=12, clip_x0=False)
    ours = sample(model, s, shape, sampler=sampler, generator=torch.Generator().manual_seed(0),
                  return_all_steps=True)
    timesteps = sampler.timesteps(s, 12)
    scheduler.set_timesteps(timesteps=timesteps)
    levels = (s.sqrt_one_minus_alpha_bars / s.sqrt_alpha_bars)[timesteps]
    torch.testing.assert_close(scheduler.sigmas[:-1], levels, rtol=1e-3, atol=0)
    scheduler.sigmas = torch.cat([levels, torch.zeros(1)])
    alphas = s.sqrt_alpha_bars[timesteps].tolist() + [1.0]
    y, theirs = ours[0].double() / alphas[0], [ours[0]]
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            output = model(scheduler.scale_model_input(y, t).float(), t.long().expand(shape[0]))
            y = scheduler.step(output, t, y).prev_sample
            theirs.append((y * alphas[k + 1]).float())
    torch.testing.assert_close(ours, torch.stack(theirs), atol=1e-4, rtol=1e-4)


def test_euler_with_churn_adds_noise_and_still_samples_the_data_distribution():
    """For Gaussian data the exact denoiser is known: the stochastic sampler must draw from
    N(mean, std^2) as the ODE does, with other draws than the ODE's and still one model evaluation
    per step (a churned step evaluates at its raised level instead of the plain one). Its steps are
    longer (from the raised level), so its first-order error is larger and falls with the steps."""
    s, mean, std = NoiseSchedule(T=1000, kind="cosine"), 0.3, 0.5

    class Exact(Counting):
        def forward(self, x, t, labels=None):
            self.calls += 1
            a = s.sqrt_alpha_bars[t].double().view(-1, 1, 1, 1)
            sigma = s.sqrt_one_minus_alpha_bars[t].double().view(-1, 1, 1, 1)
            return sigma * (x - a * mean) / (a ** 2 * std ** 2 + sigma ** 2)

    # float64: float32 can't hold the a^2 std^2 next to sigma^2 that the top levels differ by.
    x_T = torch.randn(4096, 1, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def draw(steps, **churn):
        model = Exact()
        images = sample(model, s, x_T.shape, sampler=Euler(steps=steps, clip_x0=False, **churn), x_T=x_T,
                        generator=torch.Generator().manual_seed(1), clamp=False)
        assert model.calls == len(Euler().timesteps(s, steps))
        return images

    deterministic, stochastic = draw(200), draw(200, s_churn=80, s_tmax=10)
    assert not torch.allclose(deterministic, stochastic, atol=1e-3)
    assert deterministic.mean().item() == pytest.approx(mean, abs=0.01)
    assert deterministic.std().item() == pytest.approx(std, rel=0.02)
    longer = draw(1000, s_churn=80, s_tmax=10)
    assert longer.mean().item() == pytest.approx(mean, abs=0.01)
    assert abs(longer.std().item() - std) < abs(stochastic.std().item() - std)
    assert longer.std().item() == pytest.approx(std, rel=0.04)
