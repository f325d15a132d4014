"""diffusion-bench: the speed of the project's training step, samplers and models, each against a
baseline measured in the same process, interleaved, so machine noise hits both alike. Prints
Markdown tables: medians with (min-max) over the repetitions, and the ratios the targets are on.

    diffusion-bench                  # all three tables (a few minutes on 2 CPU cores)
    diffusion-bench train            # project training step vs a bare loop
    diffusion-bench sample           # sampler step overhead vs a floor loop (and diffusers)
    diffusion-bench model            # U-Net images/s and peak memory (and diffusers' UNet2DModel)

diffusers is optional (`pip install diffusion-cli[bench]`); without it its rows are left out.
"""

import argparse
import math
import multiprocessing
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .data import Split
from .errors import UserError
from .runtime import PRECISIONS, autocast, resolve_device, use_channels_last
from .sampling import ddim_timesteps, sample
from .schedule import NoiseSchedule

BATCH = 128           # training and model batch: the MNIST default
SAMPLE_SHAPE = (64, 1, 28, 28)


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


def train_config(model: str, device: torch.device, overrides: list[str] = ()):
    """diffusion-train's config for data=mnist and `model`, composed as the command line would."""
    from hydra import compose, initialize_config_module

    from . import config  # noqa: F401 (registers the schemas the config files extend)

    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        return compose("train", overrides=["data=mnist", f"model={model}", f"trainer.device={device}",
                                           f"trainer.batch_size={BATCH}", *overrides])


