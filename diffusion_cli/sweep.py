"""The comparison table of a sweep: every job writes result.json into its own run dir, and
summary.csv (and its picture, summary.png) in the sweep dir is rebuilt from all of them, so a
failed or parallel job loses no row.

summary.csv has one row per job: a column per swept key (an override whose value differs between
jobs), the final metrics, then steps, wall_s, run_dir, status, error and `best`: a `*` on the row
whose `sweep.objective` metric is best in `sweep.direction` (what an Optuna search optimises)."""

import csv
import json
import math
from pathlib import Path

from . import plots
from .atomic import atomic_write
from .metrics import QUALITY_KEYS

RESULT_FILE = "result.json"
TRAILING_COLUMNS = ["steps", "wall_s", "run_dir", "status", "error", "best"]


def write_result(run_dir: Path, overrides: list[str], metrics: dict, status: str, error: str = "",
                 objective: dict | None = None) -> None:
    """This job's row: the command-line overrides by full key, its final metrics, its status and
    the sweep's objective ({"objective": metric, "direction": ...}, when the command has one)."""
    row = {"overrides": dict(_split(override) for override in overrides), **metrics,
           "run_dir": str(run_dir), "status": status, "error": error, "sweep": objective or {}}
    with atomic_write(run_dir / RESULT_FILE) as file:
        file.write(json.dumps(row, indent=2))


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def write_summary(sweep_dir: Path) -> list[dict]:
    """Rebuild sweep_dir/summary.csv from the jobs' result files; returns the rows."""
    results = [json.loads(path.read_text()) for path in sweep_dir.glob(f"*/{RESULT_FILE}")]
    results.sort(key=lambda row: _job_order(Path(row["run_dir"]).name))
    # The swept keys: overrides whose value differs between jobs (the others are the same for all).
    override_keys = [key for key in _ordered_keys(row["overrides"] for row in results)
                     if len({row["overrides"].get(key) for row in results}) > 1]
    metric_keys = [key for key in _ordered_keys(results)
                   if key not in ["overrides", "sweep", *TRAILING_COLUMNS]]
    columns = override_keys + metric_keys + TRAILING_COLUMNS
    best = best_result(results)
    rows = [{**{key: row["overrides"].get(key, "") for key in override_keys},
             **{key: _cell(row.get(key, "")) for key in metric_keys + TRAILING_COLUMNS},
             "best": "*" if row is best else ""}
            for row in results]
    with atomic_write(sweep_dir / "summary.csv", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    objective = best["sweep"]["objective"] if best else None  # plotted first
    metrics = [key for key in dict.fromkeys([objective, "eval_loss", *QUALITY_KEYS, "sampling_s"]) if key]
    plots.sweep_summary(sweep_dir, rows, override_keys, metrics, objective)
    return rows


def best_result(results: list[dict]) -> dict | None:
    """The finished job whose objective metric is best (the first of equals), or None."""
    scored = [row for row in results if row["status"] == "ok" and row.get("sweep")
              and isinstance(row.get(row["sweep"]["objective"]), (int, float))
              and math.isfinite(row[row["sweep"]["objective"]])]
    if not scored:
        return None
    sign = -1 if scored[0]["sweep"]["direction"] == "maximize" else 1
    return min(scored, key=lambda row: sign * row[row["sweep"]["objective"]])


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _ordered_keys(dicts) -> list[str]:
    keys = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    return list(keys)


def _job_order(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)



def linear_beta_end(cfg, trial) -> None:
    """hparams_search=gradients_optuna's conditional key (Hydra's Optuna sweeper calls it for each
    trial, custom_search_space): schedule.beta_end is a key of schedule=linear only, so a trial
    draws it only when it chose the linear schedule."""
    if trial.params.get("schedule") == "linear":
        trial.suggest_float("schedule.beta_end", 0.005, 0.05)
