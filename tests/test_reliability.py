"""Resume after kill -9, graceful stop, the non-finite guard, and refused checkpoints."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, metric_steps, run_in_process, script
from diffusion_cli.bench.data import write_gradient_pngs

# Big enough that a step and a checkpoint write take measurable time, small enough to stay fast.
RESUMABLE_RUN = [arg for arg in TINY_TRAIN if not arg.startswith(("model.", "trainer."))] + [
    "model.width=256", "model.depth=2", "trainer.device=cpu", "trainer.batch_size=64",
    "trainer.max_steps=30", "trainer.log_every=1", "trainer.eval_every=10",
    "trainer.sample_every=15", "trainer.checkpoint_every=3", "trainer.keep_checkpoints=2",
    "trainer.num_eval_images=32", "trainer.num_grid_images=4",
]


def start(run_dir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([script("diffusion-train"), *RESUMABLE_RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(process: subprocess.Popen, condition, timeout: float = 120) -> bool:
    """Poll until condition() holds (True) or the process ended first (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.001)
    raise TimeoutError("condition never held")


def checkpoint_write_started(run_dir: Path) -> bool:
    directory = run_dir / "checkpoints"
    return directory.is_dir() and any(name.startswith(".") and name.endswith(".tmp")
                                      for name in os.listdir(directory))


def last_checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["step"]


def assert_same_state(a: dict, b: dict, path: str = "") -> None:
    """Every tensor in two nested state dicts is bit-identical."""
    assert type(a) is type(b), path
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same_state(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    else:
        assert a == b, path


@pytest.fixture(scope="module", params=["in memory", "streaming"])
def data_path(request, tmp_path_factory) -> list[str]:
    """The overrides of the two ways training reads its data: gradients in memory, or the same
    kind of images as PNG files streamed by a DataLoader worker from the row cache."""
    if request.param == "in memory":
        return []
    folder = write_gradient_pngs(tmp_path_factory.mktemp("pngs"), 256, 16)
    return ["data=folder", "model=mlp", f"data.path={folder}", "data.image_size=16", "data.in_memory=false",
            "data.num_workers=1", "data.num_eval=32", "data.hflip=true"]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, data_path) -> tuple[Path, list[str]]:
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    process = start(run_dir, *data_path)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert ("streamed" in stdout + stderr) == bool(data_path)
    return run_dir, data_path


KILL_POINTS = {
    "after the first checkpoint": lambda d: (d / "checkpoints" / "last.pt").exists(),
    "between checkpoints": lambda d: any(s >= 11 for s in metric_steps(d)),
    "while a checkpoint is being written": lambda d: any(s >= 16 for s in metric_steps(d))
    and checkpoint_write_started(d),
}