def bench_train(device: torch.device, repeats: int, steps: int, models: list[str], precision: str) -> str:
    """images/s of diffusion-train's TrainStep (data drawn by index, label-free MNIST shape, EMA,
    loss and skip statistics on the device) against a bare loop over the same model and batch
    size: q_sample, forward, MSE, backward, AdamW step, nothing else."""
    from .train import TrainStep

    rows = []
    for kind in models:
        cfg = train_config(kind, device, [f"trainer.precision={precision}"])
        images = torch.rand(4096, 1, 28, 28) * 2 - 1
        step = TrainStep(cfg, device, Split(images, torch.zeros(4096, dtype=torch.long)))
        model, schedule = step.model, step.schedule
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, fused=True)
        generator = torch.Generator(device).manual_seed(1)
        x0 = step.images[:BATCH]
        counter = iter(range(1, 10 ** 9))

        def bare():
            for _ in range(steps):
                t = torch.randint(0, schedule.T, (BATCH,), generator=generator, device=device)
                noise = torch.randn(x0.shape, generator=generator, device=device)
                with autocast(device, precision):
                    loss = F.mse_loss(model(schedule.q_sample(x0, t, noise), t), noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        def project():
            for _ in range(steps):
                step(next(counter))

        def project_with_sync():  # what a per-step host sync (loss.item()) would add
            for _ in range(steps):
                step(next(counter))
                step.stats[0].item()

        seconds = interleaved({"project": project, "bare": bare, "sync": project_with_sync}, repeats, device)
        per_s = {name: [steps * BATCH / s for s in values] for name, values in seconds.items()}
        ratio = [p / b for p, b in zip(per_s["project"], per_s["bare"])]
        sync = [s / p for s, p in zip(per_s["sync"], per_s["project"])]
        rows.append([kind, spread(per_s["bare"]), spread(per_s["project"]), spread(ratio, 3),
                     spread(sync, 3)])
    return table(["model", "bare loop img/s", "diffusion-train step img/s", "step / bare (target >= 0.95)",
                  "with a host sync per step / without"], rows)


class Trivial(nn.Module):
    """A stand-in network, x * 0.1, so the table shows the samplers' own cost."""
    prediction, num_classes = "eps", 0

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # where sample() reads the device from

    def forward(self, x, t, labels=None):
        return x * 0.1


def floor_ddpm(model, schedule: NoiseSchedule, x: torch.Tensor, generator) -> torch.Tensor:
    """The least a clipped-x0 ancestral step can do: coefficients precomputed as numbers, one randn,
    in-place fused ops."""
    n = schedule.numbers
    a, s = n["sqrt_alpha_bars"], n["sqrt_one_minus_alpha_bars"]
    c0, ct, var = n["posterior_mean_x0_coef"], n["posterior_mean_xt_coef"], n["posterior_variance"]
    sigma = [math.sqrt(v) for v in var]
    for i in range(schedule.T - 1, -1, -1):
        eps = model(x, schedule.timesteps[i].expand(x.shape[0]))
        x0 = torch.add(x, eps, alpha=-s[i]).mul_(1 / a[i]).clamp_(-1, 1)
        x = torch.add(x0.mul_(c0[i]), x, alpha=ct[i])
        if i > 0:
            x.add_(torch.randn(x.shape, generator=generator, device=x.device), alpha=sigma[i])
    return x


def floor_ddim(model, schedule: NoiseSchedule, x: torch.Tensor, steps: int) -> torch.Tensor:
    """The least a clipped-x0 DDIM step (eta 0, eps recomputed from the clipped x0) can do."""
    ab = schedule.numbers["alpha_bars"]
    timesteps = ddim_timesteps(schedule.T, steps)
    for k, t in enumerate(timesteps):
        prev = ab[timesteps[k + 1]] if k + 1 < len(timesteps) else 1.0
        eps = model(x, torch.full((x.shape[0],), t, device=x.device))
        x0 = torch.add(x, eps, alpha=-math.sqrt(1 - ab[t])).mul_(1 / math.sqrt(ab[t])).clamp_(-1, 1)
        eps = torch.add(x, x0, alpha=-math.sqrt(ab[t])).mul_(1 / math.sqrt(1 - ab[t]))
        x = torch.add(eps.mul_(math.sqrt(1 - prev)), x0, alpha=math.sqrt(prev))
    return x


def bench_sample(device: torch.device, repeats: int, ddim_steps: int, T: int) -> str:
    """Microseconds per step of the project's DDPM and DDIM samplers with a trivial model, against
    the floor loops and, if installed, diffusers' DDPMScheduler and DDIMScheduler."""
    model, schedule = Trivial().to(device), NoiseSchedule(T=T).to(device)
    x_T = torch.randn(SAMPLE_SHAPE, device=device)
    generator = torch.Generator(device).manual_seed(0)
    rounds = max(1, T // ddim_steps)  # DDIM runs as many steps per repetition as DDPM does
    arms = {
        ("DDPM", "floor loop"): (lambda: floor_ddpm(model, schedule, x_T, generator), T),
        ("DDPM", "diffusion-cli sample()"): (lambda: sample(model, schedule, SAMPLE_SHAPE, generator=generator,
                                                            x_T=x_T), T),
        ("DDIM", "floor loop"): (lambda: floor_ddim(model, schedule, x_T, ddim_steps), ddim_steps),
        ("DDIM", "diffusion-cli sample()"): (lambda: sample(model, schedule, SAMPLE_SHAPE, sampler="ddim",
                                                            steps=ddim_steps, x_T=x_T), ddim_steps),
    }
    arms.update(diffusers_samplers(model, x_T, generator, T, ddim_steps))
    arms = {name: (function, count) if name[0] == "DDPM" else
            (lambda function=function: [function() for _ in range(rounds)], count * rounds)
            for name, (function, count) in arms.items()}
    with torch.inference_mode():
        seconds = interleaved({name: function for name, (function, _) in arms.items()}, repeats, device)
    rows = []
    for (sampler, name), (_, count) in arms.items():
        micros = [s / count * 1e6 for s in seconds[(sampler, name)]]
        floor = [s / count * 1e6 for s in seconds[(sampler, "floor loop")]]
        rows.append([sampler, name, spread(micros, 1), spread([m / f for m, f in zip(micros, floor)], 2)])
    return table(["sampler", "loop", "us per step", "x floor (target <= 1.1)"], rows)


def diffusers_samplers(model, x_T, generator, T: int, ddim_steps: int) -> dict:
    """diffusers' schedulers driving the same trivial model, configured as our samplers are."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler
    except ImportError:
        return {}
    common = dict(num_train_timesteps=T, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                  clip_sample=True)
    ddpm = DDPMScheduler(**common)
    ddpm.set_timesteps(T)
    ddim = DDIMScheduler(**common, timestep_spacing="trailing", set_alpha_to_one=True)
    ddim.set_timesteps(ddim_steps)

    def run(scheduler, **options):
        x = x_T
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(x.shape[0])), t, x, **options).prev_sample
        return x
    return {("DDPM", "diffusers DDPMScheduler"): (lambda: run(ddpm, generator=generator), T),
            ("DDIM", "diffusers DDIMScheduler"): (lambda: run(ddim, eta=0.0, use_clipped_model_output=True),
                                                  ddim_steps)}


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel behind our model interface: model(x, t) -> eps."""
    prediction, num_classes = "eps", 0

    def __init__(self, base: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.net = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1,
                               block_out_channels=(base, 2 * base, 2 * base), norm_num_groups=8,
                               down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                               attention_head_dim=base // 2, dropout=0.1)

    def forward(self, x, t, labels=None):
        return self.net(x, t).sample


def model_variants() -> dict[str, Callable[[], nn.Module]]:
    """Our U-Nets as diffusion-train builds them, and diffusers' UNet2DModel of about the size of
    each resunet width."""
    from .models import build_model

    def ours(kind: str, *overrides: str):
        cfg = train_config(kind, torch.device("cpu"), list(overrides))
        return lambda: use_channels_last(build_model(cfg.model, cfg.data))
    variants = {"unet (seed U-Net, base 64)": ours("unet"),
                "resunet base 16 (data=mnist default)": ours("resunet"),
                "resunet base 32": ours("resunet", "model.base_channels=32")}
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return variants
    variants["diffusers UNet2DModel (16, 32, 32)"] = lambda: DiffusersUNet(16)
    variants["diffusers UNet2DModel (32, 64, 64)"] = lambda: DiffusersUNet(32)
    return variants


def training_step(model: nn.Module, device: torch.device, precision: str = "fp32"):
    """A forward, MSE, backward and AdamW step at batch BATCH (fixed inputs: speed only)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(BATCH, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (BATCH,), device=device)

    def step():
        with autocast(device, precision):
            loss = F.mse_loss(model(x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def peak_memory_mib(name: str, device_name: str, precision: str) -> float:
    """Peak memory of BATCH training steps of one variant: CUDA's allocator peak on a GPU; on the
    CPU, the growth of a fresh process's peak resident memory (other variants' buffers would
    hide it in this one; Linux only)."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = training_step(model_variants()[name]().to(device), device, precision)
        step()
        step()
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_peak_rss_mib, (name, precision))


def _child_peak_rss_mib(name: str, precision: str) -> float:
    """Linux: reset the peak RSS (VmHWM) once the model is built, then read how far two training
    steps raise it above the RSS before them."""
    step = training_step(model_variants()[name](), torch.device("cpu"), precision)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    step()
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":"))


