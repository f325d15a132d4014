"""DDP through torchrun: two CPU processes on the gloo backend, tiny."""

import json
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY_TRAIN, run_in_process, script, snapshot

pytestmark = pytest.mark.slow  # multi-process / sweep runs: CI runs them


def torchrun(*args: str, cwd, resume: bool = False) -> subprocess.CompletedProcess:
    """torchrun ... -m diffusion_cli.train with the tiny settings (a resumed run has its own)."""
    command = [script("torchrun"), "--nproc-per-node", "2", "-m", "diffusion_cli.train",
               *([] if resume else TINY_TRAIN), *args]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def stopped_at_step_3(tmp_path_factory) -> Path:
    """A run of two processes stopped at step 3 (of 6)."""
    run_dir = tmp_path_factory.mktemp("split") / "run"
    torchrun("trainer.max_steps=3", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    return run_dir


def test_a_resume_on_another_number_of_processes_is_refused(stopped_at_step_3, tmp_path):
    before = snapshot(stopped_at_step_3 / "checkpoints")  # (train.log gains the attempt's lines)
    result = run_in_process("diffusion-train", f"resume={stopped_at_step_3}", "trainer.max_steps=9", cwd=tmp_path)
    assert result.returncode == 2 and "torchrun --nproc-per-node 2" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert snapshot(stopped_at_step_3 / "checkpoints") == before


def test_two_processes_share_one_run_dir_and_resume_exactly(stopped_at_step_3, tmp_path):
    straight = tmp_path / "straight"
    straight.mkdir()
    torchrun("logger=[csv,tensorboard]", cwd=straight)  # no hydra.run.dir: each rank would resolve its own ${now:...}
    run_dirs = list((straight / "outputs").glob("*/*"))
    assert len(run_dirs) == 1, run_dirs
    run_dir = run_dirs[0]
    assert {p.name for p in run_dir.iterdir()} >= {"checkpoints", "samples", "metrics.jsonl", "result.json",
                                                    "train.log", "train_rank1.log", ".hydra"}
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    ranks = state["rng"]["ranks"]
    assert state["step"] == 6 and len(ranks) == 2
    assert not torch.equal(ranks[0]["train"], ranks[1]["train"])  # each rank has its own stream
    assert not torch.equal(ranks[0]["torch"], ranks[1]["torch"])  # and its own dropout generator
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4  # logged at steps 2, 3 (eval), 4, 6 by rank 0 alone
    # The trackers too: one TensorBoard event file (another rank's would be a second), 4 CSV rows.
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len((run_dir / "csv" / "metrics.csv").read_text().splitlines()) == 1 + 4

    # Stopped at step 3, resumed to 6 on two processes again: the same weights as the straight run.
    torchrun(f"resume={stopped_at_step_3}", "trainer.max_steps=6", cwd=tmp_path, resume=True)
    resumed = torch.load(stopped_at_step_3 / "checkpoints" / "last.pt", weights_only=True)
    for key, value in state["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0)


def _first_in_turn(rank: int, init_file: str, log_file: str) -> None:
    """A torchrun-like process: rank 0 takes a while inside main_process_first."""
    import os
    import time

    import torch.distributed as dist

    from diffusion_cli import runtime

    os.environ.update(RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    with runtime.main_process_first():
        if rank == 0:
            time.sleep(1.0)
        with open(log_file, "a") as file:
            file.write(f"{rank}\n")
    dist.destroy_process_group()


def test_rank_zero_downloads_first_and_the_others_wait(tmp_path):
    import torch.multiprocessing as mp

    log_file = tmp_path / "order"
    mp.spawn(_first_in_turn, args=(str(tmp_path / "init"), str(log_file)), nprocs=2)
    assert log_file.read_text().split() == ["0", "1"]


def test_two_processes_stream_their_shards_and_resume_exactly(tmp_path):
    from diffusion_cli.bench.data import write_gradient_pngs

    folder = write_gradient_pngs(tmp_path / "pngs", 96, 16)
    streaming = ["data=folder", "model=mlp", f"data.path={folder}", "data.image_size=16",
                 "data.in_memory=false", "data.num_workers=1", "data.num_eval=16"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    log = torchrun(*streaming, f"hydra.run.dir={straight}", cwd=tmp_path)
    assert "streamed" in log.stdout + log.stderr
    torchrun(*streaming, "trainer.max_steps=3", f"hydra.run.dir={split}", cwd=tmp_path)
    torchrun(f"resume={split}", "trainer.max_steps=6", cwd=tmp_path, resume=True)
    expected = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["model"]
    resumed = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["model"]
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0)


def test_two_processes_train_a_self_conditioned_model(tmp_path):
    """Each rank draws its own hinted half of the batch: the hint's pass has no collective to wait on."""
    run_dir = tmp_path / "run"
    torchrun("model=resunet", "model.self_condition=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert json.loads((run_dir / "result.json").read_text())["steps"] == 6
