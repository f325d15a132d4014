"""Searching, not only enumerating: hparams_search=gradients_optuna through Hydra's Optuna sweeper,
the objective a job returns, and the summary's best row."""

import csv
from pathlib import Path

import pytest
import yaml
from hydra.errors import MissingConfigException

from conftest import TINY_TRAIN, run_in_process
from diffusion_cli.cli import describe
from diffusion_cli.sweep import best_result


@pytest.mark.slow  # a sweep, as test_launchers' are
def test_an_optuna_search_of_3_trials_names_its_best_trial_in_the_summary(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "sweep"
    # eval_loss: the objective that differs between trials this short (valid_frac is 0 for all).
    # schedule.T is left to the search (on the command line it would be fixed for every trial).
    tiny = [arg for arg in TINY_TRAIN if not arg.startswith("schedule.T=")]
    result = run_in_process("diffusion-train", "-m", "hparams_search=gradients_optuna", *tiny,
                            "hydra.sweeper.n_trials=3", "sweep.objective=eval_loss",
                            "sweep.direction=minimize", "trainer.num_quality_images=0",
                            f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(open(sweep / "summary.csv")))
    assert len(rows) == 3 and all(row["status"] == "ok" for row in rows)
    assert "trainer.lr" in rows[0]  # Optuna's choices that differ between trials are swept columns
    for row in rows:  # schedule.beta_end is drawn exactly for the trials that chose the linear schedule
        overrides = yaml.safe_load((Path(row["run_dir"]) / ".hydra" / "overrides.yaml").read_text())
        drew_beta_end = any(o.startswith("schedule.beta_end=") for o in overrides)
        assert drew_beta_end == ("schedule=linear" in overrides), overrides
    (best,) = [row for row in rows if row["best"] == "*"]
    assert float(best["eval_loss"]) == min(float(row["eval_loss"]) for row in rows)
    optuna = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert float(best["eval_loss"]) == pytest.approx(optuna["best_value"], rel=1e-5)
    # The best row's trial is Optuna's best (the summary leaves out the keys no trial changed)
    overrides = yaml.safe_load((Path(best["run_dir"]) / ".hydra" / "overrides.yaml").read_text())
    chosen = dict(override.split("=", 1) for override in overrides)
    assert {key: chosen[key] for key in optuna["best_params"]} == \
        {key: str(value) for key, value in optuna["best_params"].items()}
    assert f"best (minimize eval_loss): {best['run_dir']}" in result.stdout


def test_the_best_result_follows_the_direction_and_skips_failed_and_nan_jobs():
    def job(value, status="ok", direction="minimize"):
        return {"status": status, "eval_loss": value, "sweep": {"objective": "eval_loss", "direction": direction}}
    jobs = [job(0.3), job(0.1, status="failed"), job(float("nan")), job(0.2), job(0.5)]
    assert best_result(jobs) is jobs[3]
    assert best_result([{**j, "sweep": {**j["sweep"], "direction": "maximize"}} for j in jobs])["eval_loss"] == 0.5
    assert best_result([{**j, "sweep": {}} for j in jobs]) is None  # no objective: no best row


def test_a_missing_sweeper_or_launcher_plugin_names_its_extra():
    error = MissingConfigException("In 'hparams_search/gradients_optuna': Could not find 'hydra/sweeper/optuna'",
                                   missing_cfg_file="hydra/sweeper/optuna", options=["basic"])
    assert describe(error).endswith("that plugin comes with an extra: pip install -e '.[optuna]'")
