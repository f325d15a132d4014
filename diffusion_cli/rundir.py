"""One run per run dir: a new run never writes into a dir that holds another run's checkpoints,
metrics or samples (it would replace last.pt and mix two runs' metrics), unless overwrite=true
asks to replace that run. A sweep dir the same, for its jobs and summary."""

import shutil
from pathlib import Path

from . import checkpoint

# What diffusion-train and diffusion-sample write into a run dir: overwrite=true removes these,
# and nothing else a user may keep there.
RUN_OUTPUTS = (".hydra", "checkpoints", "samples", "reconstructions", "metrics.jsonl", "result.json",
               "loss.png", "loss_by_t.png", "denoising.png", "train.log", "train_rank*.log",
               "samples.png", "samples.pt", "images", ".batches", "quality.json", "sample.log",
               "eval.json", "eval.log",
               # the trackers' (logger=...) files
               "trackers.json", "csv", "tensorboard", "wandb", "mlflow.db", "mlartifacts")
SWEEP_OUTPUTS = ("summary.csv", "summary.png", "multirun.yaml")


def held_run(run_dir: Path) -> str | None:
    """What makes run_dir another run's ("a run at step 3000", ...), or None."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file():
        try:
            return f"a run at step {checkpoint.step_of(last)}"
        except Exception:  # unreadable: still someone's
            return "a run's checkpoints/last.pt"
    if any((run_dir / "checkpoints").glob("*.pt")):
        return "a run's checkpoints"
    if (run_dir / "metrics.jsonl").is_file():
        return "a run's metrics.jsonl"
    if (run_dir / "samples.pt").is_file():
        return "diffusion-sample's samples.pt"
    return None


def held_sweep(sweep_dir: Path) -> str | None:
    """What makes sweep_dir another sweep's, or None."""
    jobs = [job for job in sweep_dir.iterdir() if job.is_dir() and held_run(job)] \
        if sweep_dir.is_dir() else []
    if jobs:
        return f"a sweep of {len(jobs)} run(s)"
    return "a sweep's summary.csv" if (sweep_dir / "summary.csv").is_file() else None


def remove(directory: Path, names: tuple[str, ...]) -> None:
    for pattern in names:
        for path in directory.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def claim(run_dir: Path, overwrite: bool, resumable: bool, reads: str | None = None) -> str | None:
    """Make run_dir free for a new run: None when it is (after removing the run it held, with
    overwrite), else the one-line reason why not. `reads`: the checkpoint the new run reads,
    which it may not write over, overwrite or not."""
    held = held_run(run_dir)
    if held is None:
        return None
    if reads and Path(reads).resolve().is_relative_to(Path(run_dir).resolve()):
        return (f"hydra.run.dir={run_dir} holds {held}, which this run reads from ({reads}): "
                f"choose another hydra.run.dir, or leave it out for a new one")
    if overwrite:
        remove(run_dir, RUN_OUTPUTS)
        return None
    resume = f"resume it with resume={run_dir}, " if resumable and "step" in held else ""
    return (f"hydra.run.dir={run_dir} already holds {held}: {resume}choose another "
            f"hydra.run.dir, or add overwrite=true to replace it")


def claim_sweep(sweep_dir: Path, overwrite: bool) -> str | None:
    """claim() for a sweep dir: its jobs' runs and its summary."""
    held = held_sweep(sweep_dir)
    if held is None:
        return None
    if overwrite:
        for job in sweep_dir.iterdir():
            if job.is_dir():
                remove(job, RUN_OUTPUTS)
        remove(sweep_dir, SWEEP_OUTPUTS)
        return None
    return (f"hydra.sweep.dir={sweep_dir} already holds {held}: choose another hydra.sweep.dir, "
            f"or add overwrite=true to replace it")
