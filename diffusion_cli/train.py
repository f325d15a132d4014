"""diffusion-train: one readable training loop around TrainStep, one optimizer step. What it
learns is a task (tasks.py: the denoiser's objective, or the autoencoder's loss); evaluation and
grids are in evaluate.py, the checkpoint format and the resume policy in checkpoint.py; every
collective of a torchrun launch is visible here. Sampling uses an EMA of the weights.
"""

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from tqdm.contrib.logging import logging_redirect_tqdm

from . import checkpoint, plots, runtime, spaces
from .cli import console_script, run_task
from .config import resumed_config, validate
from .data import RowFile, Split, class_names, load_data
from .data.batches import training_batches
from .ema import Averages
from .evaluate import due, evaluation_due
from .lr_schedule import learning_rate, rewarm_after_resume
from .models import image_shape
from .progress import tqdm
from .runtime import compiled, convolutional, resolve_device, use_fast_math
from .spaces import Space, Training
from .stopping import GracefulStop, check_nonfinite, cut_short, stopped
from .tasks import TASKS
from .tracking import Trackers

log = logging.getLogger(__name__)


class TrainStep:
    """One optimizer step of the run's task (tasks.py) on a batch (data/batches.py: by index from
    the training set on the device, or streamed), without a single host sync: a step with a
    non-finite loss or gradient is skipped on the device (fused AdamW's found_inf; GradScaler's
    under fp16) and counted in `stats`, which the loop reads only at log and checkpoint steps.
    train()'s loop and diffusion-bench both call it."""

    def __init__(self, cfg: DictConfig, device: torch.device, data: Split | Training, space: Space | None = None):
        """`data`: the training split, or as the `space` (default: the data's pixels) prepared it."""
        space = space or spaces.PixelSpace(image_shape(cfg.data))
        training = data if isinstance(data, Training) else space.training(data, cfg)
        tc = self.tc = cfg.trainer
        self.cfg = cfg
        torch.manual_seed(tc.seed)  # model initialisation: the same on every rank
        self.device = device
        self.task = TASKS[cfg.get("task", "diffusion")](cfg, device, space, training)
        self.model = self.task.model
        self.batches = training_batches(training.split, cfg.data, device, tc.batch_size, labelled=self.task.labelled,
                                        channels_last=convolutional(self.model), seed=tc.seed,
                                        encoded=training.encoded)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=tc.lr,
                                           weight_decay=tc.weight_decay, fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
        self.averages = Averages(self.model, tc)  # the sampling EMA, more EMAs, autoguidance's guide
        self.ema = self.averages.ema
        self.lr, self.lr_rewarm = 0.0, None
        # The training stream: batch indices, timesteps, noise, label dropout; seed + rank under
        # torchrun. Evaluation and grids use fixed-seed generators of their own.
        self.generator = torch.Generator(device).manual_seed(tc.seed + runtime.rank())
        # The model's own randomness (dropout) comes from torch's global generators: seeded per
        # rank too, from the rank's seed, so ranks draw different dropout masks.
        torch.manual_seed(torch.randint(2 ** 62, (), generator=torch.Generator().manual_seed(
            tc.seed + runtime.rank())).item())
        network, self.ddp = self.model, None
        if runtime.world_size() > 1:  # gradients all-reduced in backward
            network = self.ddp = DistributedDataParallel(self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.network = compiled(network, tc.compile, self.warm_up, "trainer.compile")
        # Sum of the losses of applied steps, applied steps, skipped steps, fp16 overflow
        # skips, first skipped step.
        self.stats = torch.zeros(5, device=device)

    def warm_up(self, network) -> None:
        """torch.compile's first call, as the training step makes it (batch shape, grad mode,
        autocast, backward: a DDP model owes one), on a batch of its own stream."""
        self.task.loss(network, self.batches.first(), torch.Generator(self.device).manual_seed(0)).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, step: int) -> None:
        self.lr = learning_rate(step, self.tc, self.lr_rewarm)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.optimizer.zero_grad(set_to_none=True)
        accum, loss = self.tc.grad_accum, 0.0
        for micro in range(accum):  # the mean loss of accum x batch_size images, a micro-batch at a time
            with self.ddp.no_sync() if self.ddp and micro < accum - 1 else nullcontext():  # all-reduce once
                part = self.task.loss(self.network, self.batches.next(self.generator), self.generator)
                part = part / accum if accum > 1 else part
                self.scaler.scale(part).backward()
            loss = loss + part.detach()
        self.scaler.unscale_(self.optimizer)  # fp16: true gradients for the norm (else a no-op)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.tc.grad_clip or float("inf"))
        applied = torch.isfinite(loss.detach() + grad_norm)  # else the step is skipped
        if self.scaler.is_enabled():  # GradScaler skips the same steps
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.found_inf = (~applied).float()  # fused AdamW leaves the weights as they were
            self.optimizer.step()
        self.averages.update(self.model, step, weight=applied.float())
        # What stops a run: a non-finite loss, or non-finite gradients outside fp16. Under fp16
        # GradScaler's overflow skips are routine (it lowers its scale and goes on): counted apart.
        bad = ~torch.isfinite(loss.detach()) if self.scaler.is_enabled() else ~applied
        loss_sum, applied_steps, skipped, overflows, first = self.stats.unbind()
        loss_sum.add_(torch.where(applied, loss.detach().float(), 0.0))
        applied_steps.add_(applied.float())
        overflows.add_((~applied & ~bad).float())
        first.copy_(torch.where(bad & (skipped == 0), float(step), first))
        skipped.add_(bad.float())

    def random_states(self) -> dict:
        """This rank's random states: its training stream and torch's global generators."""
        states = {"train": self.generator.get_state(), "torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            states["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.device.type == "mps":  # the Apple GPU's own generator (dropout there)
            states["mps"] = torch.mps.get_rng_state()
        return states

    def read_stats(self, reset_loss: bool, stop_requested: bool = False) -> "Stats":
        """The loss and skip counts since the start (the loss since the last reset), over all
        ranks. A host sync (and under torchrun two small collectives): the loop calls it at log
        and checkpoint steps only. Counts and the stop vote are maxed over ranks, so every rank
        takes the same decision."""
        sums = runtime.all_reduce(self.stats[:2].clone(), "sum")
        vote = torch.tensor([float(stop_requested)], device=self.device)
        counts = runtime.all_reduce(torch.cat([self.stats[2:], vote]), "max")
        (loss_sum, applied), (skipped, overflows, first, stops) = sums.tolist(), counts.tolist()
        if reset_loss:
            self.stats[:2].zero_()
        return Stats(loss_sum / applied if applied else float("nan"), round(skipped), round(first),
                     round(overflows), stops > 0)


class Stats(NamedTuple):
    loss: float           # mean loss of the applied steps since the last reset
    skipped: int          # steps skipped for a non-finite loss (or gradients, outside fp16)
    first_skipped: int    # the first of them (0: none)
    overflows: int        # fp16: steps GradScaler skipped for overflowing gradients
    stop: bool            # whether any rank was asked to stop


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train as `cfg` says, writing everything into run_dir; returns the final metrics. Under
    torchrun every rank trains; rank 0 alone evaluates and writes."""
    state = None
    if cfg.get("resume") is not None:
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        cfg, state = resumed_config(cfg, overrides)
        validate(cfg)
    tc = cfg.trainer
    main_rank = runtime.is_main()
    device = resolve_device(tc.device, key="trainer.device")
    log.info(f"run dir: {run_dir}  (device {device}"
             + (f", {runtime.world_size()} processes" if runtime.world_size() > 1 else "") + ")")
    started = time.perf_counter()

    use_fast_math(device)
    with runtime.main_process_first():  # rank 0 downloads, the others then read its files
        train_data, eval_data = load_data(cfg.data)
    cfg.data.classes = class_names(cfg.data) or None  # in the checkpoint: diffusion-sample label=NAME
    space = spaces.run_space(cfg, state, device)
    eval_data = eval_data._replace(images=space.held_out(eval_data.images, tc.batch_size))
    if space.label:
        log.info(space.describe(eval_data.images))
    training = space.training(train_data, cfg)
    trainer = TrainStep(cfg, device, training, space)
    task, model, ema = trainer.task, trainer.model, trainer.ema
    sampling_model = ema.model if ema else model  # what evaluation, grids and quality look at
    start_step = 0
    if state is not None:
        start_step = checkpoint.restore(state, trainer)
        trainer.batches.start(start_step * tc.grad_accum)  # the stream's batch after the step's last
        trainer.lr_rewarm = rewarm_after_resume(state, tc)
        origin = checkpoint.run_dir_of(cfg.resume)
        if main_rank:  # the metrics up to the checkpoint, once each
            checkpoint.continue_metrics(origin / "metrics.jsonl", run_dir / "metrics.jsonl", start_step)
        log.info(f"resuming {cfg.resume} from step {start_step}" + (
            "" if checkpoint.continues_in_place(cfg.resume, run_dir) else
            f" in a new run dir: {origin} is left as it is"))
    task.start_evaluation(eval_data, training.split)
    log.info(f"{task.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
             f"{len(trainer.batches):,} training images of shape {image_shape(cfg.data)}"
             + (", streamed" if isinstance(training.split.images, RowFile) else "")
             + (f", learned as {space.label}" if space.label else ""))

    metrics_file = open(run_dir / "metrics.jsonl", "a") if main_rank else nullcontext()
    trackers = Trackers(cfg, run_dir, start_step) if main_rank else nullcontext()
    result, skipped_logged = {}, 0
    earlier = checkpoint.metric_records(run_dir / "metrics.jsonl") if state is not None else []
    for record in earlier:
        final_values(record, result)  # a resumed run's final metrics start from its earlier ones
    logged_step, interval_start = start_step, time.perf_counter()
    progress = tqdm(total=tc.max_steps, initial=start_step, desc="training", unit="step",
                    dynamic_ncols=True, disable=not main_rank)
    with logging_redirect_tqdm(), metrics_file, trackers, progress, GracefulStop() as stop:
        # The checkpoint's step without its metrics line: a signal cut its evaluation short.
        if state is not None and main_rank and all(record["step"] != start_step for record in earlier):
            evaluate_step(task, dict(state.get("record", {})), start_step, sampling_model, run_dir, stop,
                          metrics_file, result, trackers)
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
                stats = trainer.read_stats(reset_loss=log_due, stop_requested=bool(stop.requested))
                loss, skipped, stopping = stats.loss, stats.skipped, stopping or stats.stop
                if skipped > skipped_logged:
                    check_nonfinite(stats.first_skipped, skipped, cfg, run_dir)
                    log.warning(f"step {step}: {skipped - skipped_logged} more non-finite loss or "
                                f"gradient, update skipped ({skipped} of "
                                f"trainer.max_nonfinite_skips={tc.max_nonfinite_skips})")
                    skipped_logged = skipped
            if log_due:
                steps_done, elapsed = step - logged_step, time.perf_counter() - interval_start
                record.update(loss=loss, lr=trainer.lr,
                              images_per_s=steps_done * tc.batch_size * tc.grad_accum * runtime.world_size() / elapsed)
                if trainer.scaler.is_enabled():
                    record["fp16_overflow_skips"] = stats.overflows
                logged_step, interval_start = step, time.perf_counter()
                progress.set_postfix(loss=f"{loss:.4f}")
            work_started = time.perf_counter()
            if checkpoint_due or stopping:  # saved before the step's evaluation, which a signal may cut
                if main_rank:
                    task.prepare_checkpoint(sampling_model)
                # Every rank's random states, gathered (a collective); rank 0 writes.
                rng = {"device_type": device.type, "ranks": runtime.gather(trainer.random_states())}
                if main_rank:
                    checkpoint.save_training(trainer, cfg, step, run_dir, rng, record)
            if stopping:
                if main_rank and not evaluation_due(tc, step):  # else the resumed run evaluates the step
                    log_record(record, step, metrics_file, result, run_dir)
                raise stopped(stop.requested or "a stop signal to another rank", f"at step {step}", run_dir)
            if main_rank:
                evaluate_step(task, record, step, sampling_model, run_dir, stop, metrics_file, result, trackers)
            interval_start += time.perf_counter() - work_started  # images/s counts training only

        result.update(steps=tc.max_steps, wall_s=time.perf_counter() - started)
        if main_rank:
            with cut_short(stop, "at the end of the run", run_dir):
                trackers.finish(result)
                task.finish(sampling_model, result, run_dir)
    return result


def evaluate_step(task, record: dict, step: int, model, run_dir: Path, stop: GracefulStop, metrics_file,
                  result: dict, trackers: Trackers) -> None:
    """What is due at `step` after its checkpoint (rank 0): the task's evaluation and grids, then
    the step's metrics line, once the evaluation is complete (a signal cuts it short: the resumed
    run evaluates the step again, from its checkpoint and the line's training part stored there)."""
    with cut_short(stop, f"while evaluating step {step}", run_dir):
        grids = task.evaluate(record, step, model, run_dir)
    log_record(record, step, metrics_file, result, run_dir)
    trackers.log(step, record, grids)


def log_record(record: dict, step: int, metrics_file, result: dict, run_dir: Path) -> None:
    """A line of metrics.jsonl; the final metrics in `result`; the loss plots after an eval."""
    if record:
        metrics_file.write(json.dumps({"step": step, **record}) + "\n")
        metrics_file.flush()
        final_values(record, result)
    if "eval_loss" in record:
        plots.training_curves(run_dir)


def final_values(record: dict, result: dict) -> None:
    """The run's final metrics in `result`, updated with a metrics line's."""
    result.update((key, value) for key, value in record.items() if isinstance(value, float) and key != "lr")


@hydra.main(version_base="1.3", config_path="pkg://diffusion_cli.conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_task(train, cfg)  # the sweep objective's value, for Optuna


cli = console_script(main)

if __name__ == "__main__":
    cli()
