"""The training step's device-side skip, mixed precision, torch.compile and its fallback, and the
benchmark script."""

import json
import logging
import math
import subprocess

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import TINY_TRAIN, run_in_process, script
from diffusion_cli import runtime
from diffusion_cli.data import Split
from diffusion_cli.errors import UserError
from diffusion_cli.train import TrainStep


def tiny_config(*overrides: str):
    from diffusion_cli import config  # noqa: F401 (registers the schemas)

    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        return compose("train", overrides=[*TINY_TRAIN, *overrides])


def random_images() -> Split:
    """A tiny unlabelled training set of the tiny config's shape."""
    return Split(torch.rand(64, 3, 16, 16), None)  # stored as floats in [0, 1]


def weights_and_ema(step: TrainStep) -> dict:
    return {f"{part}.{key}": value.clone() for part, model in (("model", step.model), ("ema", step.ema.model))
            for key, value in model.state_dict().items()}


def assert_unchanged(before: dict, after: dict) -> None:
    """A skipped step left the weights and the EMA as they were, bit for bit."""
    for key, value in after.items():
        assert torch.equal(value, before[key]), key


def test_a_non_finite_step_is_skipped_on_the_device_and_counted():
    cfg = tiny_config()
    images = torch.rand(64, 3, 16, 16) * 2 - 1
    step = TrainStep(cfg, torch.device("cpu"), Split(images, None))
    step(1)
    before = weights_and_ema(step)
    step.batches.images[:] = float("nan")  # every batch now gives a NaN loss
    step(2)
    step(3)
    assert_unchanged(before, weights_and_ema(step))
    assert all(state["step"].item() == 1 for state in step.optimizer.state.values())
    stats = step.read_stats(reset_loss=True)
    assert (stats.skipped, stats.first_skipped, stats.stop) == (2, 2, False)
    assert stats.loss > 0  # the mean covers the one applied step


