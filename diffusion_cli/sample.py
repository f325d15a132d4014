"""diffusion-sample: draw images from a trained checkpoint into a run dir of their own."""

import json
import logging
import shutil
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from . import checkpoint
from .atomic import atomic_write
from .cli import console_script, run_task
from .conditions import condition_of
from .config import check_sampler_steps
from .ema import profile_key
from .errors import UserError
from .generation import image_seeds, sample_batches
from .images import save_each, save_grid
from .metrics import quality_metric, sample_quality
from .runtime import autocast, compiled, resolve_device
from .samplers import describe, sample
from .spaces import checkpoint_space, relocated
from .stopping import GracefulStop, Interrupted, Stopped

log = logging.getLogger(__name__)


def sample_from_checkpoint(cfg: DictConfig, run_dir: Path) -> dict:
    """Write samples.png and samples.pt ((N, C, H, W) floats in [0, 1]) into run_dir; with
    eval=true also quality.json; returns the quality metrics (eval=true, or gradients data) and
    the sampling time, which a `diffusion-sample -m` sweep collects into summary.csv."""
    device = resolve_device(cfg.device)
    state = relocated(checkpoint.read(cfg.ckpt, map_location=device), cfg.text_encoder.path, cfg.autoencoder.path)
    model, schedule, train_cfg = checkpoint.load(cfg.ckpt, device, use_ema=cfg.use_ema, state=state,
                                                 weights=chosen_weights(cfg, state))
    guide, guide_name = autoguide(cfg, state, device)
    space = checkpoint_space(state, device)
    check_sampler_steps(cfg.sampler, schedule.T)
    shape = space.shape
    condition = condition_of(model, train_cfg.data)
    labels, shown_classes, nrow, titles, negative, prompts = condition.requested(cfg)
    measured = quality_metric(train_cfg.data) or condition.aligns(prompts)
    if cfg.eval and not measured:
        raise UserError(f"eval=true: data={train_cfg.data.kind} has no quality metric in this project; "
                        f"use save_images=true and diffusion-eval samples=THIS_RUN reference=YOUR_FOLDER "
                        f"(FID, KID, precision/recall){condition.eval_hint}")
    count = len(labels) if labels is not None else cfg.num_samples
    batch = min(count, cfg.batch_size)

    def warm_up(network):  # one step of the real call: batch shape, inference mode, guidance
        with autocast(device, cfg.precision):
            sample(network, schedule, (batch, *shape), sampler="ddim", steps=1,
                   labels=None if labels is None else labels[:batch], guidance_scale=cfg.guidance_scale,
                   negative=None if negative is None else negative[:batch], guide=guide)
    model = compiled(model, cfg.compile, warm_up, "compile")
    log.info(f"run dir: {run_dir}")
    log.info(f"sampling {count} images from {checkpoint.resolve(cfg.ckpt)} with "
             f"{describe(cfg.sampler, schedule.T)}, seed {cfg.seed}, on {device}"
             + (f", label {cfg.label}" if cfg.label is not None else "") + condition.describe(prompts)
             + (f", guidance {cfg.guidance_scale}" if labels is not None and guide is None else "")
             + (f", autoguidance {cfg.guidance_scale} by {guide_name}" if guide is not None else ""))
    started = time.perf_counter()
    drawn = drawn_before(run_dir, cfg, count) if cfg.save_images else {}
    before = sum(map(len, drawn.values()))
    with autocast(device, cfg.precision), GracefulStop() as stop, stop.interruptible():
        try:
            for start, chunk in sample_batches(model, schedule, cfg.sampler, (count, *shape), batch_size=cfg.batch_size,
                                               seed=cfg.seed, labels=labels, guidance_scale=cfg.guidance_scale,
                                               negative=negative, space=space, progress=True, done=frozenset(drawn),
                                               guide=guide):
                if cfg.save_images:
                    keep(run_dir, start, chunk)
                drawn[start] = chunk
        except Interrupted as signal_name:
            done = sum(map(len, drawn.values()))
            resume = (f"; the same command with hydra.run.dir={run_dir} goes on from there" if cfg.save_images
                      else "; with save_images=true a rerun goes on where it stopped")
            raise Stopped(f"{signal_name} after {done} of {count} images{resume}",
                          exit_code=130 if str(signal_name) == "SIGINT" else 143) from None
    images = torch.cat([drawn[start] for start in sorted(drawn)])
    sampling_s = time.perf_counter() - started
    log.info(f"sampled {count - before} images in {sampling_s:.1f} s" + (f" ({before} drawn before)" if before else ""))
    grid = save_grid(images, run_dir / "samples.png", nrow, row_titles=titles)
    torch.save(images, run_dir / "samples.pt")
    if cfg.save_images:
        save_each(images, run_dir / "images", missing_only=True)  # a batch killed between its two writes
        shutil.rmtree(run_dir / BATCHES)
        also = condition.write_prompts(run_dir / "prompts.jsonl", prompts, image_seeds(cfg.seed, count), cfg)
        log.info(f"wrote {count} PNG files to {run_dir / 'images'}{also}")
    metrics = {}
    if cfg.eval or train_cfg.data.kind == "gradients":
        metrics = {**sample_quality(images, train_cfg.data, shown_classes), **condition.alignment(images, prompts)}
        by_class = metrics.pop("label_accuracy_by_class", {})
        log.info("quality: " + ", ".join(f"{key} {value:.4f}" for key, value in metrics.items()))
        if len(by_class) > 1:
            log.info("label_accuracy by class: " + ", ".join(f"{k}: {a:.3f}" for k, a in by_class.items()))
            metrics["label_accuracy_by_class"] = by_class
        with atomic_write(run_dir / "quality.json") as file:
            file.write(json.dumps(metrics, indent=2))
    log.info(f"wrote {grid} and {run_dir / 'samples.pt'}")
    return {**{key: value for key, value in metrics.items() if isinstance(value, float)},
            "sampling_s": sampling_s}


