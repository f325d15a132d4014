import math
from pathlib import Path

import pytest
import torch

from diffusion_cli.objectives import objective
from diffusion_cli.schedule import NoiseSchedule


def test_linear_betas_and_products_match_hand_computation():
    s = NoiseSchedule(T=5, beta_start=0.1, beta_end=0.5)
    betas = [0.1, 0.2, 0.3, 0.4, 0.5]
    alpha_bars = [0.9, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.9 * 0.8 * 0.7 * 0.6, 0.9 * 0.8 * 0.7 * 0.6 * 0.5]
    assert s.betas.dtype == torch.float32 and len(s.betas) == 5
    torch.testing.assert_close(s.betas, torch.tensor(betas))
    torch.testing.assert_close(s.alphas, 1 - torch.tensor(betas))
    torch.testing.assert_close(s.alpha_bars, torch.tensor(alpha_bars))


def test_default_schedule_is_ho_et_al():
    s = NoiseSchedule()
    assert s.T == 1000
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert s.alpha_bars[-1].item() == pytest.approx(4.04e-5, rel=0.01)


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (4, 7, 16)])  # images and patch tokens
def test_q_sample_uses_one_timestep_per_sample(shape):
    s = NoiseSchedule(T=100)
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.tensor([0, 10, 50, 99])
    x_t = s.q_sample(x0, t, noise)
    for i in range(4):
        ab = s.alpha_bars[t[i]]
        torch.testing.assert_close(x_t[i], ab.sqrt() * x0[i] + (1 - ab).sqrt() * noise[i])


def test_predict_x0_inverts_q_sample():
    s = NoiseSchedule(T=100)
    x0, noise, t = torch.randn(8, 2, 4, 4), torch.randn(8, 2, 4, 4), torch.randint(0, 100, (8,))
    torch.testing.assert_close(s.predict_x0(s.q_sample(x0, t, noise), t, noise), x0, atol=1e-4, rtol=1e-4)


def q_sample_iterative(s: NoiseSchedule, x0: torch.Tensor, t: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """The forward chain one step at a time (eq. 2): x_s = sqrt(1-beta_s) x_{s-1} + sqrt(beta_s) eps
    for s = 0 ... t, i.e. t+1 steps: slow, to check `q_sample` against."""
    x = x0.clone()
    for step in range(int(t.max()) + 1):
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        stepped = math.sqrt(s.numbers["alphas"][step]) * x + math.sqrt(s.numbers["betas"][step]) * eps
        active = (t >= step).reshape(-1, *([1] * (x.dim() - 1)))
        x = torch.where(active, stepped, x)
    return x


@pytest.mark.parametrize("t", [0, 5, 30, 99])
def test_step_by_step_chain_matches_closed_form_in_distribution(t):
    """Eq. 2 iterated t+1 times gives x_t ~ N(sqrt(ab_t) x0, (1 - ab_t) I), as eq. 4 says."""
    s = NoiseSchedule(T=100, beta_start=1e-3, beta_end=0.05)
    n = 20000
    x0 = torch.full((n, 1), 0.7)
    ts = torch.full((n,), t)
    chain = q_sample_iterative(s, x0, ts, torch.Generator().manual_seed(t))
    ab = s.alpha_bars[t].item()
    assert chain.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=0.02)
    assert chain.var().item() == pytest.approx(1 - ab, rel=0.05, abs=1e-4)
    closed = s.q_sample(x0, ts, torch.randn(n, 1, generator=torch.Generator().manual_seed(100 + t)))
    assert chain.mean().item() == pytest.approx(closed.mean().item(), abs=0.02)
    assert chain.var().item() == pytest.approx(closed.var().item(), rel=0.05, abs=1e-4)


def test_q_sample_iterative_takes_t_plus_one_steps():
    """At t = 0 the chain has taken exactly one step: variance beta_0."""
    s = NoiseSchedule(T=10, beta_start=0.1, beta_end=0.2)
    x = q_sample_iterative(s, torch.zeros(50000, 1), torch.zeros(50000, dtype=torch.long),
                           torch.Generator().manual_seed(0))
    assert x.var().item() == pytest.approx(0.1, rel=0.03)


def test_posterior_matches_eq_7():
    s = NoiseSchedule(T=50)
    x0, x_t = torch.randn(3, 5), torch.randn(3, 5)
    t = torch.tensor([0, 1, 49])
    mean, variance = s.posterior_mean_variance(x0, x_t, t)
    betas = torch.linspace(1e-4, 0.02, 50, dtype=torch.float64)  # by hand, in float64
    alpha_bars = torch.cumprod(1 - betas, 0)
    for i, ti in enumerate(t.tolist()):
        beta, alpha, ab = betas[ti], 1 - betas[ti], alpha_bars[ti]
        ab_prev = alpha_bars[ti - 1] if ti > 0 else torch.tensor(1.0, dtype=torch.float64)
        expected_mean = (ab_prev.sqrt() * beta / (1 - ab)) * x0[i] + (alpha.sqrt() * (1 - ab_prev) / (1 - ab)) * x_t[i]
        torch.testing.assert_close(mean[i], expected_mean.float(), atol=1e-5, rtol=1e-5)
        assert variance[i].item() == pytest.approx((beta * (1 - ab_prev) / (1 - ab)).item(), rel=1e-5)
    assert variance[0].item() == 0.0  # alpha_bar_{-1} = 1: no noise at the last step
    torch.testing.assert_close(mean[0], x0[0])  # and the mean is x0 itself