class HostReads(TorchDispatchMode):
    """Counts device-to-host reads (a tensor's value to a Python number: .item(), bool(t), a
    tensor used as a Scalar), which on a GPU each wait for the device."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("overrides", [[], ["trainer.grad_clip=0"],
                                       ["model=unet", "model.base_channels=8"]])
def test_the_training_step_never_reads_a_value_back_to_the_host(overrides):
    cfg = tiny_config(*overrides)
    step = TrainStep(cfg, torch.device("cpu"), random_images())
    step(1)  # the optimizer's lazy state
    with HostReads() as reads:
        for n in range(2, 5):
            step(n)
    assert reads.count == 0
    if torch.cuda.is_available():  # the same check where a sync really costs
        cuda_step = TrainStep(cfg, torch.device("cuda"), random_images())
        cuda_step(1)
        torch.cuda.set_sync_debug_mode("error")
        try:
            cuda_step(2)
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_grad_clip_bounds_the_gradient_norm():
    images = random_images()
    norms = {}
    for clip in (0.0, 1e-3):
        step = TrainStep(tiny_config(f"trainer.grad_clip={clip}"), torch.device("cpu"), images)
        step(1)  # the gradients stay on the parameters until the next step
        norms[clip] = torch.cat([p.grad.flatten() for p in step.model.parameters()]).norm().item()
    assert norms[0.0] > 1e-2 and norms[1e-3] <= 1e-3 * 1.001


def test_accumulated_micro_batches_make_the_step_of_their_whole_batch():
    """grad_accum=2 of 4 images: the gradients (clipped after accumulating), the weights and the
    logged loss of one step of the same 8 images, timesteps and noise, up to float rounding."""
    generator = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(8, 3, 16, 16, generator=generator) * 2 - 1, torch.randn(8, 3, 16, 16, generator=generator)
    t = torch.randint(0, 20, (8,), generator=generator)
    steps = {}
    for batch, accum in ((8, 1), (4, 2)):
        step = steps[accum] = TrainStep(tiny_config(f"trainer.batch_size={batch}", f"trainer.grad_accum={accum}"),
                                        torch.device("cpu"), random_images())
        starts = iter(range(0, 8, batch))

        def fixed_loss(network, _batch, _generator, schedule=step.task.schedule):
            part = slice(start := next(starts), start + batch)
            output = network(schedule.q_sample(x0[part], t[part], noise[part]), t[part], None)
            return (output - noise[part]).pow(2).mean()
        step.task.loss = fixed_loss
        step(1)
    grads = {accum: torch.cat([p.grad.flatten() for p in step.model.parameters()]) for accum, step in steps.items()}
    torch.testing.assert_close(grads[2], grads[1], rtol=1e-5, atol=1e-7)
    for one, two in zip(steps[1].model.parameters(), steps[2].model.parameters()):
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-7)
    losses = [steps[accum].read_stats(reset_loss=True).loss for accum in (1, 2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


def test_fp16_overflow_skips_are_counted_apart_and_kept_out_of_the_ema_and_loss():
    step = TrainStep(tiny_config("trainer.precision=fp16"), torch.device("cpu"),
                     random_images())
    step.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 120)  # fp16 gradients overflow
    before = weights_and_ema(step)
    step(1)
    assert_unchanged(before, weights_and_ema(step))
    stats = step.read_stats(reset_loss=True)
    assert stats.overflows == 1 and math.isnan(stats.loss)  # no applied step to average
    assert stats.skipped == 0  # routine under fp16: no reason to stop the run
    assert step.scaler.get_scale() < 2.0 ** 120  # the scaler backed off


def test_ranks_start_from_the_same_weights_but_draw_their_own_dropout(monkeypatch):
    cfg = tiny_config()
    images = random_images()
    weights, global_states = [], []
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        step = TrainStep(cfg, torch.device("cpu"), images)
        weights.append(step.model.state_dict())
        global_states.append(torch.get_rng_state())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(*global_states)


def test_an_explicit_gpu_index_under_torchrun_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="LOCAL_RANK") as error:
        runtime.resolve_device("cuda:0", key="trainer.device")
    assert "trainer.device=cuda" in str(error.value)
    assert runtime.resolve_device("cuda", key="trainer.device") == torch.device("cuda", 1)


def test_a_gpu_index_past_the_last_gpu_names_the_ones_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"trainer.device=cuda:2 but this machine's devices are: cpu, cuda:0, cuda:1"):
        runtime.resolve_device("cuda:2", key="trainer.device")
    assert runtime.resolve_device("cuda:1", key="trainer.device") == torch.device("cuda", 1)


def test_tf32_and_cudnn_autotuning_are_on_for_a_gpu_only():
    flags = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    try:
        torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        runtime.use_fast_math(torch.device("cpu"))
        assert not torch.backends.cudnn.benchmark and not torch.backends.cuda.matmul.allow_tf32
        runtime.use_fast_math(torch.device("cuda", 0))
        assert torch.backends.cudnn.benchmark and torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
         torch.backends.cuda.matmul.allow_tf32) = flags


def test_compile_falls_back_with_one_warning_where_it_cannot_work(monkeypatch, caplog):
    def broken(model):
        def call(*args):
            raise RuntimeError("Compiler: cc not found\nmore detail")
        return call
    monkeypatch.setattr(torch, "compile", broken)
    model = torch.nn.Linear(2, 2)
    with caplog.at_level(logging.WARNING):
        assert runtime.compiled(model, True, lambda network: network(torch.zeros(1, 2)),
                                "trainer.compile") is model
    assert "torch.compile does not work here (Compiler: cc not found)" in caplog.text
    assert "trainer.compile=false" in caplog.text


@pytest.mark.slow
def test_the_compiled_training_step_compiles_once():
    """The warm-up call is the training step's own (batch shape, grad mode, autocast), so the
    steps after it never recompile."""
    import torch._dynamo

    torch._dynamo.reset()
    step = TrainStep(tiny_config("trainer.compile=true"), torch.device("cpu"),
                     random_images())
    assert step.network is not step.model  # compiled here (a C compiler is on the test machines)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for n in range(1, 4):
            step(n)


@pytest.mark.slow
def test_bf16_and_compile_train_and_sample(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_in_process("diffusion-train", *TINY_TRAIN, "trainer.precision=bf16", "trainer.compile=true",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert not any(key.startswith("_orig_mod") for key in state["model"])  # loads into a plain model
    losses = [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(0 < loss < 10 for loss in losses)
    sample_dir = tmp_path / "sampled"
    sampled = run_in_process("diffusion-sample", f"ckpt={run_dir}", "precision=bf16", "num_samples=4",
                             f"hydra.run.dir={sample_dir}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    images = torch.load(sample_dir / "samples.pt")
    assert images.dtype == torch.float32 and images.isfinite().all()


@pytest.mark.slow
def test_fp16_uses_a_grad_scaler_that_resumes(tmp_path):
    run_dir = tmp_path / "run"
    trained = run_in_process("diffusion-train", *TINY_TRAIN, "trainer.precision=fp16", f"hydra.run.dir={run_dir}",
                             cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0
    resumed = run_in_process("diffusion-train", f"resume={run_dir}", "trainer.max_steps=8", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"] == 8


@pytest.mark.slow
def test_the_benchmark_prints_its_tables():
    result = subprocess.run([script("diffusion-bench"), "--quick", "--device", "cpu"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("device cpu") and "torch " in out and "threads" in out
    for heading in ("## train", "## sample", "## model", "## model presets", "## data", "## latent"):
        assert heading in out
    assert "| latent, cached | 4x16x16 |" in out and "One-time encoding" in out
    assert "| dit (patch 4" in out and "(resunet32) |" in out and "(resunet64) |" in out and "streaming / in memory" in out
    assert "| resunet |" in out and "| DDIM | diffusion-cli sample() |" in out
    assert "| DDPM | diffusers DDPMScheduler |" in out and "diffusers UNet2DModel" in out


@pytest.mark.slow
@pytest.mark.parametrize("args, named", [
    (["speed"], "unknown table 'speed'"),
    pytest.param(["--device", "cuda"], "--device=cuda", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--precision", "fp8"], "--precision")])
def test_the_benchmark_refuses_bad_input_in_one_line(args, named, capsys):
    from diffusion_cli.bench import main

    with pytest.raises(SystemExit) as exit:  # argparse's error: usage, then one line, exit 2
        main(args)
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and named in stderr.strip().splitlines()[-1], stderr
    assert "Traceback" not in stderr


def test_progress_in_a_log_is_plain_lines(monkeypatch):
    """stderr that is not a terminal: whole lines (start, at most every N seconds, end), no \\r frames."""
    import io
    from diffusion_cli.progress import tqdm

    log = io.StringIO()
    monkeypatch.setenv("DIFFUSION_CLI_PROGRESS_SECONDS", "3600")
    for _ in tqdm(range(1000), desc="training", file=log):
        pass
    assert "\r" not in log.getvalue()
    assert [line.split(" [")[0] for line in log.getvalue().splitlines()] == ["training:   0% 0/1000",
                                                                            "training: 100% 1000/1000"]
    for _ in tqdm(range(1000), desc="sampling", file=log, leave=False):  # inside another bar
        pass
    assert "sampling" not in log.getvalue()
    monkeypatch.setenv("DIFFUSION_CLI_PROGRESS_SECONDS", "0")
    log = io.StringIO()
    for _ in tqdm(range(3), desc="sampling", file=log, leave=False):
        pass
    assert "\r" not in log.getvalue() and log.getvalue().count("\n") >= 2


class DeviceFloat64(TorchDispatchMode):
    """Records each float64 result computed from the device's tensors (the model's, the schedule's,
    and what is computed from them: the samples, the losses) without a copy to the CPU in
    between: on an Apple GPU (MPS), which has no float64, each would fail. On a CPU-only machine
    the device is the CPU, so the test makes Tensor.cpu() copy, as it does from a real device."""

    def __init__(self, *modules):
        super().__init__()
        for tensor in (t for m in modules for t in (*m.parameters(), *m.buffers())):
            tensor.on_device = True  # an attribute, not a set of ids: ids of freed tensors are reused
        self.found = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        to_cpu = func._schema.name in ("aten::_to_copy", "aten::to") and kwargs.get("device") == torch.device("cpu")
        if any(getattr(t, "on_device", False) for t in inputs) and not to_cpu:
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    t.on_device = True
                    if t.dtype == torch.float64:
                        self.found.add(str(func))
        return out


@pytest.mark.parametrize("overrides", [[], ["model=unet", "model.base_channels=8", "trainer.ema_decay=0.9"],
                                       ["schedule=edm", "objective=v", "schedule.T=40"]])
def test_no_float64_reaches_the_device(overrides, monkeypatch):
    """trainer.device=mps: training steps, every sampler and the quality metrics stay in float32
    on the device (float64 only on the CPU: schedules, noise-level tables, metrics)."""
    from diffusion_cli.evaluate import Evaluator
    from diffusion_cli.generation import sample_images
    from diffusion_cli.metrics import gradient_quality
    from diffusion_cli.samplers import SAMPLERS
    from diffusion_cli.conditions import Unconditional
    from diffusion_cli.spaces import PixelSpace

    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: self.to("cpu", copy=True))
    cfg = tiny_config(*overrides)
    step = TrainStep(cfg, torch.device("cpu"), random_images())
    step(1)
    with DeviceFloat64(step.model, step.ema.model, step.task.schedule) as watch:
        step(2)
        Evaluator(Split(torch.rand(4, 3, 16, 16) * 2 - 1, None), step.task.schedule, 4, 0, Unconditional(),
                  PixelSpace((3, 16, 16))).loss(step.ema.model)
        for name in SAMPLERS:
            with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
                sampler = compose("train", overrides=[f"sampler={name}", "sampler.steps=4"]).sampler
            images = sample_images(step.ema.model, step.task.schedule, sampler, (2, 3, 16, 16), batch_size=2, seed=0)
            gradient_quality(images)
    assert not watch.found
