"""diffusion-sample: draw images from a trained checkpoint into a run dir of their own."""

import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from . import checkpoint
from .cli import console_script, run_task
from .config import check_sampler_steps, resolve_device
from .images import save_grid
from .metrics import gradient_quality
from .models import image_shape
from .sampling import sample_images

log = logging.getLogger(__name__)


def sample_from_checkpoint(cfg: DictConfig, run_dir: Path) -> dict:
    """Write samples.png and samples.pt ((N, C, H, W) floats in [0, 1]) into run_dir; returns the
    quality metrics where the training data has one."""
    device = resolve_device(cfg.device)
    model, schedule, train_cfg = checkpoint.load(cfg.ckpt, device)
    check_sampler_steps(cfg.sampler, schedule.T)
    steps = cfg.sampler.steps or schedule.T
    log.info(f"run dir: {run_dir}")
    log.info(f"sampling {cfg.num_samples} images from {checkpoint.resolve(cfg.ckpt)} with "
             f"{cfg.sampler.kind}, {steps} steps, seed {cfg.seed}, on {device}")
    shape = (cfg.num_samples, *image_shape(train_cfg.data))
    images = sample_images(model, schedule, cfg.sampler, shape, batch_size=cfg.batch_size,
                           seed=cfg.seed, progress=True)
    grid = save_grid(images, run_dir / "samples.png", cfg.nrow)
    torch.save(images, run_dir / "samples.pt")
    metrics = gradient_quality(images) if train_cfg.data.kind == "gradients" else {}
    if metrics:
        log.info("quality: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
    log.info(f"wrote {grid} and {run_dir / 'samples.pt'}")
    return metrics


@hydra.main(version_base="1.3", config_path="pkg://diffusion_cli.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_task(sample_from_checkpoint, cfg)


cli = console_script(main)

if __name__ == "__main__":
    cli()
