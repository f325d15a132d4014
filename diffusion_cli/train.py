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
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoint, plots, runtime
from .atomic import atomic_write
from .cli import console_script, run_task
from .config import to_plain, validate
from .data import Split, load_data
from .ema import EMA
from .errors import UserError
from .images import save_grid, to_unit
from .metrics import QUALITY_KEYS, sample_quality
from .models import build_model, eval_mode, image_shape
from .runtime import autocast, compiled, convolutional, resolve_device, use_channels_last
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

    @torch.inference_mode()
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


@torch.inference_mode()
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
             "trainer.max_nonfinite_skips", "trainer.precision", "trainer.compile", "sampler")


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


class TrainStep:
    """One optimizer step on a batch drawn by index from the in-memory training set on the device,
    without a single host sync: a step with a non-finite loss or gradient is skipped on the device
    (fused AdamW's found_inf; GradScaler's under fp16) and counted in `stats`, which the loop
    reads only at log and checkpoint steps. train()'s loop and diffusion-bench both call it."""

    def __init__(self, cfg: DictConfig, device: torch.device, train_data: Split):
        tc = self.tc = cfg.trainer
        torch.manual_seed(tc.seed)  # model initialisation: the same on every rank
        self.device = device
        self.model = use_channels_last(build_model(cfg.model, cfg.data).to(device))
        self.images = train_data.images.to(device)
        if convolutional(self.model):
            self.images = self.images.contiguous(memory_format=torch.channels_last)
        self.labels = train_data.labels.to(device) if self.model.num_classes else None
        self.schedule = NoiseSchedule.from_config(cfg.schedule).to(device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr,
                                           weight_decay=tc.weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
        self.ema = EMA(self.model, tc.ema_decay) if tc.ema_decay > 0 else None
        # The training stream: batch indices, timesteps, noise, label dropout; seed + rank under
        # torchrun. Evaluation and grids use fixed-seed generators of their own.
        self.generator = torch.Generator(device).manual_seed(tc.seed + runtime.rank())
        example = (self.images[:2], torch.zeros(2, dtype=torch.long, device=device),
                   None if self.labels is None else self.labels[:2])
        network = self.model
        if runtime.world_size() > 1:  # gradients all-reduced in backward
            network = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
            network.prediction, network.num_classes = self.model.prediction, self.model.num_classes  # what training_loss reads
        self.network = compiled(network, tc.compile, example, "trainer.compile")
        # Sum of the losses of applied steps, applied steps, skipped steps, first skipped step.
        self.stats = torch.zeros(4, device=device)

    def __call__(self, step: int) -> None:
        tc = self.tc
        lr = learning_rate(step, tc)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(self.images), (tc.batch_size,), generator=self.generator, device=self.device)
        with autocast(self.device, tc.precision):
            loss = training_loss(self.network, self.schedule, self.images[index], self.generator,
                                 labels=None if self.labels is None else self.labels[index],
                                 cond_drop_prob=tc.cond_drop_prob, loss_weighting=tc.loss_weighting)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.scaler.is_enabled():  # fp16: the scaler skips steps whose gradients overflowed
            bad = ~torch.isfinite(loss)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float("inf"))
            bad = ~torch.isfinite(loss.detach() + grad_norm)
            self.optimizer.found_inf = bad.float()  # fused AdamW leaves the weights as they were
            self.optimizer.step()
        if self.ema:
            self.ema.update(self.model, step, weight=(~bad).float())
        loss_sum, applied, skipped, first = self.stats.unbind()
        loss_sum.add_(torch.where(bad, 0.0, loss.detach().float()))
        applied.add_((~bad).float())
        first.copy_(torch.where(bad & (skipped == 0), float(step), first))
        skipped.add_(bad.float())

    def read_stats(self, reset_loss: bool, stop_requested: bool = False) -> tuple[float, int, int, bool]:
        """(mean loss of the applied steps since the last reset, over all ranks; skipped steps in
        the whole run; the first skipped step; whether any rank was asked to stop). A host sync
        (and under torchrun a collective): the loop calls it at log and checkpoint steps only.
        The skip counts need no reduction: the gradients are all-reduced, so every rank skips
        the same steps."""
        loss_sum, applied, skipped, first = self.stats.tolist()
        shared = torch.tensor([loss_sum, applied, float(stop_requested)], device=self.device)
        loss_sum, applied, stops = runtime.all_reduce_sum(shared).tolist()
        if reset_loss:
            self.stats[:2].zero_()
        return loss_sum / applied if applied else float("nan"), round(skipped), round(first), stops > 0


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as `cfg` says, writing everything into run_dir; returns the final metrics. Under
    torchrun every rank trains; rank 0 alone evaluates and writes."""
    state = None
    if cfg.get("resume") is not None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg, state = resumed_config(cfg, overrides)
    tc = cfg.trainer
    main_rank = runtime.is_main()
    device = resolve_device(tc.device, key="trainer.device")
    log.info(f"run dir: {run_dir}  (device {device}"
             + (f", {runtime.world_size()} processes" if runtime.world_size() > 1 else "") + ")")
    started = time.perf_counter()

    random.seed(tc.seed)
    train_data, eval_data = load_data(cfg.data)
    trainer = TrainStep(cfg, device, train_data)
    model, ema, schedule = trainer.model, trainer.ema, trainer.schedule
    sampling_model = ema.model if ema else model  # what evaluation, grids and quality look at
    start_step = 0
    if state is not None:
        start_step = restore(state, trainer)
        if main_rank:
            keep_metrics_until(run_dir / "metrics.jsonl", start_step)
        log.info(f"resuming {cfg.resume} from step {start_step}")
    evaluator = Evaluator(eval_data.head(tc.num_eval_images), schedule, tc.batch_size, tc.seed)
    log.info(f"model {cfg.model.kind}: {sum(p.numel() for p in model.parameters()):,} parameters; "
             f"{len(trainer.images):,} training images of shape {tuple(trainer.images.shape[1:])}")

    metrics_file = open(run_dir / "metrics.jsonl", "a") if main_rank else nullcontext()
    result, skipped_logged = {}, 0
    logged_step, interval_start = start_step, time.perf_counter()
    progress = tqdm(total=tc.max_steps, initial=start_step, desc="training", unit="step",
                    dynamic_ncols=True, disable=not main_rank)
    with logging_redirect_tqdm(), metrics_file, progress, GracefulStop() as stop:
        for step in range(start_step + 1, tc.max_steps + 1):
            trainer(step)
            progress.update()

            record = {}
            # A signal stops a single process at once; under torchrun the ranks agree at the next
            # log or checkpoint step (they may see it at different steps).
            stopping = bool(stop.requested) and runtime.world_size() == 1
            log_due = due(step, tc.log_every, tc.max_steps)
            checkpoint_due = due(step, tc.checkpoint_every, tc.max_steps)
            if log_due or checkpoint_due or stopping:
                # The loop's only host sync.
                loss, skipped, first_skipped, stop_votes = trainer.read_stats(
                    reset_loss=log_due, stop_requested=bool(stop.requested))
                stopping = stopping or stop_votes
                if skipped > skipped_logged:
                    check_nonfinite(first_skipped, skipped, cfg, run_dir)
                    log.warning(f"step {step}: {skipped - skipped_logged} more non-finite loss or "
                                f"gradient, update skipped ({skipped} of "
                                f"trainer.max_nonfinite_skips={tc.max_nonfinite_skips})")
                    skipped_logged = skipped
            if log_due:
                steps_done, elapsed = step - logged_step, time.perf_counter() - interval_start
                record.update(loss=loss, lr=learning_rate(step, tc),
                              images_per_s=steps_done * tc.batch_size * runtime.world_size() / elapsed)
                logged_step, interval_start = step, time.perf_counter()
                progress.set_postfix(loss=f"{loss:.4f}")
            work_started = time.perf_counter()
            if main_rank:
                periodic_work(record, step, sampling_model, schedule, evaluator, cfg, run_dir,
                              eval_data, metrics_file, result)
            if checkpoint_due or stopping:
                save_checkpoint(trainer, cfg, step, run_dir)
            if stopping:
                again = (f"torchrun --nproc-per-node {runtime.world_size()} -m diffusion_cli.train"
                         if runtime.world_size() > 1 else "diffusion-train")
                raise Stopped(f"{stop.requested or 'a stop signal to another rank'} at step {step}; "
                              f"saved {run_dir / 'checkpoints' / 'last.pt'}. Resume with: "
                              f"{again} resume={run_dir}",
                              exit_code=130 if stop.requested == "SIGINT" else 143)
            interval_start += time.perf_counter() - work_started  # images/s counts training only

    result.update(steps=tc.max_steps, wall_s=time.perf_counter() - started)
    if not main_rank:
        return result
    plots.denoising(sampling_model, schedule, cfg, run_dir / "denoising.png")
    last = f"samples/step_{tc.max_steps:07d}.png"
    log.info(f"wrote {run_dir}: checkpoints/last.pt, {last}, metrics.jsonl, loss.png, "
             f"loss_by_t.png, denoising.png (loss {result['loss']:.4f}, eval_loss "
             f"{result['eval_loss']:.4f}, {result['wall_s']:.0f} s)")
    quality_line = ", ".join(f"{key} {result[key]:.4f}" for key in QUALITY_KEYS if key in result)
    if quality_line:
        log.info(f"quality ({tc.num_quality_images} images, DDIM {QUALITY_SAMPLER.steps} steps): {quality_line}")
    return result


def periodic_work(record: dict, step: int, sampling_model, schedule, evaluator, cfg, run_dir: Path,
                  eval_data: Split, metrics_file, result: dict) -> None:
    """Rank 0's work at its intervals: the eval loss, grids, quality metrics, metrics.jsonl."""
    tc = cfg.trainer
    with autocast(schedule.betas.device, tc.precision):
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


