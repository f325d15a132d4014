"""What a training run learns, as two tasks that share one loop (train.py): the denoiser of
diffusion (in the run's space, on its condition) and the KL autoencoder of latent diffusion
(task=autoencoder). A task builds its model, gives the loss of a batch, does its periodic
evaluation, adds its entries to the checkpoint and says what the run wrote."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from . import fidelity, plots, runtime
from .autoencoder import (ReconstructionEvaluator, autoencoder_loss, build_autoencoder, first_images,
                          latent_statistics, psnr_line)
from .conditions import condition_of, text_config
from .data import Split
from .errors import UserError
from .evaluate import Evaluator, due, evaluate, measured, quality_count
from .metrics import QUALITY_KEYS
from .models import build_model, pretrained
from .objectives import objective
from .runtime import autocast, use_channels_last
from .samplers import describe
from .schedule import NoiseSchedule
from .spaces import Space, Training

log = logging.getLogger(__name__)


class DenoiserTask:
    """task=diffusion: a denoiser of the `model` config in the run's space; batches enter the space
    (`training.encode`), captions are drawn into tokens, and a conditional model sees the null
    condition with the dropout probability that guidance needs."""

    def __init__(self, cfg: DictConfig, device: torch.device, space: Space, training: Training):
        self.cfg, self.device, self.space, self.encode = cfg, device, space, training.encode
        self.objective = objective(cfg.objective.prediction, cfg.objective.weighting)
        self.model = use_channels_last(build_model(cfg.model, space.shape, text_config(cfg),
                                                   self.objective.prediction).to(device))
        # Captioned data: batches carry caption groups, which the condition draws into tokens.
        self.condition = condition_of(self.model, cfg.data, training.split.captions, device,
                                      cfg.trainer.cond_drop_prob)
        self.schedule = NoiseSchedule.from_config(cfg.schedule).to(device)
        self.labelled = self.condition.labelled
        self.name = f"model {cfg.model.kind}"

    def loss(self, network, batch, generator: torch.Generator) -> torch.Tensor:
        images, labels = batch
        images, condition = self.encode(images), self.condition.batch(labels, generator)
        with autocast(self.device, self.cfg.trainer.precision):
            return self.objective.loss(network, self.schedule, images, generator, condition,
                                       self.condition.drop_prob, self.condition.null)

    def start_evaluation(self, eval_data: Split, train_data: Split) -> None:
        """The held-out images in the space, with their conditions as the model reads them."""
        tc = self.cfg.trainer
        self.eval_data = eval_data = self.condition.held_out(eval_data)
        self.evaluator = Evaluator(eval_data.head(tc.num_eval_images), self.schedule, tc.batch_size, tc.seed,
                                   self.condition, self.space)
        count = quality_count(self.cfg, self.schedule.T)
        name = fidelity.training_extractor(tc, self.cfg.data) if count else None
        if name and runtime.is_main():
            self.evaluator.fidelity = fidelity.Fidelity(name, tc.quality_weights, train_data.images,
                                                        count, tc.seed, self.device)
            log.info(f"quality: FID, KID and precision/recall of {count} samples by "
                     f"{self.evaluator.fidelity.label} (small N: FID is biased upward, compare runs at one N)")
        elif count and tc.quality_extractor == "auto" and not measured(self.cfg, self.evaluator):
            log.info(fidelity.without_fidelity(self.cfg.data))

    def prepare_checkpoint(self, model) -> None:
        """Nothing to measure: a denoiser's checkpoint is its training state."""

    def restore(self, state: dict) -> None:
        """Nothing of its own to restore."""

    def evaluate(self, record: dict, step: int, model, run_dir: Path) -> dict:
        return evaluate(record, step, model, self.schedule, self.evaluator, self.cfg, run_dir, self.eval_data)

    def state(self) -> dict:
        """The space's entry of a denoiser's checkpoint: a latent one embeds its autoencoder."""
        space = self.space.state()
        return {} if space is None else {"autoencoder": space}

    def finish(self, model, result: dict, run_dir: Path) -> None:
        tc = self.cfg.trainer
        plots.denoising(model, self.schedule, self.cfg, run_dir / "denoising.png", self.condition, self.space)
        log.info(f"wrote {run_dir}: checkpoints/last.pt, samples/step_{tc.max_steps:07d}.png, metrics.jsonl, "
                 f"loss.png, loss_by_t.png, denoising.png (loss {result['loss']:.4f}, eval_loss "
                 f"{result['eval_loss']:.4f}, {result['wall_s']:.0f} s)")
        quality_line = ", ".join(f"{key} {result[key]:.4f}" for key in QUALITY_KEYS if key in result)
        if quality_line:
            count, sampler = quality_count(self.cfg, self.schedule.T), describe(self.cfg.sampler, self.schedule.T)
            against = f"; FID/KID: {self.evaluator.fidelity.label}" if self.evaluator.fidelity else ""
            log.info(f"quality ({count} images, {sampler}{against}): {quality_line}")