def test_buffers_move_with_the_module_and_are_float32():
    s = NoiseSchedule(T=10).to(torch.device("cpu"))
    names = {name for name, _ in s.named_buffers()}
    assert {"betas", "alphas", "alpha_bars"} <= names
    assert all(buffer.dtype in (torch.float32, torch.int64) for buffer in s.buffers())


def test_respacing_keeps_alpha_bars_at_the_kept_timesteps():
    s = NoiseSchedule(T=1000)
    r = s.respaced(50)
    assert r.T == 50 and r.timesteps[0].item() == 0 and r.timesteps[-1].item() == 999
    torch.testing.assert_close(r.alpha_bars, s.alpha_bars[r.timesteps], rtol=1e-5, atol=1e-7)
    assert s.respaced(1000) is s


def edm_config(**values):
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(Path(__file__).parents[1] / "conf" / "schedule" / "edm.yaml")
    cfg.pop("defaults")
    return OmegaConf.merge(cfg, values)


def test_edm_schedule_is_the_karras_grid_as_a_variance_preserving_schedule():
    s = NoiseSchedule.from_config(edm_config(T=50))
    levels = (s.sqrt_one_minus_alpha_bars / s.sqrt_alpha_bars).double()
    ramp = torch.linspace(0, 1, 50, dtype=torch.float64)
    expected = (0.002 ** (1 / 7) + ramp * (80 ** (1 / 7) - 0.002 ** (1 / 7))) ** 7
    torch.testing.assert_close(levels, expected, rtol=1e-4, atol=0)
    torch.testing.assert_close(s.alpha_bars.double(), 1 / (1 + expected ** 2), rtol=1e-5, atol=0)


def test_edm_schedule_draws_training_levels_from_its_log_normal():
    s = NoiseSchedule.from_config(edm_config(p_mean=-0.5, p_std=0.8))
    t = s.training_timesteps(200_000, torch.Generator().manual_seed(0), "cpu")
    log_levels = (s.sqrt_one_minus_alpha_bars / s.sqrt_alpha_bars)[t].log()
    assert log_levels.mean().item() == pytest.approx(-0.5, abs=0.02)
    assert log_levels.std().item() == pytest.approx(0.8, abs=0.02)
    uniform = NoiseSchedule(T=1000).training_timesteps(200_000, torch.Generator().manual_seed(0), "cpu")
    assert uniform.float().mean().item() == pytest.approx(499.5, abs=3)


def test_v_prediction_on_the_edm_schedule_is_edm_preconditioning():
    """EDM: y = x0 + s n, D(y) = c_skip y + c_out F(c_in y), trained on lambda(s) |D - x0|^2 with
    c_in = 1/sqrt(1 + s^2), c_skip = 1/(1 + s^2), c_out = s/sqrt(1 + s^2), lambda = 1/c_out^2
    (sigma_data = 1). The VP x_t is c_in y, F's target is -v, and lambda |D - x0|^2 = |F + v|^2."""
    s = NoiseSchedule.from_config(edm_config())
    t = torch.tensor([0, 300, 700, 999])
    x0, n = torch.rand(4, 1, 3, 3) * 2 - 1, torch.randn(4, 1, 3, 3)
    level = (s.sqrt_one_minus_alpha_bars / s.sqrt_alpha_bars)[t].view(-1, 1, 1, 1).double()
    y = x0.double() + level * n.double()
    c_in, c_skip, c_out = 1 / (1 + level ** 2).sqrt(), 1 / (1 + level ** 2), level / (1 + level ** 2).sqrt()
    torch.testing.assert_close(s.q_sample(x0, t, n).double(), c_in * y, rtol=1e-4, atol=1e-5)
    target_f = (x0.double() - c_skip * y) / c_out
    torch.testing.assert_close(-objective("v").target(s, x0, t, n).double(), target_f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind, mean, std", [("linear", 0.0, 1.0), ("cosine", 0.5, 0.8)])
def test_logit_normal_time_draws_sd3s_flow_times(kind, mean, std):
    """The flow time u of each drawn timestep (x_u = (1 - u) x0 + u eps has the timestep's SNR:
    ((1 - u) / u)^2 = alpha_bar / (1 - alpha_bar)) is logit-normal: logit(u) ~ N(mean, std^2)."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"kind": kind, "T": 1000, "beta_start": 1e-4, "beta_end": 0.02,
                            "time_density": "logit_normal", "logit_mean": mean, "logit_std": std})
    schedule = NoiseSchedule.from_config(cfg)
    t = schedule.training_timesteps(200_000, torch.Generator().manual_seed(0), "cpu")
    ab = schedule.alpha_bars.double()[t]
    logit_u = -0.5 * (ab / (1 - ab)).log()   # u / (1 - u) = sqrt((1 - ab) / ab)
    assert logit_u.mean().item() == pytest.approx(mean, abs=0.03)
    assert logit_u.std().item() == pytest.approx(std, rel=0.03)
    uniform = NoiseSchedule.from_config(OmegaConf.merge(cfg, {"time_density": "uniform"}))
    assert uniform.train_weights is None
