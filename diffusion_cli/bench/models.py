"""The model table: our U-Nets and diffusers' UNet2DModel, training and inference images/s and
training peak memory."""

import multiprocessing
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..runtime import autocast, use_channels_last
from .timing import BATCH, compose_train, interleaved, spread, table, train_config


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


def model_variants(quick: bool = False) -> dict[str, Callable[[], nn.Module]]:
    """Our U-Nets as diffusion-train builds them, and diffusers' UNet2DModel of about the size of
    each resunet width."""
    from ..models import build_model

    def ours(kind: str, *overrides: str):
        cfg = train_config(kind, torch.device("cpu"), list(overrides))
        return lambda: use_channels_last(build_model(cfg.model, cfg.data))
    variants = {"unet (seed U-Net, base 64)": ours("unet"),
                "resunet base 16 (data=mnist default)": ours("resunet"),
                "resunet base 32": ours("resunet", "model.base_channels=32"),
                "dit (patch 4, width 128, depth 6)": ours("dit")}
    if not quick:
        variants["dit (patch 2, width 128, depth 6)"] = ours("dit", "model.patch_size=2")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return variants
    variants["diffusers UNet2DModel (16, 32, 32)"] = lambda: DiffusersUNet(16)
    variants["diffusers UNet2DModel (32, 64, 64)"] = lambda: DiffusersUNet(32)
    return variants


def training_step(model: nn.Module, device: torch.device, precision: str = "fp32",
                  shape: tuple = (BATCH, 1, 28, 28)):
    """A forward, MSE, backward and AdamW step on a batch of `shape` (fixed inputs: speed only)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randn(shape, device=device)
    t = torch.randint(0, 1000, shape[:1], device=device)

    def step():
        with autocast(device, precision):
            loss = F.mse_loss(model(x, t), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def peak_memory_mib(name: str, device_name: str, precision: str, batch: int = BATCH) -> float:
    """Peak memory of training steps at `batch` of one variant: CUDA's allocator peak on a GPU; on the
    CPU, the growth of a fresh process's peak resident memory (other variants' buffers would
    hide it in this one; Linux only)."""
    device = torch.device(device_name)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        step = training_step(model_variants()[name]().to(device), device, precision, (batch, 1, 28, 28))
        step()
        step()
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_child_peak_rss_mib, (name, precision, batch))


def _child_peak_rss_mib(name: str, precision: str, batch: int) -> float:
    """Linux: reset the peak RSS (VmHWM) once the model is built, then read how far two training
    steps raise it above the RSS before them."""
    step = training_step(model_variants()[name](), torch.device("cpu"), precision, (batch, 1, 28, 28))
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as file:
        file.write("5")
    step()
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as file:
        return next(int(line.split()[1]) for line in file if line.startswith(field + ":"))


def bench_model(device: torch.device, repeats: int, steps: int, precision: str, quick: bool = False) -> str:
    """Training and inference images/s at batch BATCH and training peak memory of every variant
    (quick: at batch QUICK_BATCH, peak memory of the first alone: each is a fresh process)."""
    batch = QUICK_BATCH if quick else BATCH
    variants = {name: build().to(device) for name, build in model_variants(quick).items()}
    arms, x = {}, torch.randn(batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    for name, model in variants.items():
        train_step = training_step(model, device, precision, (batch, 1, 28, 28))
        arms[(name, "train")] = lambda step=train_step: [step() for _ in range(steps)]
        arms[(name, "forward")] = lambda model=model: [_forward(model, x, t, precision) for _ in range(steps)]
    seconds = interleaved(arms, repeats, device)
    rows = []
    for k, (name, model) in enumerate(variants.items()):
        train, forward = ([steps * batch / s for s in seconds[(name, arm)]] for arm in ("train", "forward"))
        peak = f"{peak_memory_mib(name, str(device), precision, batch):.0f}" if k == 0 or not quick else "-"
        rows.append([name, f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M", spread(train),
                     spread(forward), peak])
    return table(["model", "parameters", "train img/s", "forward img/s", "train peak MiB"], rows)


@torch.inference_mode()
def _forward(model, x, t, precision):
    with autocast(x.device, precision):
        return model(x, t)


QUICK_BATCH = 8  # diffusion-bench --quick: a smoke run of every table, numbers meaningless

# Candidates for the RGB presets (model=resunet32, resunet64): the ResUNet keys each sets.
PRESET_CANDIDATES = {
    32: {"[1,2,2] x1, attention middle only": ["model.attention_resolutions=[]"],
         "[1,2,2] x1, attention 16, 8 (resunet32)": [],
         "[1,2,2] x2, attention 16, 8": ["model.num_res_blocks=2"],
         "[1,2,2,2] x2, attention 16, 8": ["model.channel_mults=[1,2,2,2]", "model.num_res_blocks=2"]},
    64: {"[1,2,2,2] x1, attention 16, 8 (resunet64)": [],
         "[1,2,2,2] x2, attention 16, 8": ["model.num_res_blocks=2"],
         "[1,2,2,2] x2, attention 8 only": ["model.num_res_blocks=2", "model.attention_resolutions=[8]"]},
}


def bench_presets(device: torch.device, repeats: int, steps: int, batch: int = 32,
                  presets_only: bool = False) -> str:
    """Training images/s and parameters of the RGB preset candidates, base 32, at 32 and 64 px
    (presets_only: the two presets alone)."""
    from ..models import build_model

    arms, sizes = {}, {}
    for size, candidates in PRESET_CANDIDATES.items():
        for name, overrides in candidates.items():
            if presets_only and overrides:
                continue
            cfg = compose_train(["data=folder", f"data.image_size={size}", f"model=resunet{size}", *overrides])
            model = use_channels_last(build_model(cfg.model, cfg.data).to(device))
            step = training_step(model, device, shape=(batch, 3, size, size))
            arms[(size, name)] = lambda step=step: [step() for _ in range(steps)]
            sizes[(size, name)] = sum(p.numel() for p in model.parameters())
    seconds = interleaved(arms, repeats, device)
    rows = [[f"{size}x{size}", name, f"{sizes[(size, name)] / 1e6:.2f}M",
             spread([steps * batch / s for s in seconds[(size, name)]])] for size, name in arms]
    return table(["images", "ResUNet base 32: levels x blocks, attention", "parameters", "train img/s"], rows)
