"""diffusion-train: one readable training loop.

DDPM objective (Ho et al. 2020): draw x0 from the data, one timestep t per sample and noise eps,
form x_t = q_sample(x0, t, eps), and regress the model's output on eps (or on x0 or v, as
model.prediction says) with an MSE loss, optionally min-SNR weighted. Sampling uses an EMA of the
weights.
"""

import json
import logging
import math
import random
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoint, plots
from .atomic import atomic_write
from .cli import console_script, run_task
from .config import resolve_device, to_plain, validate
from .data import Split, load_data
from .ema import EMA
from .errors import UserError
from .images import save_grid, to_unit
from .metrics import QUALITY_KEYS, sample_quality
from .models import build_model, eval_mode, image_shape
from .sampling import class_rows, sample_images
from .schedule import NoiseSchedule
from .stopping import GracefulStop, Stopped

log = logging.getLogger(__name__)

# Fractions of T at which the reconstruction grids show x_t and the model's x0 estimate.
RECONSTRUCTION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


MIN_SNR_GAMMA = 5.0


def loss_weight(schedule: NoiseSchedule, t: torch.Tensor, prediction: str, weighting: str
                ) -> torch.Tensor:
    """Per-sample loss weights. min_snr (Hang et al. 2023): min(SNR, gamma) / SNR for eps, carried
    over to the other objectives as min(SNR, gamma) / (SNR + 1) for v and min(SNR, gamma) for x0."""
    if weighting == "none":
        return torch.ones(t.shape, device=t.device)
    snr = schedule.snr[t]
    clipped = snr.clamp(max=MIN_SNR_GAMMA)
    return {"eps": clipped / snr, "v": clipped / (snr + 1), "x0": clipped}[prediction]


def training_loss(model, schedule: NoiseSchedule, x0: torch.Tensor, generator: torch.Generator,
                  labels: torch.Tensor | None = None, cond_drop_prob: float = 0.0,
                  loss_weighting: str = "none") -> torch.Tensor:
    """The DDPM loss on a batch: the MSE between the model's output and its target (the noise, x0
    or v), per sample weighted. A class-conditional model sees the null label with probability
    cond_drop_prob, which trains the unconditional model that guidance needs."""
    t = torch.randint(0, schedule.T, (x0.shape[0],), generator=generator, device=x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=x0.device)
    if labels is not None:
        dropped = torch.rand(labels.shape, generator=generator, device=x0.device) < cond_drop_prob
        labels = torch.where(dropped, model.num_classes, labels)
    output = model(schedule.q_sample(x0, t, noise), t, labels)
    errors = (output - schedule.target(x0, t, noise, model.prediction)).pow(2).flatten(1).mean(1)
    return (loss_weight(schedule, t, model.prediction, loss_weighting) * errors).mean()


# The eval loss is also reported per bucket of timesteps: where the model is weak.
LOSS_BUCKETS = 10