class AutoencoderTask:
    """task=autoencoder: the KL autoencoder of the `autoencoder` config, with its reconstruction,
    KL and (optional) LPIPS loss; at each checkpoint the latent scale that latent diffusion uses."""

    def __init__(self, cfg: DictConfig, device: torch.device, space: Space, training: Training):
        self.cfg, self.device = cfg, device
        self.model = use_channels_last(build_autoencoder(cfg.autoencoder, cfg.data).to(device))
        self.perceptual_weight = cfg.autoencoder.get("perceptual_weight", 0)
        self.lpips = pretrained.lpips_vgg().to(device) if self.perceptual_weight > 0 else None
        self.latent = None  # measured at each checkpoint
        self.labelled = False
        self.name = f"autoencoder {cfg.autoencoder.kind}"

    def loss(self, network, batch, generator: torch.Generator) -> torch.Tensor:
        ae = self.cfg.autoencoder
        with autocast(self.device, self.cfg.trainer.precision):
            return autoencoder_loss(network, batch[0], generator, ae.loss, ae.kl_weight, self.lpips,
                                    self.perceptual_weight)

    def start_evaluation(self, eval_data: Split, train_data: Split) -> None:
        self.evaluator = ReconstructionEvaluator(eval_data.head(self.cfg.trainer.num_eval_images), self.cfg)
        self.scale_images = first_images(train_data, self.cfg.autoencoder.scale_images) if runtime.is_main() else None

    def restore(self, state: dict) -> None:
        """The latent scale measured at the checkpoint's step (its evaluation may be redone)."""
        self.latent = state.get("latent")

    def prepare_checkpoint(self, model) -> None:
        """The latent scale, which the checkpoint stores."""
        tc = self.cfg.trainer
        with autocast(self.device, tc.precision):
            self.latent = latent_statistics(model, self.scale_images, self.cfg.autoencoder.shift, tc.batch_size)

    def evaluate(self, record: dict, step: int, model, run_dir: Path) -> dict:
        """The held-out loss and PSNR, and the reconstruction grid (originals over reconstructions)."""
        tc = self.cfg.trainer
        with autocast(self.device, tc.precision):
            if due(step, tc.eval_every, tc.max_steps):
                record.update(self.evaluator.measure(model, self.latent))
            if due(step, tc.sample_every, tc.max_steps):
                grid = run_dir / "reconstructions" / f"step_{step:07d}.png"
                return {"reconstructions": self.evaluator.grid(model, grid)}
        return {}

    def state(self) -> dict:
        """What latent diffusion scales its latents by."""
        return {} if self.latent is None else {"latent": self.latent}

    def finish(self, model, result: dict, run_dir: Path) -> None:
        log.info(f"wrote {run_dir}: checkpoints/last.pt, reconstructions/step_{self.cfg.trainer.max_steps:07d}.png, "
                 f"metrics.jsonl, loss.png, psnr.png ({psnr_line(result)}, latent scale {result['latent_scale']:.4f}, "
                 f"{result['wall_s']:.0f} s). Latent diffusion: diffusion-train autoencoder.ckpt={run_dir} ...")


TASKS = {"diffusion": DenoiserTask, "autoencoder": AutoencoderTask}


def check_config(cfg) -> None:
    """Before a task=autoencoder run: the autoencoder must be one this project trains, and the
    perceptual term's weights are loaded now (once per process), so that missing ones stop the run
    before anything is written."""
    if cfg.get("task") != "autoencoder":
        return
    if cfg.autoencoder.kind == "diffusers":
        raise UserError("autoencoder=diffusers is pretrained, not trained here: train a denoiser on its latents "
                        "(task=diffusion, the default), or an autoencoder of your own (autoencoder=kl_f4)")
    if cfg.autoencoder.get("perceptual_weight", 0) > 0:
        pretrained.lpips_vgg()
