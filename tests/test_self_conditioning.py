"""Self-conditioning (Chen et al. 2022, model.self_condition): the model sees its own x0 estimate
for half of each training batch and, at sampling, the estimate of the evaluation before."""

import pytest
import torch
from torch import nn

from conftest import TINY_TRAIN, run_in_process
from diffusion_cli.models import ResUNet
from diffusion_cli.objectives import objective
from diffusion_cli.samplers import SAMPLERS, sample
from diffusion_cli.schedule import NoiseSchedule

SCHEDULE = NoiseSchedule(T=100)


class Hinted(nn.Module):
    """A self-conditioned stand-in: v = x / 2 + hint / 4 (+ a label's shift), recording each call."""
    prediction, self_condition = "v", True

    def __init__(self, num_classes: int = 0):
        super().__init__()
        self.num_classes, self.calls = num_classes, []
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x, t, labels=None, x0_hint=None):
        self.calls.append((x, t, labels, x0_hint))
        shift = 0 if labels is None else labels.view(-1, 1, 1, 1) / 10
        return self.weight * x / 2 + (0 if x0_hint is None else x0_hint / 4) + shift


def test_training_hints_half_the_batch_with_the_models_own_estimate_without_its_gradient():
    model, v = Hinted(), objective("v")
    x0 = torch.rand(2000, 1, 2, 2) * 2 - 1
    v.loss(model, SCHEDULE, x0, torch.Generator().manual_seed(0)).backward()
    (x_est, t_est, _, no_hint), (x_t, t, _, hint) = model.calls
    assert no_hint is None and not hint.requires_grad
    hinted = hint.flatten(1).abs().sum(1) > 0
    assert 0.45 < hinted.float().mean() < 0.55
    assert torch.equal(x_est, x_t[hinted]) and torch.equal(t_est, t[hinted])
    expected = v.eps_and_x0(SCHEDULE, x_t[hinted], t[hinted], x_t[hinted] / 2)[1]
    torch.testing.assert_close(hint[hinted], expected)


@pytest.mark.parametrize("kind", ["dpmpp_2m", "ddim", "heun", "flow_euler"])
def test_sampling_feeds_each_evaluation_the_x0_of_the_one_before(kind):
    model = Hinted()
    sample(model, SCHEDULE, (3, 1, 2, 2), sampler=SAMPLERS[kind](steps=4), generator=torch.Generator().manual_seed(0))
    assert model.calls[0][3] is None and len(model.calls) >= 4
    for (x, t, _, hint), (*_, next_hint) in zip(model.calls, model.calls[1:]):
        output = x / 2 + (0 if hint is None else hint / 4)
        x0 = objective("v").eps_and_x0(SCHEDULE, x, t, output)[1].clamp(-1, 1)
        torch.testing.assert_close(next_hint, x0)


def test_guidance_gives_the_hint_to_the_conditional_and_the_unconditional_half():
    model = Hinted(num_classes=10)
    sample(model, SCHEDULE, (2, 1, 2, 2), sampler="ddim", steps=3, labels=torch.tensor([3, 7]), guidance_scale=3.0)
    _, _, labels, hint = model.calls[1]
    assert labels.tolist() == [3, 7, 10, 10] and torch.equal(hint[:2], hint[2:])


def test_the_resunet_reads_its_hint_and_no_hint_as_zeros():
    torch.manual_seed(0)
    model = ResUNet((1, 8, 8), base_channels=8, self_condition=True).eval()
    nn.init.normal_(model.out[-1].weight)  # the zero-initialised output layer would hide the input
    x, t, hint = torch.randn(2, 1, 8, 8), torch.tensor([5, 50]), torch.rand(2, 1, 8, 8)
    assert model.inp.in_channels == 2
    torch.testing.assert_close(model(x, t), model(x, t, x0_hint=torch.zeros_like(x)))
    assert not torch.allclose(model(x, t), model(x, t, x0_hint=hint))


def test_a_self_conditioned_run_trains_samples_and_resumes_bit_for_bit(tmp_path):
    args = [*TINY_TRAIN, "model=resunet", "model.self_condition=true", "trainer.guide_at=0.25"]
    straight, branch = tmp_path / "straight", tmp_path / "branch"
    assert run_in_process("diffusion-train", *args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    result = run_in_process("diffusion-train", f"resume={straight}/checkpoints/step_0000003.pt",
                            f"hydra.run.dir={branch}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    final, expected = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (branch, straight))
    for key in ("model", "ema"):
        assert all(torch.equal(final[key][name], value) for name, value in expected[key].items()), key
    result = run_in_process("diffusion-sample", f"ckpt={straight}", "num_samples=4", "guidance=auto",
                            "guidance_scale=2", f"hydra.run.dir={tmp_path / 'drawn'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "drawn" / "samples.png").is_file()
