"""Resume edge cases: an older checkpoint branches, a longer run re-warms its learning rate, a run
moves between device types."""

import json
import math
import shutil

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_TRAIN, metric_steps, run_in_process, snapshot
from diffusion_cli.lr_schedule import learning_rate


def test_resuming_an_older_checkpoint_branches_into_a_new_run_dir(trained_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(trained_run, original)
    before = snapshot(original)
    older = original / "checkpoints" / "step_0000003.pt"
    result = run_in_process("diffusion-train", f"resume={older}", "trainer.max_steps=5", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert snapshot(original) == before  # its later checkpoints and metrics are untouched
    [branch] = (tmp_path / "outputs").glob("*/*")
    assert "from step 3 in a new run dir" in result.stdout
    assert metric_steps(branch) == [2, 3, 4, 5]  # the history up to step 3, then its own steps
    state = torch.load(branch / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 5 and state["config"]["resume"] == str(older)  # where it came from
    assert (branch / ".hydra" / "overrides.yaml").is_file()


def test_an_older_checkpoint_never_continues_in_its_own_run_dir(trained_run, tmp_path):
    original = tmp_path / "original"
    shutil.copytree(trained_run, original)
    before = snapshot(original)
    older = original / "checkpoints" / "step_0000003.pt"
    for extra in ([], ["overwrite=true"]):  # overwrite may not delete what the run reads
        result = run_in_process("diffusion-train", f"resume={older}", f"hydra.run.dir={original}",
                                *extra, cwd=tmp_path)
        assert result.returncode == 2 and "hydra.run.dir" in result.stderr, result.stderr
    assert snapshot(original) == before


def test_resuming_the_latest_checkpoint_continues_in_place(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    latest = run_dir / "checkpoints" / "step_0000006.pt"
    result = run_in_process("diffusion-train", f"resume={latest}", "trainer.max_steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "outputs").exists() and metric_steps(run_dir) == [2, 3, 4, 6, 8]


def lrs(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {line["step"]: line["lr"] for line in lines if "lr" in line}


def test_raising_max_steps_rewarms_the_cosine_rate_instead_of_jumping(tmp_path):
    run_dir = tmp_path / "run"
    args = [*TINY_TRAIN, "trainer.log_every=1", "trainer.lr_warmup_steps=3", f"hydra.run.dir={run_dir}"]
    assert run_in_process("diffusion-train", *args, cwd=tmp_path).returncode == 0
    result = run_in_process("diffusion-train", f"resume={run_dir}", "trainer.max_steps=16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    logged = lrs(run_dir)
    assert sorted(logged) == list(range(1, 17)) and logged[6] == 0.0  # cosine at its end
    tc = OmegaConf.create({"lr": 0.002, "lr_warmup_steps": 3, "lr_schedule": "cosine", "max_steps": 16})
    for step in (7, 8):  # a third and two thirds of the way from 0 to the new curve
        assert logged[step] == pytest.approx((step - 6) / 3 * learning_rate(step, tc))
    for step in range(9, 17):  # then the cosine of a 16-step run
        assert logged[step] == pytest.approx(learning_rate(step, tc))
    rises = [logged[s + 1] - logged[s] for s in range(6, 16)]
    assert max(rises) <= 0.002 / 3  # never more than a warm-up step's rise


def test_the_learning_rate_curve_of_each_schedule():
    tc = OmegaConf.create({"lr": 1.0, "lr_warmup_steps": 10, "lr_schedule": "cosine", "max_steps": 110})
    assert [learning_rate(s, tc) for s in (0, 5, 10)] == [0.0, 0.5, 1.0]
    assert learning_rate(60, tc) == pytest.approx(0.5) and learning_rate(110, tc) == pytest.approx(0.0)
    assert learning_rate(55, tc, rewarm=(50, 0.1)) == pytest.approx(0.1 + (learning_rate(55, tc) - 0.1) / 2)
    assert learning_rate(60, tc, rewarm=(50, 0.1)) == learning_rate(60, tc)
    constant = OmegaConf.merge(tc, {"lr_schedule": "constant"})
    assert learning_rate(100, constant) == 1.0 and math.isclose(learning_rate(3, constant), 0.3)


def test_a_run_from_another_device_type_resumes_with_a_new_stream(trained_run, tmp_path):
    """A GPU run resumed on the CPU (the checkpoint's states made to look like CUDA's: a Philox
    state is 16 bytes and can't go into a CPU generator)."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["rng"] = {"device_type": "cuda", "ranks": [{"train": torch.zeros(16, dtype=torch.uint8),
                                                      "torch": torch.get_rng_state(),
                                                      "cuda": torch.zeros(16, dtype=torch.uint8)}]}
    torch.save(state, last)
    result = run_in_process("diffusion-train", f"resume={run_dir}", "trainer.max_steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "this run trained on cuda, it resumes on cpu" in result.stdout + result.stderr
    resumed = torch.load(last, weights_only=True)
    assert resumed["step"] == 8 and resumed["rng"]["device_type"] == "cpu"


def test_a_format_1_checkpoint_still_resumes(trained_run, tmp_path):
    """Written before per-rank random states and trainer.grad_clip existed."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    [mine] = state["rng"]["ranks"]
    del state["config"]["trainer"]["grad_clip"]
    state.update(format_version=1, rng={"torch": mine["torch"], "train": mine["train"],
                                        "python": (3, (0,) * 625, None)})
    torch.save(state, last)
    result = run_in_process("diffusion-train", f"resume={run_dir}", "trainer.max_steps=8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert torch.load(last, weights_only=True)["step"] == 8


def test_a_resumed_run_keeps_its_power_emas_and_guide_bit_for_bit(tmp_path):
    """The power EMAs (the sampling one and trainer.ema_profiles) and the autoguidance guide, taken
    at step 2 of 6, come out of a run resumed from its step-3 checkpoint as from a straight run."""
    args = [*TINY_TRAIN, "trainer.ema_sigma_rel=0.1", "trainer.ema_profiles=[0.05,0.2]", "trainer.guide_at=0.25"]
    straight = tmp_path / "straight"
    assert run_in_process("diffusion-train", *args, f"hydra.run.dir={straight}", cwd=tmp_path).returncode == 0
    branch = tmp_path / "branch"
    result = run_in_process("diffusion-train", f"resume={straight}/checkpoints/step_0000003.pt",
                            f"hydra.run.dir={branch}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    final, expected = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (branch, straight))
    early = torch.load(straight / "checkpoints" / "step_0000003.pt", weights_only=True)
    for key in ("model", "ema", "ema_0.05", "ema_0.2", "guide"):
        for name, value in expected[key].items():
            assert torch.equal(final[key][name], value), f"{key}.{name}"
    assert all(torch.equal(early["guide"][name], value) for name, value in expected["guide"].items())
    assert any(not torch.equal(expected["ema_0.05"][name], value) for name, value in expected["ema_0.2"].items())
