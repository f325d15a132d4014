"""Experiment trackers (the `logger` group): CSV, TensorBoard, Weights & Biases and MLflow, beside
the run dir's own files. Each is fed what metrics.jsonl gets (every scalar, at its step), the sample
and reconstruction grids when they are written, the resolved config as hyper-parameters and the
final metrics. Rank 0 alone logs.

A run keeps its tracker runs: trackers.json in the run dir holds each backend's run id and the last
step it logged, so an in-place resume continues the same W&B run, MLflow run and TensorBoard dir
and logs every step once. A backend new to a run (a branch from an older checkpoint, or a logger
added on resume) first gets the metrics the run starts from. A tracker that fails is dropped with
a warning: a run never stops for its tracker.
"""

import csv
import importlib.util
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .atomic import atomic_write
from .errors import UserError
from .schema import check

log = logging.getLogger(__name__)

STATE_FILE = "trackers.json"
# What each backend imports, and the extra that installs it.
PACKAGES = {"csv": (), "tensorboard": ("tensorboard",), "wandb": ("wandb",),
            "mlflow": ("mlflow", "sqlalchemy", "alembic")}


def check_available(logger_cfg: DictConfig | None) -> None:
    """One line naming the extra to install for a chosen backend whose package is missing."""
    for name in logger_cfg or {}:
        if name not in PACKAGES:
            raise UserError(f"logger={name} is not a tracker: use none, csv, tensorboard, wandb, "
                            f"mlflow or a list such as 'logger=[tensorboard,csv]'")
        missing = [p for p in PACKAGES[name] if importlib.util.find_spec(p) is None]
        if missing:
            raise UserError(f"logger={name} needs the {', '.join(missing)} package: "
                            f"pip install -e '.[{name}]' (or leave out logger={name})")


def scalars_of(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as flat scalars: lists become key/0, key/1, ..."""
    flat = {}
    for key, value in record.items():
        if isinstance(value, list):
            flat.update((f"{key}/{i}", v) for i, v in enumerate(value) if isinstance(v, (int, float)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            flat[key] = value
    return flat


def hyperparameters(cfg: DictConfig) -> dict[str, object]:
    """The resolved config as flat `group.key` hyper-parameters (lists and None as text)."""
    def flatten(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value if isinstance(value, (int, float, str, bool)) else str(value)
    return dict(flatten(OmegaConf.to_container(cfg, resolve=True), ""))


class CSVTracker:
    """csv/metrics.csv: metrics.jsonl as one wide table (a column per scalar), rewritten at each
    log step from metrics.jsonl, so a resume or a branch is always right; csv/images.csv lists the
    grids by step; csv/hparams.yaml is the resolved config."""

    def __init__(self, settings, cfg, run_dir: Path, state: dict | None):
        self.run_dir, self.folder = run_dir, run_dir / "csv"
        self.folder.mkdir(exist_ok=True)
        OmegaConf.save(cfg, self.folder / "hparams.yaml", resolve=True)
        self.state = {}

    def log(self, step: int, scalars: dict, images: dict) -> None:
        rows = [{"step": r["step"], **scalars_of(r)} for r in read_metrics(self.run_dir / "metrics.jsonl")]
        columns = list(dict.fromkeys(key for row in rows for key in row))
        with atomic_write(self.folder / "metrics.csv", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
        if images:
            new = not (self.folder / "images.csv").exists()
            with open(self.folder / "images.csv", "a", newline="") as file:
                writer = csv.writer(file)
                if new:
                    writer.writerow(["step", "tag", "file"])
                writer.writerows([step, tag, path.relative_to(self.run_dir)] for tag, path in images.items())

    def finish(self, result: dict, status: str) -> None:
        pass


class TensorBoardTracker:
    """tensorboard/ in the run dir: scalars, the grids as images, the
    config as text and, at the end, as hyper-parameters with the final metrics."""

    def __init__(self, settings, cfg, run_dir: Path, state: dict | None):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        self.hparams = hyperparameters(cfg)
        if state is None:
            self.writer.add_text("config", "```\n" + OmegaConf.to_yaml(cfg, resolve=True) + "```", 0)
        self.state = {}

    def log(self, step: int, scalars: dict, images: dict) -> None:
        import numpy as np
        from PIL import Image
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        for tag, path in images.items():
            with Image.open(path) as image:
                self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()  # on disk before trackers.json says so: a kill loses no logged step

    def finish(self, result: dict, status: str) -> None:
        if status == "ok":
            self.writer.add_hparams(self.hparams, {f"final/{k}": v for k, v in scalars_of(result).items()},
                                    run_name="hparams")
        self.writer.close()


class WandbTracker:
    """A W&B run written under the run dir's wandb/ (offline: `wandb sync` it later)."""

    def __init__(self, settings, cfg, run_dir: Path, state: dict | None):
        import wandb
        self.wandb = wandb
        run_id = state["id"] if state else secrets.token_hex(4)
        self.run = wandb.init(
            project=settings.project, entity=settings.entity, group=settings.group,
            tags=list(settings.tags or []), name=settings.name or run_dir.name, mode=settings.mode,
            dir=str(run_dir), id=run_id, resume="allow", config=OmegaConf.to_container(cfg, resolve=True),
            settings=wandb.Settings(console="off", quiet=True))  # our log and progress bar as they are
        self.state = {"id": run_id}

    def log(self, step: int, scalars: dict, images: dict) -> None:
        self.run.log({**scalars, **{tag: self.wandb.Image(str(path)) for tag, path in images.items()}},
                     step=step)

    def finish(self, result: dict, status: str) -> None:
        self.run.summary.update(scalars_of(result))
        self.run.finish(exit_code=0 if status == "ok" else 1)


class MLflowTracker:
    """An MLflow run: by default in a local store in the run dir (mlflow.db, artifacts under
    mlartifacts/); logger.mlflow.tracking_uri= points at a server instead. Grids are artifacts
    (samples/step_N.png), the config is params and config.yaml."""

    def __init__(self, settings, cfg, run_dir: Path, state: dict | None):
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
        self.metric = Metric
        for noisy in ("mlflow", "alembic"):  # database migrations on a new store: not for the console
            logging.getLogger(noisy).setLevel(logging.WARNING)
        uri = settings.tracking_uri or f"sqlite:///{run_dir.resolve() / 'mlflow.db'}"
        self.client = client = MlflowClient(tracking_uri=uri)
        if state:
            self.run_id = state["run_id"]
            client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = client.get_experiment_by_name(settings.experiment)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                settings.experiment,
                artifact_location=None if settings.tracking_uri else (run_dir.resolve() / "mlartifacts").as_uri())
            self.run_id = client.create_run(experiment_id, run_name=settings.run_name or run_dir.name,
                                            tags={"run_dir": str(run_dir.resolve())}).info.run_id
            params = [Param(k, str(v)) for k, v in hyperparameters(cfg).items()]
            for start in range(0, len(params), 100):  # MLflow takes 100 params per batch
                client.log_batch(self.run_id, params=params[start:start + 100])
            client.log_text(self.run_id, OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, step: int, scalars: dict, images: dict) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[self.metric(k, float(v), now, step)
                                                    for k, v in scalars.items()])
        for tag, path in images.items():
            self.client.log_artifact(self.run_id, str(path), artifact_path=tag)

    def finish(self, result: dict, status: str) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if status == "ok" else "KILLED")


