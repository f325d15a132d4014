"""Stopping a training run: SIGINT (Ctrl-C) and SIGTERM (what schedulers send before they kill) ask
the loop to save a checkpoint and exit; a second Ctrl-C exits at once. Work that comes after a
checkpoint (evaluation, grids, the end of the run) is cut at once instead: its state is already
saved, and the resumed run draws what was skipped. Too many non-finite losses stop it with an error."""

import signal
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig

from . import checkpoint, runtime
from .errors import UserError


class GracefulStop:
    """Context manager; `requested` is the name of the first signal received, or None."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = None
        self._previous = {}
        self._cut = False

    def _handle(self, signum, frame):
        self.requested = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: at once
        if self._cut:
            self._cut = False
            raise Interrupted(self.requested)

    @contextmanager
    def interruptible(self):
        """Work whose state is saved: a signal inside raises Interrupted at once (between two
        tensor operations), instead of waiting for the next step."""
        if self.requested:
            raise Interrupted(self.requested)
        self._cut = True
        try:
            yield
        finally:
            self._cut = False

    def __enter__(self):
        try:
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: leave the signals alone
            self._previous.clear()
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


class Interrupted(Exception):
    """A signal cut interruptible work short; its argument is the signal's name."""


class Stopped(Exception):
    """The run saved a checkpoint and stopped on a signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@contextmanager
def cut_short(stop: GracefulStop, when: str, run_dir: Path):
    """Work after a checkpoint, which a signal ends at once (a single process; under torchrun the
    ranks stop together at the next step, as in training)."""
    if runtime.world_size() > 1:
        yield
        return
    try:
        with stop.interruptible():
            yield
    except Interrupted as signal_name:
        raise stopped(str(signal_name), when, run_dir) from None


def stopped(signal_name: str, when: str, run_dir: Path) -> Stopped:
    """The Stopped error of a run stopped by `signal_name` (its last state saved), with the command
    that resumes it."""
    again = (f"torchrun --nproc-per-node {runtime.world_size()} -m diffusion_cli.train"
             if runtime.world_size() > 1 else "diffusion-train")
    return Stopped(f"{signal_name} {when}; saved {run_dir / 'checkpoints' / 'last.pt'}. Resume with: "
                   f"{again} resume={run_dir}", exit_code=130 if signal_name == "SIGINT" else 143)


def check_nonfinite(step: int, count: int, cfg: DictConfig, run_dir: Path) -> None:
    """Stop the run on a non-finite loss or gradient once more than max_nonfinite_skips were seen.
    Nothing is saved: the skipped updates never reached the weights, and checkpoints/last.pt keeps
    the last state saved before."""
    if count <= cfg.trainer.max_nonfinite_skips:
        return
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"{last} (step {checkpoint.read(last)['step']}) is the last good state" if last.exists() \
        else "no checkpoint was written yet"
    raise UserError(f"non-finite loss or gradient at step {step}: the learning "
                    f"rate may be too high (trainer.lr={cfg.trainer.lr}) or the numbers overflowed "
                    f"(fp16); {kept}. Lower trainer.lr and resume, or allow "
                    f"trainer.max_nonfinite_skips=N skipped steps")
