"""The data table: training images/s with the images in memory against streamed from the row
cache, and the streaming path's peak resident memory as the folder grows."""

import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from .timing import BATCH, compose_train, interleaved, spread, table


def write_gradient_pngs(folder: Path, count: int, size: int) -> Path:
    """`count` gradient images of 3 x size x size as PNG files under folder/, 1000 per subfolder."""
    from PIL import Image

    from ..data import make_gradients

    for start in range(0, count, 1000):
        pixels = (make_gradients(min(1000, count - start), (3, size, size), seed=start) * 255).round().byte()
        for offset, image in enumerate(pixels):
            path = folder / f"{(start + offset) // 1000:03d}" / f"{start + offset:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    return folder


def folder_config(folder: Path, size: int, device: torch.device, in_memory: bool, workers: int, model: list[str]):
    return compose_train([
        "data=folder", f"data.path={folder}", f"data.image_size={size}", f"data.in_memory={in_memory}",
        f"data.num_workers={workers}", "data.num_eval=16", f"trainer.device={device}",
        f"trainer.batch_size={BATCH}", *model])


# The model of the speed rows: small, so that reading batches weighs as much as it can.
SMALL_MODEL = ["model=mlp", "model.width=256", "model.depth=2"]
# The model of the memory rows, at 64x64 (the MLP's linear path would be 12288^2 weights there).
TINY_UNET = ["model=resunet", "model.base_channels=8", "model.channel_mults=[1,2]", "model.attention=false"]


def bench_data(device: torch.device, repeats: int, steps: int, counts=(2000, 20000), quick: bool = False) -> str:
    """Two tables: images/s of TrainStep with the folder in memory and streamed (after the cache
    is built), and the peak resident memory of a streaming run at each folder size."""
    from ..data import load_data
    from ..train import TrainStep

    with tempfile.TemporaryDirectory() as workdir:
        os.environ["DIFFUSION_CLI_CACHE"] = str(Path(workdir) / "cache")
        folder = write_gradient_pngs(Path(workdir) / "speed", counts[0], 32)
        arms, workers = {}, 0 if quick else 2
        for name, in_memory in (("in memory", True), ("streaming", False)):
            cfg = folder_config(folder, 32, device, in_memory, workers, SMALL_MODEL)
            train, _ = load_data(cfg.data)
            step, counter = TrainStep(cfg, device, train), iter(range(1, 10 ** 9))
            arms[name] = lambda step=step, counter=counter: [step(next(counter)) for _ in range(steps)]
        seconds = interleaved(arms, repeats, device)
        per_s = {name: [steps * BATCH / s for s in values] for name, values in seconds.items()}
        ratio = [s / m for s, m in zip(per_s["streaming"], per_s["in memory"])]
        speed = table(["in memory img/s", f"streaming img/s ({workers} workers)", "streaming / in memory (target >= 0.9)"],
                      [[spread(per_s["in memory"]), spread(per_s["streaming"]), spread(ratio, 3)]])
        rows = []
        for count in counts:
            grown = write_gradient_pngs(Path(workdir) / f"rss{count}", count, 64)
            rows.append([f"{count:,}", *peak_memory(grown, device, workers, 5 if quick else 50, quick)])
    return speed + "\n\n" + table(["images (3x64x64)", "training process peak RSS MiB",
                                   "largest worker peak RSS MiB"], rows)


def peak_memory(folder: Path, device: torch.device, workers: int, steps: int, quick: bool = False) -> list[str]:
    """Peak RSS of a fresh process that streams `steps` training steps from the folder's cache,
    built by a process before it (quick: by the same one, whose peak then counts the build too)."""
    def child(steps):
        code = f"from diffusion_cli.bench.data import stream_and_report; " \
               f"stream_and_report({str(folder)!r}, {str(device)!r}, {workers}, {steps})"
        return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    if not quick:
        child(0)  # builds the cache: not what is measured
    return child(steps).stdout.split()


def stream_and_report(folder: str, device: str, workers: int, steps: int) -> None:
    """(In a child process.) Load the folder for streaming, train `steps` steps, print the peak
    RSS in MiB of this process and of its largest DataLoader worker."""
    from ..data import load_data
    from ..train import TrainStep

    cfg = folder_config(Path(folder), 64, torch.device(device), False, workers, TINY_UNET)
    train, _ = load_data(cfg.data)
    if steps:
        step = TrainStep(cfg, torch.device(device), train)
        for number in range(1, steps + 1):
            step(number)
        step.batches.batches = None  # shut the workers down, so their peak is counted
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"{own:.0f} {children:.0f}")