class Evaluator:
    """The held-out loss (unweighted MSE in the model's prediction) at fixed timesteps and noise,
    so numbers are comparable across steps; class-conditional models see the true labels."""

    def __init__(self, data: Split, schedule: NoiseSchedule, batch_size: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.images, self.labels = data
        # Timesteps spread evenly over 0..T-1, one per image; noise fixed once.
        self.t = torch.linspace(0, schedule.T - 1, len(self.images)).round().long()
        self.noise = torch.randn(self.images.shape, generator=generator)
        self.schedule = schedule
        self.batch_size = batch_size

    @torch.no_grad()
    def loss(self, model) -> tuple[float, list[float]]:
        """(mean loss, mean loss in each of LOSS_BUCKETS equal ranges of t)."""
        device = self.schedule.betas.device
        errors = []
        with eval_mode(model):
            for start in range(0, len(self.images), self.batch_size):
                x0, t, noise = (v[start:start + self.batch_size].to(device)
                                for v in (self.images, self.t, self.noise))
                labels = None
                if model.num_classes:
                    labels = self.labels[start:start + self.batch_size].to(device)
                output = model(self.schedule.q_sample(x0, t, noise), t, labels)
                target = self.schedule.target(x0, t, noise, model.prediction)
                errors.append((output - target).pow(2).flatten(1).mean(1).cpu())
        errors = torch.cat(errors)
        bucket = self.t * LOSS_BUCKETS // self.schedule.T
        by_t = [errors[bucket == b].mean().item() if (bucket == b).any() else float("nan")
                for b in range(LOSS_BUCKETS)]
        return errors.mean().item(), by_t


@torch.no_grad()
def reconstructions(model, schedule: NoiseSchedule, data: Split, seed: int) -> torch.Tensor:
    """Rows: the clean images, then for each t in RECONSTRUCTION_TIMES x_t and the model's x0
    estimate (clipped to [-1, 1]). Returns the rows stacked, in [-1, 1]."""
    device = schedule.betas.device
    x0 = data.images.to(device)
    labels = data.labels.to(device) if model.num_classes else None
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    rows = [x0]
    with eval_mode(model):
        for fraction in RECONSTRUCTION_TIMES:
            t = torch.full((len(x0),), round(fraction * (schedule.T - 1)), device=device)
            x_t = schedule.q_sample(x0, t, noise)
            _, x0_estimate = schedule.eps_and_x0(x_t, t, model(x_t, t, labels), model.prediction)
            rows += [x_t.clamp(-1, 1), x0_estimate.clamp(-1, 1)]
    return torch.cat(rows)


def learning_rate(step: int, tc) -> float:
    """Linear warm-up to trainer.lr, then constant or a cosine decay to 0 at max_steps."""
    if step <= tc.lr_warmup_steps:
        return tc.lr * step / tc.lr_warmup_steps
    if tc.lr_schedule == "constant":
        return tc.lr
    progress = (step - tc.lr_warmup_steps) / max(1, tc.max_steps - tc.lr_warmup_steps)
    return tc.lr * 0.5 * (1 + math.cos(math.pi * progress))


def due(step: int, every: int, last_step: int) -> bool:
    """Whether periodic work (every N steps; 0 = only at the end) is due at `step`."""
    return step == last_step or (every > 0 and step % every == 0)


# Keys that may change when a run is resumed: how long it runs, where, and what it logs and keeps.
RESUMABLE = ("trainer.max_steps", "trainer.device", "trainer.log_every", "trainer.eval_every",
             "trainer.sample_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
             "trainer.num_grid_images", "trainer.quality_every", "trainer.num_quality_images",
             "trainer.max_nonfinite_skips", "sampler")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The checkpoint's own config with the command line's resumable overrides applied, and the
    checkpoint itself. Any other override is refused: it would not be the same run."""
    state = checkpoint.read(cfg.resume, key="resume")
    saved = OmegaConf.create(state["config"])
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra."):
            continue
        if not any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE):
            raise UserError(f"{key} cannot change when resuming (the run has {key}="
                            f"{OmegaConf.select(saved, key)}): drop that override, or start a new run")
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    saved.resume = cfg.resume
    validate(saved)
    if state["step"] >= saved.trainer.max_steps:
        raise UserError(f"resume={cfg.resume} is at step {state['step']}, trainer.max_steps is "
                        f"{saved.trainer.max_steps}: raise trainer.max_steps to train further")
    return saved, state


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop metrics logged after `step` (or cut off mid-line by a kill): the resumed run logs them
    again, so the file has every step once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            pass
    with atomic_write(path) as file:
        file.write("".join(kept))


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as `cfg` says, writing everything into run_dir; returns the final metrics."""
    state = None
    if cfg.get("resume") is not None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg, state = resumed_config(cfg, overrides)
    tc = cfg.trainer
    device = resolve_device(tc.device, key="trainer.device")
    log.info(f"run dir: {run_dir}  (device {device})")
    started = time.perf_counter()

    torch.manual_seed(tc.seed)  # model initialisation
    random.seed(tc.seed)
    train_data, eval_data = load_data(cfg.data)
    # In memory: batches are drawn by index on the device.
    train_images = train_data.images.to(device)
    model = build_model(cfg.model, cfg.data).to(device)
    train_labels = train_data.labels.to(device) if model.num_classes else None
    schedule = NoiseSchedule.from_config(cfg.schedule).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    ema = EMA(model, tc.ema_decay) if tc.ema_decay > 0 else None
    sampling_model = ema.model if ema else model  # what evaluation, grids and quality look at
    # The training stream: batch indices, timesteps, noise, label dropout. Evaluation and grids
    # use their own fixed-seed generators, so they never shift it.
    generator = torch.Generator(device).manual_seed(tc.seed)
    start_step = 0
    if state is not None:
        start_step = restore(state, model, ema, optimizer, generator)
        keep_metrics_until(run_dir / "metrics.jsonl", start_step)
        log.info(f"resuming {cfg.resume} from step {start_step}")
    evaluator = Evaluator(eval_data.head(tc.num_eval_images), schedule, tc.batch_size, tc.seed)
    log.info(f"model {cfg.model.kind}: {sum(p.numel() for p in model.parameters()):,} parameters; "
             f"{len(train_images):,} training images of shape {tuple(train_images.shape[1:])}")

    metrics_file = open(run_dir / "metrics.jsonl", "a")
    result, nonfinite_steps = {}, 0
    running_loss, logged_step, interval_start = torch.zeros((), device=device), start_step, time.perf_counter()
    progress = tqdm(total=tc.max_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True)
    with logging_redirect_tqdm(), metrics_file, progress, GracefulStop() as stop:
        for step in range(start_step + 1, tc.max_steps + 1):
            lr = learning_rate(step, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(0, len(train_images), (tc.batch_size,), generator=generator, device=device)
            loss = training_loss(model, schedule, train_images[index], generator,
                                 labels=train_labels[index] if train_labels is not None else None,
                                 cond_drop_prob=tc.cond_drop_prob, loss_weighting=tc.loss_weighting)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))
            if not torch.isfinite(loss + grad_norm):  # one host sync per step
                nonfinite_steps += 1
                check_nonfinite(step, loss, nonfinite_steps, cfg, run_dir)
                log.warning(f"step {step}: non-finite loss or gradient, update skipped "
                            f"({nonfinite_steps} of trainer.max_nonfinite_skips={tc.max_nonfinite_skips})")
            else:
                optimizer.step()
                if ema:
                    ema.update(model, step)
                running_loss += loss.detach()
            progress.update()

            record = {}
            if due(step, tc.log_every, tc.max_steps):
                steps_done, elapsed = step - logged_step, time.perf_counter() - interval_start
                record.update(loss=running_loss.item() / steps_done, lr=lr,
                              images_per_s=steps_done * tc.batch_size / elapsed)
                running_loss.zero_()
                logged_step, interval_start = step, time.perf_counter()
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            work_started = time.perf_counter()
            if due(step, tc.eval_every, tc.max_steps):
                record["eval_loss"], record["eval_loss_by_t"] = evaluator.loss(sampling_model)
            if due(step, tc.sample_every, tc.max_steps):
                write_grids(sampling_model, schedule, cfg, step, run_dir, eval_data)
            if tc.num_quality_images and due(step, tc.quality_every, tc.max_steps):
                record.update(quality(sampling_model, schedule, cfg))
            if record:
                metrics_file.write(json.dumps({"step": step, **record}) + "\n")
                metrics_file.flush()
                result.update((key, value) for key, value in record.items()
                              if isinstance(value, float) and key != "lr")
            if "eval_loss" in record:
                plots.training_curves(run_dir)
            if due(step, tc.checkpoint_every, tc.max_steps) or stop.requested:
                save_checkpoint(model, ema, optimizer, generator, cfg, step, run_dir)
            if stop.requested:
                raise Stopped(f"{stop.requested} at step {step}; saved "
                              f"{run_dir / 'checkpoints' / 'last.pt'}. Resume with: "
                              f"diffusion-train resume={run_dir}",
                              exit_code=130 if stop.requested == "SIGINT" else 143)
            interval_start += time.perf_counter() - work_started  # images/s counts training only

    plots.denoising(sampling_model, schedule, cfg, run_dir / "denoising.png")
    result.update(steps=tc.max_steps, wall_s=time.perf_counter() - started)
    last = f"samples/step_{tc.max_steps:07d}.png"
    log.info(f"wrote {run_dir}: checkpoints/last.pt, {last}, metrics.jsonl, loss.png, "
             f"loss_by_t.png, denoising.png (loss {result['loss']:.4f}, eval_loss "
             f"{result['eval_loss']:.4f}, {result['wall_s']:.0f} s)")
    quality_line = ", ".join(f"{key} {result[key]:.4f}" for key in QUALITY_KEYS if key in result)
    if quality_line:
        log.info(f"quality ({tc.num_quality_images} images, DDIM {QUALITY_SAMPLER.steps} steps): {quality_line}")
    return result