BACKENDS = {"csv": CSVTracker, "tensorboard": TensorBoardTracker, "wandb": WandbTracker,
            "mlflow": MLflowTracker}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records ([] without the file; a line cut off by a kill skipped)."""
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


class Trackers:
    """The backends of cfg.logger, as one: `log` each step's record and grids, `finish` with the
    final metrics. Used as a context manager, it closes every backend however the run ends."""

    def __init__(self, cfg: DictConfig, run_dir: Path, start_step: int):
        self.run_dir, self.backends, self.steps = run_dir, {}, {}
        # Every backend this run dir has used (one that fails now keeps its entry for next time).
        self.saved = saved = json.loads((run_dir / STATE_FILE).read_text()) \
            if (run_dir / STATE_FILE).exists() else {}
        for name, settings in (cfg.get("logger") or {}).items():
            state = saved.get(name)
            self._call(name, lambda: self.backends.__setitem__(
                name, BACKENDS[name](settings, cfg, run_dir, state)))
            # The last step this backend logged: a resume logs only later ones.
            self.steps[name] = state["step"] if state else 0
        history = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["step"] <= start_step]
        for name in [n for n in self.backends if self.steps[n] < start_step]:
            for record in history:  # what the run starts from, once, to a new tracker run
                if record["step"] > self.steps[name]:
                    self._log(name, record["step"], scalars_of(record), {})
        self._save()

    def __enter__(self):
        return self

    def __exit__(self, error_type, error, traceback):
        for name in list(self.backends):  # a run that ended before finish(): stopped or failed
            self._call(name, lambda: self.backends[name].finish({}, "failed"))
        return False

    def log(self, step: int, record: dict, images: dict[str, Path]) -> None:
        """Record (a metrics.jsonl line, without `step`) and the grids written at `step`."""
        if not self.backends or not (record or images):
            return
        for name in list(self.backends):
            if step > self.steps[name]:
                self._log(name, step, scalars_of(record), images)
        self._save()

    def finish(self, result: dict) -> None:
        """The final metrics, and every backend closed."""
        for name in list(self.backends):
            self._call(name, lambda: self.backends[name].finish(result, "ok"))
        self.backends = {}

    def _log(self, name: str, step: int, scalars: dict, images: dict) -> None:
        self._call(name, lambda: self.backends[name].log(step, scalars, images))
        self.steps[name] = step

    def _call(self, name: str, action) -> None:
        try:
            action()
        except Exception as error:  # a tracker's network or disk: never the run's end
            log.warning(f"logger {name} failed ({type(error).__name__}: {error}); the run goes on "
                        f"without it")
            self.backends.pop(name, None)

    def _save(self) -> None:
        self.saved.update((name, {**backend.state, "step": self.steps[name]})
                          for name, backend in self.backends.items())
        if self.saved:
            with atomic_write(self.run_dir / STATE_FILE) as file:
                file.write(json.dumps(self.saved, indent=2))


# The config group's schema (conf/ holds the values and their docs).
@dataclass
class WandbConfig:
    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: List[str] = MISSING
    name: Optional[str] = MISSING
    mode: Optional[str] = check(lambda v: v in (None, "online", "offline", "disabled"),
                                "online, offline, disabled or null", MISSING)


@dataclass
class MLflowConfig:
    tracking_uri: Optional[str] = MISSING
    experiment: str = MISSING
    run_name: Optional[str] = MISSING
