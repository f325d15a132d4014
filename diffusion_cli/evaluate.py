"""What training measures and draws at its intervals, on rank 0: the held-out loss, sample and
reconstruction grids, and sample-quality metrics."""

import torch
from omegaconf import DictConfig

from . import runtime
from .data import Split
from .images import save_grid, to_unit
from .metrics import quality_metric, sample_quality
from .runtime import autocast, eval_mode
from .generation import sample_images
from .samplers import evaluations
from .objectives import objective
from .schedule import NoiseSchedule

# The eval loss is also reported per bucket of timesteps: where the model is weak.
LOSS_BUCKETS = 10
# Fractions of T at which the reconstruction grids show x_t and the model's x0 estimate.
RECONSTRUCTION_TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)
# trainer.num_quality_images=auto: at most QUALITY_IMAGES images, and no more than cost
# QUALITY_BUDGET of the run's training in model evaluations (a trained image counts 3: forward
# and backward), so that a short run's end is short too.
QUALITY_IMAGES = 256
QUALITY_BUDGET = 0.1


class Evaluator:
    """The held-out loss (unweighted MSE in the model's prediction) at fixed timesteps and noise,
    so numbers are comparable across steps; conditional models see the images' own conditions
    (as the run's `condition` reads them); the grids and quality metrics draw what it says.
    data.images are in the run's `space` (latents, for latent diffusion), and the grids decode them."""

    def __init__(self, data: Split, schedule: NoiseSchedule, batch_size: int, seed: int, condition, space):
        generator = torch.Generator().manual_seed(seed)
        self.images, self.labels, self.condition, self.space = data.images, data.labels, condition, space
        # Timesteps spread evenly over 0..T-1, one per image; noise fixed once.
        self.t = torch.linspace(0, schedule.T - 1, len(self.images)).round().long()
        self.noise = torch.randn(self.images.shape, generator=generator)
        self.schedule = schedule
        self.batch_size = batch_size
        self.fidelity = None  # fidelity.Fidelity: FID/KID of the quality images, where the task sets one

    @torch.inference_mode()
    def loss(self, model) -> tuple[float, list[float]]:
        """(mean loss, mean loss in each of LOSS_BUCKETS equal ranges of t)."""
        device = self.schedule.betas.device
        errors, target_of = [], objective(model.prediction).target
        with eval_mode(model):
            for start in range(0, len(self.images), self.batch_size):
                x0, t, noise = (v[start:start + self.batch_size].to(device)
                                for v in (self.images, self.t, self.noise))
                labels = None
                if self.condition.labelled:
                    labels = self.labels[start:start + self.batch_size].to(device)
                output = model(self.schedule.q_sample(x0, t, noise), t, labels)
                target = target_of(self.schedule, x0, t, noise)
                errors.append((output - target).pow(2).flatten(1).mean(1).cpu())
        errors = torch.cat(errors)
        bucket = self.t * LOSS_BUCKETS // self.schedule.T
        by_t = [errors[bucket == b].mean().item() if (bucket == b).any() else float("nan")
                for b in range(LOSS_BUCKETS)]
        return errors.mean().item(), by_t


@torch.inference_mode()
def reconstructions(model, schedule: NoiseSchedule, data: Split, seed: int, labelled: bool, clamp: bool = True
                    ) -> torch.Tensor:
    """Rows: the clean images, then for each t in RECONSTRUCTION_TIMES x_t and the model's x0
    estimate (clipped to [-1, 1] with `clamp`: in a space that clips). Returns the rows stacked."""
    device = schedule.betas.device
    x0 = data.images.to(device)
    labels = data.labels.to(device) if labelled else None
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(device)
    rows = [x0]
    with eval_mode(model):
        for fraction in RECONSTRUCTION_TIMES:
            t = torch.full((len(x0),), round(fraction * (schedule.T - 1)), device=device)
            x_t = schedule.q_sample(x0, t, noise)
            _, x0_estimate = objective(model.prediction).eps_and_x0(schedule, x_t, t, model(x_t, t, labels))
            rows += [x_t.clamp(-1, 1), x0_estimate.clamp(-1, 1)] if clamp else [x_t, x0_estimate]
    return torch.cat(rows)