def check_nonfinite(step: int, loss: torch.Tensor, count: int, cfg: DictConfig, run_dir: Path) -> None:
    """Stop the run on a non-finite loss or gradient once more than max_nonfinite_skips were seen.
    Nothing is saved: checkpoints/last.pt keeps the last good state."""
    if count <= cfg.trainer.max_nonfinite_skips:
        return
    last = run_dir / "checkpoints" / "last.pt"
    kept = f"{last} (step {checkpoint.read(last)['step']}) is the last good state" if last.exists() \
        else "no checkpoint was written yet"
    raise UserError(f"non-finite loss or gradient at step {step} (loss {loss.item()}): the learning "
                    f"rate may be too high (trainer.lr={cfg.trainer.lr}) or the numbers overflowed "
                    f"(fp16); {kept}. Lower trainer.lr and resume, or allow "
                    f"trainer.max_nonfinite_skips=N skipped steps")


def restore(state: dict, model, ema: EMA | None, optimizer, generator) -> int:
    """Load a checkpoint's model, EMA, optimizer and random streams; returns its step."""
    model.load_state_dict(state["model"])
    if ema:
        ema.model.load_state_dict(state.get("ema", state["model"]))
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["rng"]["train"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def write_grids(model, schedule, cfg, step: int, run_dir: Path, eval_data: Split) -> None:
    """The sample grid (fixed seed, so grids are comparable across steps; one row per class for a
    class-conditional model) and the reconstruction grid."""
    labels, nrow = None, 0
    if model.num_classes:
        per_class = -(-cfg.trainer.num_grid_images // model.num_classes)
        labels, nrow = class_rows(model.num_classes, per_class), per_class
    count = len(labels) if labels is not None else cfg.trainer.num_grid_images
    samples = sample_images(model, schedule, cfg.sampler, (count, *image_shape(cfg.data)),
                            batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed, labels=labels)
    save_grid(samples, run_dir / "samples" / f"step_{step:07d}.png", nrow)
    shown = eval_data.head(8)
    save_grid(to_unit(reconstructions(model, schedule, shown, cfg.trainer.seed)),
              run_dir / "reconstructions" / f"step_{step:07d}.png", nrow=len(shown.images))


# The fast sampler of the quality metrics during training.
QUALITY_SAMPLER = OmegaConf.create({"kind": "ddim", "steps": 50, "eta": 0.0, "clip_x0": True})


def quality(model, schedule: NoiseSchedule, cfg: DictConfig) -> dict:
    """The data's quality metrics on trainer.num_quality_images samples drawn with QUALITY_SAMPLER
    from a fixed seed (balanced labels for a class-conditional model, no guidance)."""
    count = cfg.trainer.num_quality_images
    labels = torch.arange(count) % model.num_classes if model.num_classes else None
    sampler = OmegaConf.merge(QUALITY_SAMPLER, {"steps": min(QUALITY_SAMPLER.steps, schedule.T)})
    images = sample_images(model, schedule, sampler, (count, *image_shape(cfg.data)),
                           batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed, labels=labels)
    return sample_quality(images, cfg.data, labels)


def save_checkpoint(model, ema: EMA | None, optimizer, generator, cfg, step: int, run_dir: Path) -> None:
    """checkpoints/step_N.pt, keeping the last `keep_checkpoints`, and last.pt."""
    state = {
        "format_version": checkpoint.FORMAT_VERSION,
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "config": to_plain(cfg),
        "rng": {"torch": torch.get_rng_state(), "train": generator.get_state(),
                "python": random.getstate()},
    }
    if ema:
        state["ema"] = ema.model.state_dict()
    if torch.cuda.is_available():
        state["rng"]["cuda"] = torch.cuda.get_rng_state_all()
    directory = run_dir / "checkpoints"
    for stale in directory.glob(".*.tmp"):  # left by a process killed while writing
        stale.unlink()
    keep = cfg.trainer.keep_checkpoints
    if keep > 0 and cfg.trainer.checkpoint_every > 0 and step % cfg.trainer.checkpoint_every == 0:
        checkpoint.save(state, directory / f"step_{step:07d}.pt")
        for old in sorted(directory.glob("step_*.pt"))[:-keep]:
            old.unlink()
    checkpoint.save(state, directory / "last.pt")


@hydra.main(version_base="1.3", config_path="pkg://diffusion_cli.conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run_task(train, cfg)


cli = console_script(main)

if __name__ == "__main__":
    cli()
