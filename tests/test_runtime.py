"""The training step's device-side skip, mixed precision, torch.compile and its fallback, and the
benchmark script."""

import json
import logging
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_module

from conftest import TINY_TRAIN, run_cli, script
from diffusion_cli import runtime
from diffusion_cli.data import Split
from diffusion_cli.train import TrainStep


def tiny_config(*overrides: str):
    from diffusion_cli import config  # noqa: F401 (registers the schemas)

    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        return compose("train", overrides=[*TINY_TRAIN, *overrides])


def test_a_non_finite_step_is_skipped_on_the_device_and_counted():
    cfg = tiny_config()
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    step = TrainStep(cfg, torch.device("cpu"), Split(images, None))
    step(1)
    weights = {k: v.clone() for k, v in step.model.state_dict().items()}
    ema = {k: v.clone() for k, v in step.ema.model.state_dict().items()}
    step.images[:] = float("nan")  # every batch now gives a NaN loss
    step(2)
    step(3)
    for key, value in step.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for key, value in step.ema.model.state_dict().items():
        assert torch.equal(value, ema[key]), key
    assert all(state["step"].item() == 1 for state in step.optimizer.state.values())
    loss, skipped, first, stop = step.read_stats(reset_loss=True)
    assert (skipped, first, stop) == (2, 2, False) and loss > 0  # the mean covers the one applied step


def test_compile_falls_back_with_one_warning_where_it_cannot_work(monkeypatch, caplog):
    def broken(model):
        def call(*args):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        assert runtime.compiled(model, True, (torch.zeros(1, 2),), "trainer.compile") is model
    assert "torch.compile does not work here (Compiler: cc not found)" in caplog.text
    assert "trainer.compile=false" in caplog.text


@pytest.mark.slow
def test_bf16_and_compile_train_and_sample(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("diffusion-train", *TINY_TRAIN, "trainer.precision=bf16", "trainer.compile=true",
            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state["model"])  # loads into a plain model
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < loss < 10 for loss in losses)
    sample_dir = tmp_path / "sampled"
    run_cli("diffusion-sample", f"ckpt={run_dir}", "precision=bf16", "num_samples=4",
            f"hydra.run.dir={sample_dir}", cwd=tmp_path)
    images = torch.load(sample_dir / "samples.pt")
    assert images.dtype == torch.float32 and images.isfinite().all()


@pytest.mark.slow
def test_fp16_uses_a_grad_scaler_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    run_cli("diffusion-train", *TINY_TRAIN, "trainer.precision=fp16", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    run_cli("diffusion-train", f"resume={run_dir}", "trainer.max_steps=8", cwd=tmp_path)
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
def test_the_benchmark_prints_its_three_tables():
    result = subprocess.run([script("diffusion-bench"), "--quick", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("device cpu") and "torch " in out and "threads" in out
    for heading in ("## train", "## sample", "## model"):
        assert heading in out
    assert "| resunet |" in out and "| DDIM | diffusion-cli sample() |" in out
    assert "| DDPM | diffusers DDPMScheduler |" in out and "diffusers UNet2DModel" in out


@pytest.mark.slow
@pytest.mark.parametrize("args, named", [
    (["speed"], "unknown table 'speed'"),
    pytest.param(["--device", "cuda"], "--device=cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--precision", "fp8"], "--precision")])
def test_the_benchmark_refuses_bad_input_in_one_line(args, named):
    result = subprocess.run([script("diffusion-bench"), *args], capture_output=True, text=True)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