def restore(state: dict, trainer: TrainStep) -> int:
    """Load a checkpoint's model, EMA, optimizer and random streams into `trainer`; returns its step."""
    streams = state["rng"].get("train_ranks", [state["rng"]["train"]])  # one per rank
    if len(streams) != runtime.world_size():
        raise UserError(f"this run trained on {len(streams)} process(es), not {runtime.world_size()}: "
                        f"resume it with torchrun --nproc-per-node {len(streams)}, so every rank "
                        f"continues its own random stream")
    trainer.model.load_state_dict(state["model"])
    if trainer.ema:
        trainer.ema.model.load_state_dict(state.get("ema", state["model"]))
    trainer.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.generator.set_state(streams[runtime.rank()])
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


def save_checkpoint(trainer: TrainStep, cfg, step: int, run_dir: Path) -> None:
    """checkpoints/step_N.pt, keeping the last `keep_checkpoints`, and last.pt. Every rank calls
    it (the random streams of all ranks are gathered); rank 0 writes."""
    rng = {"torch": torch.get_rng_state(), "train": trainer.generator.get_state(),
           "python": random.getstate()}
    if runtime.world_size() > 1:
        rng["train_ranks"] = runtime.gather(trainer.generator.get_state())
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    if not runtime.is_main():
        return
    state = {
        "format_version": checkpoint.FORMAT_VERSION,
        "step": step,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "config": to_plain(cfg),
        "rng": rng,
    }
    if trainer.ema:
        state["ema"] = trainer.ema.model.state_dict()
    if trainer.scaler.is_enabled():
        state["scaler"] = trainer.scaler.state_dict()
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
