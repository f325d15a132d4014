"""What the two console scripts share: checks before anything is written, one-line errors, and the
per-job result file that sweeps collect into summary.csv."""

import logging
import os
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from . import checkpoint, runtime
from .config import validate
from .schema import other_kinds_key
from .errors import UserError
from .rundir import claim, claim_sweep
from .stopping import Stopped
from .sweep import write_result, write_summary

log = logging.getLogger(__name__)


def fail(message: str, code: int = 2, label: str = "error") -> None:
    """Print one line naming the problem and exit: no traceback for errors a user can fix."""
    print(f"{Path(sys.argv[0]).name}: {label}: {message}", file=sys.stderr)
    sys.exit(code)


def console_script(hydra_main):
    """The entry point of a console script around a @hydra.main function: Hydra's own errors (an
    unknown key or group option, a wrong type) become one line, unless HYDRA_FULL_ERROR=1 asks for
    the whole traceback."""
    def entry() -> None:
        full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra then re-raises instead of printing
        try:
            hydra_main()
        except (HydraException, OmegaConfBaseException) as error:
            if full_error:
                raise
            fail(describe(error))
        except KeyboardInterrupt:  # a second Ctrl-C during training, or one outside it
            fail("interrupted", code=130, label="stopped")
    return entry


# Lines of Hydra's and OmegaConf's messages that repeat what the first lines say.
_NOISE = ("full_key:", "object_type=", "reference_type=", "Config search path", "provider=")


# Hydra plugins that come with an extra of this project: a missing one names its extra.
PLUGIN_EXTRAS = {"hydra/sweeper/optuna": "optuna", "hydra/launcher/joblib": "joblib",
                 "hydra/launcher/submitit_local": "submitit", "hydra/launcher/submitit_slurm": "submitit"}


def describe(error: Exception) -> str:
    """Hydra's multi-line message for a bad config, as one line."""
    if isinstance(error, MissingConfigException):
        first = str(error).splitlines()[0]
        extra = next((extra for plugin, extra in PLUGIN_EXTRAS.items() if f"'{plugin}'" in first), None)
        if extra:
            return f"{first}: that plugin comes with an extra: pip install -e '.[{extra}]'"
        if error.options:
            return f"{first}; choose one of: {', '.join(error.options)}"
    parts = [error] + ([error.__cause__] if error.__cause__ is not None else [])
    other_kind = other_kinds_key(" ".join(map(str, parts)))
    if other_kind:
        return other_kind
    lines = [line.strip() for part in parts for line in str(part).splitlines()]
    return "; ".join(line.rstrip(".") for line in lines if line and not line.startswith(_NOISE))


class Callbacks(Callback):
    """Hydra callbacks (configured under hydra.callbacks in train.yaml and sample.yaml)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        """Check the config before Hydra creates the run dir, so bad input writes nothing."""
        try:
            validate(config)
        except UserError as error:
            fail(str(error))
        share_run_dir(config)
        run_dir = Path(config.hydra.run.dir)
        resume = config.get("resume")
        if resume is None or not checkpoint.continues_in_place(resume, run_dir):
            reads = resume or config.get("ckpt")
            problem = claim(run_dir, config.overwrite, "resume" in config, reads) \
                if runtime.is_main() else None
            problem = runtime.broadcast(problem)  # every rank stops, or none
            if problem:
                fail(problem)
        try:
            run_dir.mkdir(parents=True, exist_ok=True)  # what Hydra does next, with a clear error
        except OSError as error:
            fail(f"cannot create the run dir {run_dir} ({error.strerror}): run from a writable "
                 f"directory or set hydra.run.dir=PATH")

    def on_run_end(self, config: DictConfig, **kwargs) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """A sweep dir that holds another sweep's runs is refused (or, with overwrite, cleared)."""
        problem = claim_sweep(Path(config.hydra.sweep.dir), config.overwrite)
        if problem:
            fail(problem)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        """Rebuild summary.csv once more (parallel launchers) and exit non-zero if a job failed."""
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = write_summary(sweep_dir) if sweep_dir.is_dir() else []
        failed = sum(row["status"] != "ok" for row in rows)
        print(f"wrote {sweep_dir / 'summary.csv'}: {len(rows)} jobs, {failed} failed")
        best = next((row for row in rows if row["best"]), None)
        if best:
            objective = config.sweep.objective
            print(f"best ({config.sweep.direction} {objective}): {best['run_dir']}, {objective} "
                  f"{best[objective]}")
        if failed:
            fail(f"{failed} of {len(rows)} sweep jobs failed; their errors are in the summary's "
                 f"error column", code=1)


def share_run_dir(config: DictConfig) -> None:
    """Under torchrun every rank would resolve its own ${now:...} run dir: all take rank 0's. The
    other ranks keep out of its .hydra/, log to <job>_rank<N>.log, and print warnings only."""
    runtime.init_distributed()
    if runtime.world_size() == 1:
        return
    with read_write(config), open_dict(config):
        config.hydra.run.dir = runtime.broadcast(str(config.hydra.run.dir))
        if not runtime.is_main():
            config.hydra.output_subdir = None
            config.hydra.job.name = f"{config.hydra.job.name}_rank{runtime.rank()}"
            config.hydra.job_logging.handlers.console.level = "WARNING"


def run_task(task, cfg: DictConfig) -> float | None:
    """Run task(cfg, run_dir) as a Hydra job; returns the value of its `sweep.objective` metric
    (what an Optuna sweeper optimises; None for a failed job or without an objective). A
    UserError ends a single run with one line and exit code 2; in a sweep the job is recorded as
    failed and the other jobs go on."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    objective = OmegaConf.to_container(cfg.sweep) if "sweep" in cfg else None

    def result(metrics: dict, status: str, error: str = "") -> None:
        write_result(run_dir, overrides, metrics, status, error, objective)

    metrics = {}
    try:
        if multirun:  # a single run was checked before its run dir was made (Callbacks.on_run_start)
            validate(cfg)
        metrics = task(cfg, run_dir)
    except Stopped as stopped:  # a signal: the whole command stops, sweep included
        result({}, "stopped", str(stopped))
        fail(str(stopped), code=stopped.exit_code, label="stopped")
    except UserError as error:
        if not multirun:
            fail(str(error))
        log.error(f"job failed: {error}")
        result({}, "failed", str(error))
    except Exception as error:
        if not multirun:
            raise
        log.exception("job failed")  # the traceback goes to the job's log; the sweep goes on
        result({}, "failed", f"{type(error).__name__}: {error}")
    else:
        if runtime.is_main():  # under torchrun, rank 0 writes
            result(metrics, "ok")
    if multirun:
        write_summary(Path(hydra_cfg.sweep.dir))
    return metrics.get(objective["objective"]) if objective else None
