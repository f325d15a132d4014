"""Timing in one process: arms interleaved in a rotating order, so machine noise hits them alike;
Markdown tables of medians and (min-max)."""

import platform
import statistics
import time
from typing import Callable

import torch

BATCH = 128           # training and model batch: the MNIST default


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(function: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    function()
    synchronize(device)
    return time.perf_counter() - start


def interleaved(arms: dict[str, Callable[[], object]], repeats: int, device: torch.device
                ) -> dict[str, list[float]]:
    """Seconds of every arm in each repetition; the arms take turns, in a rotating order."""
    for arm in arms.values():  # warm-up: allocator, kernels, lazy initialisation
        arm()
    names, seconds = list(arms), {name: [] for name in arms}
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            seconds[name].append(timed(arms[name], device))
    return seconds


def spread(values: list[float], digits: int = 0) -> str:
    """median (min-max)"""
    form = f"{{:.{digits}f}}"
    return f"{form.format(statistics.median(values))} ({form.format(min(values))}-{form.format(max(values))})"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def describe(device: torch.device, repeats: int) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return (f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{repeats} repetitions")


def compose_train(overrides: list[str]):
    """diffusion-train's config with `overrides`, composed as the command line would."""
    from hydra import compose, initialize_config_module

    from .. import config  # noqa: F401 (registers the schemas the config files extend)

    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


def train_config(model: str, device: torch.device, overrides: list[str] = ()):
    """diffusion-train's config for data=mnist and `model` at batch BATCH."""
    return compose_train(["data=mnist", f"model={model}", f"trainer.device={device}",
                          f"trainer.batch_size={BATCH}", *overrides])
