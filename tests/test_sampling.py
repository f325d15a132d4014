import pytest
import torch

from diffusion_cli.models import MLP
from diffusion_cli.objectives import Eps
from diffusion_cli.samplers import sample
from diffusion_cli.samplers.base import Denoised
from diffusion_cli.samplers.ddpm import ddpm_step
from diffusion_cli.schedule import NoiseSchedule


def tiny_model(seed=0, shape=(1, 4, 4)):
    torch.manual_seed(seed)
    return MLP(shape, width=16, depth=1).eval()


def x0_of(s, eps, i, x, clip_x0=True):
    """The x0 estimate a sampler steps from, for an eps-predicting model's output."""
    return Denoised(lambda: eps, s, i, x, Eps(), clip_x0).x0


def test_last_step_adds_no_noise_and_returns_the_clipped_x0():
    s = NoiseSchedule(T=10)
    x, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    with_noise = ddpm_step(s, x0_of(s, eps, 0, x), 0, x, noise=torch.randn_like(x) * 100)
    without = ddpm_step(s, x0_of(s, eps, 0, x), 0, x, noise=None)
    torch.testing.assert_close(with_noise, without)
    x0 = s.predict_x0(x, torch.zeros(3, dtype=torch.long), eps).clamp(-1, 1)
    torch.testing.assert_close(with_noise, x0)


def test_steps_before_the_last_add_noise_with_the_posterior_variance():
    s = NoiseSchedule(T=10)
    x, eps, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    difference = ddpm_step(s, x0_of(s, eps, 5, x), 5, x, noise) - ddpm_step(s, x0_of(s, eps, 5, x), 5, x, None)
    torch.testing.assert_close(difference, s.posterior_variance[5].sqrt() * noise)


def test_unclipped_step_is_algorithm_2():
    """x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - ab_t) eps) + sigma_t z (Ho et al. Alg. 2)."""
    s = NoiseSchedule(T=100)
    x, eps, z = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    for i in (99, 50, 1):
        ours = ddpm_step(s, x0_of(s, eps, i, x, clip_x0=False), i, x, z)
        algorithm2 = (x - s.betas[i] / s.sqrt_one_minus_alpha_bars[i] * eps) / s.alphas[i].sqrt() \
            + s.posterior_variance[i].sqrt() * z
        torch.testing.assert_close(ours, algorithm2, atol=1e-5, rtol=1e-4)