def bench_model(device: torch.device, repeats: int, steps: int, precision: str) -> str:
    """Training and inference images/s at batch BATCH and training peak memory of every variant."""
    variants = {name: build().to(device) for name, build in model_variants().items()}
    arms, x = {}, torch.randn(BATCH, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (BATCH,), device=device)
    for name, model in variants.items():
        train_step = training_step(model, device, precision)
        arms[(name, "train")] = lambda step=train_step: [step() for _ in range(steps)]
        arms[(name, "forward")] = lambda model=model: [_forward(model, x, t, precision) for _ in range(steps)]
    seconds = interleaved(arms, repeats, device)
    rows = []
    for name, model in variants.items():
        train, forward = ([steps * BATCH / s for s in seconds[(name, arm)]] for arm in ("train", "forward"))
        rows.append([name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", spread(train),
                     spread(forward), f"{peak_memory_mib(name, str(device), precision):.0f}"])
    return table(["model", "parameters", "train img/s", "forward img/s", "train peak MiB"], rows)


@torch.inference_mode()
def _forward(model, x, t, precision):
    with autocast(x.device, precision):
        return model(x, t)


TABLES = ("train", "sample", "model")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="diffusion-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", metavar="{train,sample,model}",
                        help="which tables (default: all three)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--repeats", type=int, default=7, help="repetitions per arm (default 7)")
    parser.add_argument("--steps", type=int, default=10, help="training steps per repetition (default 10)")
    parser.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                        help="autocast of the train and model tables' forward passes (default fp32)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny counts, numbers meaningless")
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device, key="--device")
    except UserError as error:
        parser.error(str(error))
    tables = args.tables or list(TABLES)
    if set(tables) - set(TABLES):
        parser.error(f"unknown table {sorted(set(tables) - set(TABLES))[0]!r}: choose from {', '.join(TABLES)}")
    repeats, steps = (1, 1) if args.quick else (args.repeats, args.steps)
    print(describe(device, repeats) + f", precision {args.precision}")
    if "train" in tables:
        models = ["resunet"] if args.quick else ["resunet", "unet"]
        print(f"\n## train: images/s at batch {BATCH}, {steps} steps per repetition\n")
        print(bench_train(device, repeats, steps, models, args.precision))
    if "sample" in tables:
        T, ddim_steps = (20, 5) if args.quick else (1000, 50)
        print(f"\n## sample: a trivial model (x * 0.1), batch {'x'.join(map(str, SAMPLE_SHAPE))}, "
              f"DDPM {T} steps, DDIM {ddim_steps} steps\n")
        print(bench_sample(device, repeats, ddim_steps, T))
    if "model" in tables:
        print(f"\n## model: MNIST 1x28x28 at batch {BATCH}, {steps} steps per repetition\n")
        print(bench_model(device, repeats, steps, args.precision))


if __name__ == "__main__":
    main()