@pytest.mark.slow
@pytest.mark.parametrize("kill_point", list(KILL_POINTS))
def test_resume_after_kill_9_is_bit_identical(straight_run, tmp_path, kill_point):
    straight_run, data_path = straight_run
    if data_path and kill_point != "between checkpoints":
        pytest.skip("the streamed data path resumes from one kill point; the in-memory one from each")
    for attempt in range(5):  # a kill point can be missed when the process runs past it
        run_dir = tmp_path / f"run{attempt}"
        process = start(run_dir, *data_path)
        if wait_for(process, lambda: KILL_POINTS[kill_point](run_dir)):
            process.send_signal(signal.SIGKILL)
            process.wait()
            break
        process.wait()
    else:
        pytest.fail(f"never caught the process {kill_point}")
    killed_at = last_checkpoint_step(run_dir)  # last.pt is loadable whatever the moment of the kill
    assert 0 < killed_at < 30

    resumed = run_in_process("diffusion-train", f"resume={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0 and f"from step {killed_at}" in resumed.stdout, resumed.stderr

    final = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    expected = torch.load(straight_run / "checkpoints" / "last.pt", weights_only=True)
    assert final["step"] == 30
    for part in ("model", "ema", "optimizer", "rng"):  # the EMA neither reset nor stale
        assert_same_state(final[part], expected[part], part)
    # Every step logged exactly once, with the same losses (eval_loss: of the EMA weights) and
    # final sample quality as the uninterrupted run.
    assert metric_steps(run_dir) == list(range(1, 31))
    logged = lambda d: [{key: value for key, value in json.loads(line).items() if key != "images_per_s"}
                        for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert logged(run_dir) == logged(straight_run)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["last.pt", "step_0000027.pt", "step_0000030.pt"]  # no temp files left, two kept


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_a_checkpoint_and_says_how_to_resume(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    process = start(run_dir, "trainer.max_steps=100000", "trainer.checkpoint_every=0")
    assert wait_for(process, lambda: len(metric_steps(run_dir)) >= 3)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code
    assert f"resume={run_dir}" in stderr and "Traceback" not in stderr
    step = last_checkpoint_step(run_dir)
    assert step >= 3 and f"at step {step}" in stderr
    resumed = run_in_process("diffusion-train", f"resume={run_dir}", f"trainer.max_steps={step + 2}", cwd=tmp_path)
    assert resumed.returncode == 0 and f"from step {step}" in resumed.stdout, resumed.stderr
    assert last_checkpoint_step(run_dir) == step + 2


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_final_evaluation_ends_the_run_within_seconds(tmp_path, sig, code):
    """The last step's checkpoint is written before its evaluation (20,000 quality images here,
    about 25 s); a signal then ends the run at once, and the resumed run draws what was skipped."""
    run_dir = tmp_path / "run"
    process = start(run_dir, "trainer.max_steps=3", "trainer.checkpoint_every=0", "trainer.num_quality_images=20000")
    assert wait_for(process, lambda: (run_dir / "checkpoints" / "last.pt").exists())
    time.sleep(1)  # into the evaluation
    assert process.poll() is None
    sent = time.monotonic()
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code and time.monotonic() - sent < 10, stderr
    assert f"while evaluating step 3; saved {run_dir / 'checkpoints' / 'last.pt'}" in stderr
    assert f"resume={run_dir}" in stderr and "Traceback" not in stderr
    assert last_checkpoint_step(run_dir) == 3 and metric_steps(run_dir) == [1, 2]  # step 3: after its evaluation
    if sig == signal.SIGINT:
        return
    resumed = run_in_process("diffusion-train", f"resume={run_dir}", "trainer.num_quality_images=64", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (run_dir / "samples" / "step_0000003.png").exists() and (run_dir / "denoising.png").exists()
    assert json.loads((run_dir / "result.json").read_text())["status"] == "ok"
    straight = tmp_path / "straight"
    run_in_process("diffusion-train", *RESUMABLE_RUN, "trainer.max_steps=3", "trainer.checkpoint_every=0",
                   "trainer.num_quality_images=64", f"hydra.run.dir={straight}", cwd=tmp_path)
    lines = lambda d: [{k: v for k, v in json.loads(line).items() if k != "images_per_s"}
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert lines(run_dir) == lines(straight)  # the training part from the checkpoint, the evaluation redone
    again = run_in_process("diffusion-train", f"resume={run_dir}", cwd=tmp_path)
    assert again.returncode == 2 and "raise trainer.max_steps" in again.stderr  # finished now


def test_accumulating_runs_resume_bit_identically_from_the_streamed_data(tmp_path):
    """grad_accum=2: checkpoints fall between optimizer steps, and the stream resumes after the
    step's last micro-batch."""
    folder = write_gradient_pngs(tmp_path / "pngs", 64, 16)
    args = [*RESUMABLE_RUN, "data=folder", "model=mlp", f"data.path={folder}", "data.image_size=16",
            "data.in_memory=false", "data.num_workers=0", "trainer.grad_accum=2", "trainer.batch_size=16",
            "trainer.max_steps=6", "trainer.num_quality_images=0", "trainer.lr_warmup_steps=100"]
    runs = {name: tmp_path / name for name in ("straight", "resumed")}
    assert run_in_process("diffusion-train", *args, f"hydra.run.dir={runs['straight']}", cwd=tmp_path).returncode == 0
    first = run_in_process("diffusion-train", *args, "trainer.max_steps=3", f"hydra.run.dir={runs['resumed']}",
                           cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_in_process("diffusion-train", f"resume={runs['resumed']}", "trainer.max_steps=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final, expected = (torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in runs.values())
    for part in ("model", "ema", "optimizer"):
        assert_same_state(final[part], expected[part], part)


BULK = ["num_samples=200", "batch_size=10", "save_images=true", "sampler.steps=20", "device=cpu"]


@pytest.mark.slow
def test_bulk_sampling_killed_and_rerun_gives_the_same_files(trained_run, tmp_path):
    """kill -9 while save_images writes its batches; the same command again goes on where it
    stopped: every PNG once, and the same files and samples.pt as an uninterrupted run."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_in_process("diffusion-sample", f"ckpt={trained_run}", *BULK, f"hydra.run.dir={straight}", cwd=tmp_path)
    command = [script("diffusion-sample"), f"ckpt={trained_run}", *BULK, f"hydra.run.dir={killed}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert wait_for(process, lambda: len(list((killed / ".batches").glob("*.pt"))) >= 3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = {path.name: path.stat().st_mtime_ns for path in (killed / "images").glob("[0-9]*.png")}
    assert 0 < len(written) < 200
    rerun = run_in_process("diffusion-sample", f"ckpt={trained_run}", *BULK, f"hydra.run.dir={killed}", cwd=tmp_path)
    assert rerun.returncode == 0 and "going on from" in rerun.stdout, rerun.stderr
    files = sorted(path.name for path in (killed / "images").iterdir())
    assert files == sorted(path.name for path in (straight / "images").iterdir()) and len(files) == 200
    assert all((killed / "images" / name).read_bytes() == (straight / "images" / name).read_bytes() for name in files)
    kept = {name: (killed / "images" / name).stat().st_mtime_ns for name in written}
    assert kept == written  # the PNGs written before the kill were not written again
    assert torch.equal(torch.load(killed / "samples.pt"), torch.load(straight / "samples.pt"))
    assert not (killed / ".batches").exists()


def test_an_unfinished_bulk_run_refuses_another_command(trained_run, tmp_path):
    run = tmp_path / "bulk"
    (run / ".batches").mkdir(parents=True)
    (run / ".batches" / "request.json").write_text("{}")
    other = run_in_process("diffusion-sample", f"ckpt={trained_run}", *BULK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert other.returncode == 2 and "unfinished images of another diffusion-sample command" in other.stderr


@pytest.mark.slow
def test_resume_refuses_overrides_that_would_change_the_run(straight_run, tmp_path):
    straight_run, _ = straight_run
    before = (straight_run / "checkpoints" / "last.pt").read_bytes()
    result = run_in_process("diffusion-train", f"resume={straight_run}", "trainer.max_steps=40",
                            "model.width=64", cwd=tmp_path)
    assert result.returncode == 2
    assert "model.width cannot change when resuming" in result.stderr
    result = run_in_process("diffusion-train", f"resume={straight_run}", cwd=tmp_path)
    assert result.returncode == 2 and "raise trainer.max_steps" in result.stderr
    assert (straight_run / "checkpoints" / "last.pt").read_bytes() == before


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    # lr 1e30: step 1 blows the weights up (still finite), step 2's loss is infinite.
    result = run_in_process("diffusion-train", *TINY_TRAIN, "trainer.lr=1e30", "trainer.lr_warmup_steps=0",
                            "trainer.checkpoint_every=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "non-finite loss or gradient at step 2" in message and "trainer.lr" in message
    assert last_checkpoint_step(run_dir) == 1


def test_non_finite_steps_can_be_skipped(tmp_path):
    run_dir = tmp_path / "run"
    result = run_in_process("diffusion-train", *TINY_TRAIN, "trainer.lr=1e30", "trainer.lr_warmup_steps=0",
                            "trainer.max_nonfinite_skips=100", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "update skipped" in (run_dir / "train.log").read_text()
    assert last_checkpoint_step(run_dir) == 6


class CreatesAFile:
    """A pickle whose loading would run code: open(path, 'w')."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("script_name, key", [("diffusion-sample", "ckpt"), ("diffusion-train", "resume")])
def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, script_name, key):
    evidence = tmp_path / "pwned"
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    malicious = tmp_path / "run" / "checkpoints" / "last.pt"
    torch.save({"format_version": 1, "model": CreatesAFile(str(evidence)), "config": {}}, malicious)
    result = run_in_process(script_name, f"{key}={malicious}", cwd=tmp_path)
    assert result.returncode == 2
    assert "refused" in result.stderr and "Traceback" not in result.stderr
    assert not evidence.exists()


@pytest.mark.slow
def test_unreadable_and_foreign_checkpoints_are_clear_errors(trained_run, tmp_path):
    good = (trained_run / "checkpoints" / "last.pt").read_bytes()
    cases = {
        "truncated.pt": (good[: len(good) // 2], "not a readable checkpoint"),
        "newer.pt": (None, "newer than this diffusion-cli"),
        "mismatch.pt": (None, "do not match"),
    }
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    torch.save({**state, "format_version": 99}, tmp_path / "newer.pt")
    config = {**state["config"], "model": {**state["config"]["model"], "width": 64}}
    torch.save({**state, "config": config}, tmp_path / "mismatch.pt")
    (tmp_path / "truncated.pt").write_bytes(cases["truncated.pt"][0])
    for name, (_, expected) in cases.items():
        result = run_in_process("diffusion-sample", f"ckpt={name}", cwd=tmp_path)
        assert result.returncode == 2 and expected in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