def chosen_weights(cfg: DictConfig, state: dict) -> str | None:
    """The checkpoint entry of the weights asked for: a power EMA with ema=SIGMA_REL, else the
    default (the EMA, or with use_ema=false the raw weights)."""
    if cfg.ema is None:
        return None
    kept = sorted(float(key[len("ema_"):]) for key in state if key.startswith("ema_"))
    if profile_key(cfg.ema) not in state:
        raise UserError(f"ema={cfg.ema}: ckpt={cfg.ckpt} keeps no power EMA of that sigma_rel "
                        + (f"(it keeps {', '.join(map(str, kept))})" if kept else
                           "(train with trainer.ema_profiles=[0.05,0.1,0.2] to keep some)"))
    return profile_key(cfg.ema)


def autoguide(cfg: DictConfig, state: dict, device) -> tuple[torch.nn.Module | None, str]:
    """guidance=auto: autoguidance's weaker model and where it comes from: guide=CKPT's sampling
    weights, else the run's own guide (the snapshot at trainer.guide_at)."""
    if cfg.guidance != "auto":
        return None, ""
    if cfg.guide is not None:
        return checkpoint.load(cfg.guide, device)[0], f"ckpt={cfg.guide}"
    if "guide" not in state:
        raise UserError(f"guidance=auto: ckpt={cfg.ckpt} holds no guide (trained with trainer.guide_at=0, or "
                        f"stopped before it): name one with guide=CKPT, e.g. an earlier checkpoint of the run")
    trainer = state["config"]["trainer"]
    return (checkpoint.load(cfg.ckpt, device, state=state, weights="guide")[0],
            f"its guide (step {round(trainer['guide_at'] * trainer['max_steps'])})")


# save_images=true: each batch drawn, until samples.pt holds them all (bulk sampling resumes).
BATCHES = ".batches"


def drawn_before(run_dir: Path, cfg: DictConfig, count: int) -> dict[int, torch.Tensor]:
    """The batches an earlier run of the same command drew into run_dir (by first image index),
    after checking the command is the same; {} for a new run, which records its command."""
    folder, request = run_dir / BATCHES, json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True)
    if not (folder / "request.json").is_file():
        with atomic_write(folder / "request.json") as file:
            file.write(request)
        return {}
    earlier = (folder / "request.json").read_text()
    if earlier != request:
        raise UserError(f"hydra.run.dir={run_dir} holds the unfinished images of another diffusion-sample "
                        f"command ({folder / 'request.json'}): run that command again to finish them, choose "
                        f"another hydra.run.dir, or add overwrite=true to replace them")
    for stale in [*folder.glob(".*.tmp"), *(run_dir / "images").glob(".*.tmp")]:  # files a kill cut short
        stale.unlink()
    drawn = {int(path.stem): torch.load(path, weights_only=True) for path in folder.glob("[0-9]*.pt")}
    log.info(f"going on from {sum(map(len, drawn.values()))} of {count} images drawn before into {run_dir}")
    return drawn


def keep(run_dir: Path, start: int, images: torch.Tensor) -> None:
    """A batch's images as floats (for samples.pt), then as PNG files."""
    with atomic_write(run_dir / BATCHES / f"{start:09d}.pt", "wb") as file:
        torch.save(images, file)
    save_each(images, run_dir / "images", first=start)


@hydra.main(version_base="1.3", config_path="pkg://diffusion_cli.conf", config_name="sample")
def main(cfg: DictConfig) -> None:
    run_task(sample_from_checkpoint, cfg)


cli = console_script(main)

if __name__ == "__main__":
    cli()