def write_grids(model, schedule, cfg, step: int, run_dir, eval_data: Split, evaluator: Evaluator) -> dict:
    """The sample grid (fixed seed, so grids are comparable across steps; one row per class or
    prompt for a conditional model) and the reconstruction grid; returns their paths by name."""
    space, drawn = evaluator.space, evaluator.condition.rows(cfg.trainer.num_grid_images)
    labels, nrow, titles = drawn.conditions, drawn.nrow, drawn.titles
    count = len(labels) if labels is not None else cfg.trainer.num_grid_images
    samples = sample_images(model, schedule, cfg.sampler, (count, *space.shape), batch_size=cfg.trainer.batch_size,
                            seed=cfg.trainer.seed, labels=labels, space=space)
    shown = eval_data.head(8)
    rows = reconstructions(model, schedule, shown, cfg.trainer.seed, evaluator.condition.labelled, clamp=space.clip)
    return {"samples": save_grid(samples, run_dir / "samples" / f"step_{step:07d}.png", nrow,
                                 row_titles=titles),
            "reconstructions": save_grid(to_unit(space.decode(rows)),
                                         run_dir / "reconstructions" / f"step_{step:07d}.png",
                                         nrow=len(shown.images))}


def quality(model, schedule: NoiseSchedule, cfg: DictConfig, evaluator: Evaluator) -> dict:
    """The data's quality metrics (and FID/KID with the evaluator's fidelity; CLIP score for prompts)
    on quality_count samples drawn with the run's sampler from a fixed seed (the classes or prompts
    in turn for a conditional model, no guidance)."""
    count = quality_count(cfg, schedule.T)
    conditions, classes, *_, prompts = evaluator.condition.each(count)
    images = sample_images(model, schedule, cfg.sampler, (count, *evaluator.space.shape),
                           batch_size=cfg.trainer.batch_size, seed=cfg.trainer.seed, labels=conditions,
                           space=evaluator.space)
    result = {**sample_quality(images, cfg.data, classes), **evaluator.condition.alignment(images, prompts)}
    return {**result, **evaluator.fidelity(images)} if evaluator.fidelity else result


def quality_count(cfg: DictConfig, T: int) -> int:
    """How many images the quality metrics draw: trainer.num_quality_images, or with auto as many as
    QUALITY_BUDGET of the training's model evaluations pays for, at most QUALITY_IMAGES."""
    tc = cfg.trainer
    if tc.num_quality_images != "auto":
        return tc.num_quality_images
    trained = 3 * tc.max_steps * tc.batch_size * tc.grad_accum * runtime.world_size()
    return min(QUALITY_IMAGES, int(QUALITY_BUDGET * trained / evaluations(cfg.sampler, T)))


def measured(cfg: DictConfig, evaluator: Evaluator) -> bool:
    """Whether the run measures sample quality: an in-project metric, FID/KID or CLIP score."""
    return bool(quality_count(cfg, evaluator.schedule.T)) and bool(
        quality_metric(cfg.data) or evaluator.fidelity or evaluator.condition.aligns())


def due(step: int, every: int, last_step: int) -> bool:
    """Whether periodic work (every N steps; 0 = only at the end) is due at `step`."""
    return step == last_step or (every > 0 and step % every == 0)


def evaluation_due(tc: DictConfig, step: int) -> bool:
    """Whether evaluation, grids or quality metrics are due at `step`."""
    return any(due(step, every, tc.max_steps) for every in (tc.eval_every, tc.sample_every, tc.quality_every))


def evaluate(record: dict, step: int, model, schedule: NoiseSchedule, evaluator: Evaluator,
             cfg: DictConfig, run_dir, eval_data: Split) -> dict:
    """What is due at `step`: the eval loss and quality metrics go into `record`, the grids into
    run_dir (returns their paths by name: none when no grid was due)."""
    tc = cfg.trainer
    grids = {}
    with autocast(schedule.betas.device, tc.precision):
        if due(step, tc.eval_every, tc.max_steps):
            record["eval_loss"], record["eval_loss_by_t"] = evaluator.loss(model)
        if due(step, tc.sample_every, tc.max_steps):
            grids = write_grids(model, schedule, cfg, step, run_dir, eval_data, evaluator)
        if measured(cfg, evaluator) and due(step, tc.quality_every, tc.max_steps):
            record.update(quality(model, schedule, cfg, evaluator))
    return grids