def test_same_seed_same_images_and_output_in_range():
    s, model = NoiseSchedule(T=30), tiny_model()
    a = sample(model, s, (5, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    b = sample(model, s, (5, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    c = sample(model, s, (5, 1, 4, 4), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    assert a.min() >= -1 and a.max() <= 1


def test_return_all_steps_gives_the_trajectory_from_x_T():
    s, model = NoiseSchedule(T=30), tiny_model()
    trajectory = sample(model, s, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0),
                        return_all_steps=True)
    assert trajectory.shape == (31, 2, 1, 4, 4)
    x_T = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(trajectory[0], x_T)
    respaced = sample(model, s, (2, 1, 4, 4), steps=5, return_all_steps=True)
    assert respaced.shape == (6, 2, 1, 4, 4)


def test_the_exact_denoiser_of_a_few_points_samples_those_points():
    """With the ideal eps-predictor for a data set of 4 images, ancestral sampling must land on
    the data: a check of the whole sampler that no trained model could fake."""
    data = torch.tensor([-0.8, -0.2, 0.3, 0.9]).repeat_interleave(16).view(4, 1, 4, 4)
    s = NoiseSchedule(T=200, beta_end=0.05)

    class Exact(torch.nn.Module):
        def forward(self, x, t):
            ab = s.alpha_bars[t].view(-1, 1, 1)
            d2 = ((x.flatten(1)[:, None] - ab.sqrt() * data.flatten(1)[None]) ** 2).sum(-1)
            weights = torch.softmax(-d2 / (2 * (1 - ab[:, :, 0])), dim=1)
            x0 = (weights @ data.flatten(1)).view_as(x)
            return (x - ab.view(-1, 1, 1, 1).sqrt() * x0) / (1 - ab.view(-1, 1, 1, 1)).sqrt()

        def parameters(self):
            yield data

    images = sample(Exact(), s, (64, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    distance = (images.flatten(1)[:, None] - data.flatten(1)[None]).abs().amax(-1).min(1).values
    assert distance.max().item() < 0.01
    hits = (images.flatten(1)[:, None] - data.flatten(1)[None]).abs().amax(-1).argmin(1)
    assert set(hits.tolist()) == {0, 1, 2, 3}  # every data point is reached


def test_whole_trajectory_matches_diffusers_ddpm_scheduler():
    """1000 steps through ours and diffusers' DDPMScheduler (fixed_small variance, clipping on),
    with the same initial noise and the same per-step noise, agree at every step."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", variance_type="fixed_small",
                                        clip_sample=True, clip_sample_range=1.0)
    scheduler.set_timesteps(1000)
    s, model = NoiseSchedule(T=1000), tiny_model()
    shape = (3, 1, 4, 4)
    ours = sample(model, s, shape, generator=torch.Generator().manual_seed(0), return_all_steps=True)

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    theirs = [x]
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(x, t.expand(shape[0]))
            x = scheduler.step(eps, t, x, generator=generator).prev_sample
            theirs.append(x)
    theirs = torch.stack(theirs)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_ddim_trailing_timesteps():
    from diffusion_cli.samplers.base import trailing_timesteps
    assert trailing_timesteps(1000, 50)[:3] == [999, 979, 959] and trailing_timesteps(1000, 50)[-1] == 19
    assert trailing_timesteps(10, 10) == list(range(9, -1, -1))


def test_whole_ddim_trajectory_matches_diffusers_at_eta_0():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear", clip_sample=True, set_alpha_to_one=True,
                                        timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    s, model = NoiseSchedule(T=1000), tiny_model()
    shape = (3, 1, 4, 4)
    ours = sample(model, s, shape, sampler="ddim", steps=50, eta=0.0,
                  generator=torch.Generator().manual_seed(0), return_all_steps=True)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    theirs = [x]
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(shape[0])), t, x, eta=0.0,
                               use_clipped_model_output=True).prev_sample
            theirs.append(x)
    torch.testing.assert_close(ours, torch.stack(theirs), atol=1e-4, rtol=1e-4)


def test_ddim_single_steps_match_diffusers_at_eta_1():
    diffusers = pytest.importorskip("diffusers")
    from diffusion_cli.samplers.ddim import ddim_step
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=True,
                                        set_alpha_to_one=True, timestep_spacing="trailing")
    scheduler.set_timesteps(50)
    s = NoiseSchedule(T=1000)
    x, eps, noise = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    for t in (999, 519, 39):
        theirs = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise,
                                use_clipped_model_output=True).prev_sample
        denoised = Denoised(lambda: eps, s, t, x, Eps(), clip_x0=True)
        torch.testing.assert_close(ddim_step(s, denoised.x0, denoised.eps, t, t - 20, x, 1.0, noise), theirs,
                                   atol=1e-5, rtol=1e-4)


def test_ddim_gives_the_same_images_whatever_the_batch_split():
    from omegaconf import OmegaConf
    from diffusion_cli.generation import sample_images
    s, model = NoiseSchedule(T=100), tiny_model(shape=(1, 3, 5))
    cfg = OmegaConf.create(dict(kind="ddim", steps=10, eta=0.0, clip_x0=True))
    whole = sample_images(model, s, cfg, (41, 1, 3, 5), batch_size=41, seed=1)
    split = sample_images(model, s, cfg, (41, 1, 3, 5), batch_size=7, seed=1)
    torch.testing.assert_close(whole, split)
    assert not torch.allclose(whole, sample_images(model, s, cfg, (41, 1, 3, 5), batch_size=41, seed=2))


def test_cosine_schedule_matches_diffusers_squaredcos():
    diffusers = pytest.importorskip("diffusers")
    reference = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    s = NoiseSchedule(T=1000, kind="cosine")
    torch.testing.assert_close(s.betas, reference.betas)
    torch.testing.assert_close(s.alpha_bars, reference.alphas_cumprod, atol=1e-6, rtol=1e-5)
    assert s.betas.max().item() == pytest.approx(0.999)


class TimestepRecorder(torch.nn.Module):
    """eps = 0, recording the timesteps it is asked at; no parameters."""
    prediction, num_classes = "eps", 0

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, labels=None):
        self.seen.append(t[0].item())
        return torch.zeros_like(x)


@pytest.mark.parametrize("steps", [1, 2, 20])
def test_respaced_ddpm_starts_at_the_last_timestep_for_any_number_of_steps(steps):
    """One step used to keep only t = 0: the model saw pure noise labelled as clean and returned it."""
    s, model = NoiseSchedule(T=20), TimestepRecorder()
    respaced = s.respaced(steps)
    assert respaced.T == steps and respaced.timesteps[-1].item() == 19
    x_T = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    x = sample(model, s, x_T.shape, steps=steps, x_T=x_T)  # no parameters: the schedule's device
    assert model.seen[0] == 19 and len(model.seen) == steps
    if steps == 1:  # the x0 estimate at T-1 from eps = 0: x_T / sqrt(alpha_bar), clipped
        torch.testing.assert_close(x, (x_T / s.sqrt_alpha_bars[19]).clamp(-1, 1))


def test_sample_images_never_draws_more_than_a_batch_of_noise(monkeypatch):
    from omegaconf import OmegaConf
    from diffusion_cli.generation import sample_images
    largest, randn = [0], torch.randn

    def recording(*args, **kwargs):
        out = randn(*args, **kwargs)
        largest[0] = max(largest[0], out.numel())
        return out
    monkeypatch.setattr(torch, "randn", recording)
    cfg = OmegaConf.create(dict(kind="ddpm", steps=5, clip_x0=True))
    images = sample_images(tiny_model(shape=(1, 3, 5)), NoiseSchedule(T=10), cfg, (50, 1, 3, 5),
                           batch_size=8, seed=0)
    assert images.shape == (50, 1, 3, 5) and largest[0] <= 8 * 15


def diffusers_trajectory(scheduler, model, shape, steps, noises=None):
    """x_T from seed 0, then `scheduler`'s steps; `noises` the variance noise of each step."""
    scheduler.set_timesteps(steps)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    trajectory = [x]
    with torch.no_grad():
        for k, t in enumerate(scheduler.timesteps):
            extra = {} if noises is None else {"variance_noise": noises[k]}
            x = scheduler.step(model(x, t.expand(shape[0])), t, x, **extra).prev_sample
            trajectory.append(x)
    return torch.stack(trajectory)


@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_dpmpp_2m_trajectory_matches_diffusers(steps, kind):
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule={"linear": "linear", "cosine": "squaredcos_cap_v2"}[kind],
        algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
        final_sigmas_type="zero")
    s, model, shape = NoiseSchedule(T=1000, kind=kind), tiny_model(), (3, 1, 4, 4)
    ours = sample(model, s, shape, sampler="dpmpp_2m", steps=steps, clip_x0=False,
                  generator=torch.Generator().manual_seed(0), return_all_steps=True)
    torch.testing.assert_close(ours, diffusers_trajectory(scheduler, model, shape, steps), atol=1e-4, rtol=1e-4)


def test_dpmpp_2m_at_eta_1_matches_diffusers_sde_solver():
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000, algorithm_type="sde-dpmsolver++", solver_order=2,
        timestep_spacing="trailing", final_sigmas_type="zero")
    s, model, shape, steps = NoiseSchedule(T=1000), tiny_model(), (3, 1, 4, 4), 15
    ours = sample(model, s, shape, sampler="dpmpp_2m", steps=steps, eta=1.0, clip_x0=False,
                  generator=torch.Generator().manual_seed(0), return_all_steps=True)
    # Ours draws x_T, then each step's noise (none on the last), from the one generator.
    generator = torch.Generator().manual_seed(0)
    torch.randn(shape, generator=generator)
    noises = [torch.randn(shape, generator=generator) for _ in range(steps - 1)] + [torch.zeros(shape)]
    theirs = diffusers_trajectory(scheduler, model, shape, steps, noises)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def gaussian_data_denoiser(s: NoiseSchedule, mean: float, std: float):
    """The exact eps-predictor for data x0 ~ N(mean, std^2) per pixel: E[eps | x_t]."""
    class Exact(torch.nn.Module):
        prediction, num_classes = "eps", 0

        def forward(self, x, t, labels=None):
            a = s.sqrt_alpha_bars[t].double().view(-1, 1, 1, 1)
            sigma = s.sqrt_one_minus_alpha_bars[t].double().view(-1, 1, 1, 1)
            return (sigma * (x - a * mean) / (a ** 2 * std ** 2 + sigma ** 2)).to(x.dtype)
    return Exact()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_high_order_samplers_solve_the_probability_flow_ode_to_second_order(kind):
    """For Gaussian data the probability-flow ODE has a closed form: in y = x / alpha, s = sigma /
    alpha, y(0) = mean + (y_T - mean) std / sqrt(std^2 + s_T^2). DPM-Solver++ must land far closer
    to it than DDIM at the same number of model evaluations, and Heun's error must fall like a
    second-order method's (2.5x the steps: 6x less error) where DDIM's falls like a first-order one."""
    s, mean, std = NoiseSchedule(T=1000, kind=kind), 0.3, 0.5
    model = gaussian_data_denoiser(s, mean, std)
    x_T = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s_T = (s.sqrt_one_minus_alpha_bars[-1] / s.sqrt_alpha_bars[-1]).double()
    exact = mean + (x_T / s.sqrt_alpha_bars[-1].double() - mean) * std / (std ** 2 + s_T ** 2).sqrt()

    def error(sampler, steps):
        out = sample(model, s, x_T.shape, sampler=sampler, steps=steps, clip_x0=False, x_T=x_T,
                     return_all_steps=True)[-1]
        return (out - exact).pow(2).mean().sqrt().item()
    assert error("dpmpp_2m", 20) < error("ddim", 20) / 3
    assert error("heun", 20) / error("heun", 50) > 4 > 3 > error("ddim", 20) / error("ddim", 50)
    assert error("heun", 1000) < 2e-4  # converges, to the float32 coefficients' precision


@pytest.mark.parametrize("kind, evaluations", [("linear", 18), ("edm", 19)])
def test_heun_evaluates_the_model_twice_per_step_but_at_the_ends(kind, evaluations):
    """10 steps: Karras-spaced timesteps from T-1 down to 0, each evaluated twice except the last
    (an Euler step to the clean image) and, where the schedule's top is above SIGMA_MAX, the first."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.create(dict(kind=kind, T=1000, beta_start=1e-4, beta_end=0.02, sigma_min=0.002,
                                sigma_max=80.0, rho=7.0, p_mean=-1.2, p_std=1.2))
    s, model = NoiseSchedule.from_config(cfg), TimestepRecorder()
    sample(model, s, (2, 1, 4, 4), sampler="heun", steps=10)
    assert len(model.seen) == evaluations and model.seen[0] == 999 and model.seen[-1] == 0
    assert len(set(model.seen)) == 10


def flow_schedule(T: int = 1000) -> NoiseSchedule:
    from omegaconf import OmegaConf
    return NoiseSchedule.from_config(OmegaConf.create({"kind": "flow", "T": T, "time_density": "uniform",
                                                       "logit_mean": 0.0, "logit_std": 1.0}))


def flow_velocity_model(s: NoiseSchedule):
    """A flow model (objective=flow) whose velocity is a fixed nonlinear function of the flow's
    x_u and u: what diffusers' flow schedulers are handed as model_output, as a function of (x_u, u)."""
    from diffusion_cli.samplers.flow import flow_point

    def velocity(x_u, u):
        return torch.tanh(x_u) * (1 + u) - 0.3 * x_u

    class Model(torch.nn.Module):
        prediction, num_classes = "flow", 0

        def forward(self, x, t, labels=None):
            u, scale = zip(*(flow_point(s, i) for i in t.tolist()))
            u, scale = (torch.tensor(v, dtype=x.dtype).view(-1, 1, 1, 1) for v in (u, scale))
            return velocity(x / scale, u)
    return Model(), velocity


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_euler_trajectory_matches_diffusers_flow_match_euler(shift):
    """sampler=flow_euler on schedule=flow against FlowMatchEulerDiscreteScheduler handed the same
    flow times (ours: evenly spaced in u on the training grid, then shifted), step by step, in
    the flow's x_u = x_t / (a + s)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusion_cli.samplers.flow import FlowEuler, flow_point

    s = flow_schedule()
    model, velocity = flow_velocity_model(s)
    sampler, shape = FlowEuler(steps=10, shift=shift, clip_x0=False), (3, 1, 4, 4)
    ours = sample(model, s, shape, sampler=sampler, generator=torch.Generator().manual_seed(0),
                  return_all_steps=True, clamp=False)
    timesteps = sampler.timesteps(s, 10)
    us = [flow_point(s, t)[0] for t in timesteps]
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)  # us are shifted
    scheduler.set_timesteps(sigmas=us)
    x = ours[0] / flow_point(s, timesteps[0])[1]
    for k, t in enumerate(scheduler.timesteps):
        u = scheduler.sigmas[k].item()
        assert u == pytest.approx(us[k], rel=1e-6)
        x = scheduler.step(velocity(x, torch.tensor(u)), t, x).prev_sample
        ours_u = ours[k + 1] / (flow_point(s, timesteps[k + 1])[1] if k + 1 < len(timesteps) else 1.0)
        torch.testing.assert_close(ours_u, x, atol=1e-5, rtol=1e-5)


def test_flow_times_are_diffusers_linspace_then_shifted():
    """Unshifted, our flow times are diffusers' sigmas (linspace from 1 to 1/T) to within the training
    grid's spacing (u = (t + 1) / (T + 1)); shifted, they are SD3's shift of that linspace."""
    diffusers = pytest.importorskip("diffusers")
    from diffusion_cli.samplers.flow import FlowEuler, flow_point, shifted

    s = flow_schedule()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    scheduler.set_timesteps(10)
    us = torch.tensor([flow_point(s, t)[0] for t in FlowEuler(steps=10).timesteps(s, 10)], dtype=torch.float64)
    torch.testing.assert_close(us, scheduler.sigmas[:-1].double(), atol=1.5e-3, rtol=0)
    shifted_us = [flow_point(s, t)[0] for t in FlowEuler(steps=10, shift=3.0).timesteps(s, 10)]
    torch.testing.assert_close(torch.tensor(shifted_us, dtype=torch.float64), shifted(us, 3.0), atol=1.5e-3, rtol=0)


def test_flow_heun_solves_the_flow_ode_to_second_order():
    """On Gaussian data the exact ODE solution is known (as above, in y = x / alpha): flow_heun's
    error falls like a second-order method's, flow_euler's like a first-order one's."""
    s, mean, std = flow_schedule(), 0.3, 0.5
    model = gaussian_data_denoiser(s, mean, std)
    x_T = torch.randn(256, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s_T = (s.sqrt_one_minus_alpha_bars[-1] / s.sqrt_alpha_bars[-1]).double()
    exact = mean + (x_T / s.sqrt_alpha_bars[-1].double() - mean) * std / (std ** 2 + s_T ** 2).sqrt()

    def error(sampler, steps):
        out = sample(model, s, x_T.shape, sampler=sampler, steps=steps, clip_x0=False, x_T=x_T, clamp=False)
        return (out - exact).pow(2).mean().sqrt().item()
    assert error("flow_heun", 20) / error("flow_heun", 50) > 4 > 3 > error("flow_euler", 20) / error("flow_euler", 50)
    assert error("flow_heun", 20) < error("flow_euler", 20) / 3
