"""Hydra's launcher plugins: submitit for clusters (composed only, no cluster here), joblib for
local parallel sweeps."""

import csv

import pytest

from conftest import TINY_TRAIN, run_cli

pytestmark = pytest.mark.slow  # multi-process / sweep runs: CI runs them


def test_the_submitit_slurm_launcher_config_composes(tmp_path):
    result = run_cli("diffusion-train", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu",
                     "hydra.launcher.gpus_per_node=4", "--cfg", "hydra", cwd=tmp_path)
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in result.stdout
    assert "partition: gpu" in result.stdout and "gpus_per_node: 4" in result.stdout
    assert not (tmp_path / "outputs").exists()  # composing runs nothing


def test_a_joblib_sweep_writes_a_complete_summary(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("diffusion-train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY_TRAIN,
            "trainer.num_quality_images=16", "schedule.T=10,20", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert [row["schedule.T"] for row in rows] == ["10", "20"]
    assert all(row["status"] == "ok" and float(row["eval_loss"]) > 0 for row in rows)
    best = [row for row in rows if row["best"] == "*"]  # the default objective: least eval_loss
    assert len(best) == 1 and float(best[0]["eval_loss"]) == min(float(row["eval_loss"]) for row in rows)
