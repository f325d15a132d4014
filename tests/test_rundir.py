"""One run per run dir: a new run refuses a dir (or sweep dir) that holds another run, unless
overwrite=true replaces it."""

import shutil

from conftest import TINY_TRAIN, metric_steps, run_in_process, snapshot


def test_a_new_run_refuses_a_dir_that_holds_a_run_and_overwrite_replaces_it(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    result = run_in_process("diffusion-train", *TINY_TRAIN, "trainer.max_steps=2",
                            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "already holds a run at step 6" in line and f"resume={run_dir}" in line and "overwrite=true" in line
    assert snapshot(run_dir) == before  # not a byte changed

    (run_dir / "notes.txt").write_text("mine")  # what a user keeps there is not the run's
    result = run_in_process("diffusion-train", *TINY_TRAIN, "trainer.max_steps=2", "overwrite=true",
                            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert metric_steps(run_dir) == [2]  # the new run's metrics only, not appended to the old ones
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.pt"]
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_diffusion_sample_refuses_a_dir_that_holds_samples(trained_run, tmp_path):
    out = tmp_path / "samples"
    args = [f"ckpt={trained_run}", "num_samples=2", f"hydra.run.dir={out}"]
    assert run_in_process("diffusion-sample", *args, cwd=tmp_path).returncode == 0
    before = snapshot(out)
    result = run_in_process("diffusion-sample", *args, "seed=3", cwd=tmp_path)
    assert result.returncode == 2 and "already holds diffusion-sample's samples.pt" in result.stderr
    assert snapshot(out) == before
    assert run_in_process("diffusion-sample", *args, "seed=3", "overwrite=true", cwd=tmp_path).returncode == 0


def test_a_sweep_refuses_a_sweep_dir_that_holds_runs(trained_run, tmp_path):
    sweep = tmp_path / "sweep"
    shutil.copytree(trained_run, sweep / "0")
    before = snapshot(sweep)
    result = run_in_process("diffusion-train", "-m", *TINY_TRAIN, "schedule.T=10,20",
                            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 2 and "already holds a sweep of 1 run(s)" in result.stderr
    assert snapshot(sweep) == before


def test_overwrite_never_deletes_the_checkpoint_it_samples_from(trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    before = snapshot(run_dir)
    result = run_in_process("diffusion-sample", f"ckpt={run_dir}", "overwrite=true",
                            f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 2 and "which this run reads from" in result.stderr
    assert snapshot(run_dir) == before
