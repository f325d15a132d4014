"""The comparison table of a sweep: every job writes result.json into its own run dir, and
summary.csv (and its picture, summary.png) in the sweep dir is rebuilt from all of them, so a
failed or parallel job loses no row.

summary.csv has one row per job: a column per swept key (an override whose value differs between
jobs), the final metrics, then steps, wall_s, run_dir, status and error."""

import csv
import json
from pathlib import Path

from . import plots
from .atomic import atomic_write
from .metrics import QUALITY_KEYS

RESULT_FILE = "result.json"
TRAILING_COLUMNS = ["steps", "wall_s", "run_dir", "status", "error"]


def write_result(run_dir: Path, overrides: list[str], metrics: dict, status: str, error: str = "") -> None:
    """This job's row: the command-line overrides by full key, its final metrics and its status."""
    row = {"overrides": dict(_split(override) for override in overrides), **metrics,
           "run_dir": str(run_dir), "status": status, "error": error}
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
                   if key not in ["overrides", *TRAILING_COLUMNS]]
    columns = override_keys + metric_keys + TRAILING_COLUMNS
    rows = [{**{key: row["overrides"].get(key, "") for key in override_keys},
             **{key: _cell(row.get(key, "")) for key in metric_keys + TRAILING_COLUMNS}}
            for row in results]
    with atomic_write(sweep_dir / "summary.csv", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plots.sweep_summary(sweep_dir, rows, override_keys, ["eval_loss", *QUALITY_KEYS, "sampling_s"])
    return rows


def _cell(value):
    return f"{value:.6g}" if isinstance(value, float) else value


def _ordered_keys(dicts) -> list[str]:
    keys = {}
    for d in dicts:
        keys.update(dict.fromkeys(d))
    return list(keys)


def _job_order(name: str):
    return (0, int(name)) if name.isdigit() else (1, name)

