"""The config groups' schemas, registered with Hydra, and the checks run right after composing.

The YAML files in conf/ hold the values and their documentation; the dataclasses beside the code
each group configures (schedule.py, samplers/, models/, data/, ...) hold the types, so that Hydra
rejects `schedule.T=abc` while composing, and, in their fields' metadata, the ranges that RULES
checks. Each group file extends its schema with `- /schema/<group>/<option>@_here_` in its
defaults list. The checks across keys live with the part they concern (conditions, spaces, tasks).
"""

from dataclasses import dataclass
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from . import checkpoint, conditions, spaces, tasks
from .autoencoder import AutoencoderConfig, DiffusersAutoencoderConfig
from .data import DATASETS, DataConfig
from .data.captions import FORMATS as CAPTION_FORMATS
from .errors import UserError
from .metrics import quality_keys
from .models import MODELS, DiTConfig, MLPConfig, ResUNetConfig, UNetConfig
from .models.text_encoder import ENCODERS, ClipTextEncoderConfig, TextEncoderConfig
from .runtime import PRECISIONS, resolve_device
from .samplers import SAMPLERS
from .schema import group_options, rules_of, schema_of
from .schedule import PREDICTIONS, SCHEDULE_KINDS, SCHEDULES
from .tracking import MLflowConfig, WandbConfig, check_available


@dataclass
class TrainerConfig:
    seed: int = MISSING
    device: str = MISSING
    batch_size: int = MISSING
    lr: float = MISSING
    lr_warmup_steps: int = MISSING
    lr_schedule: str = MISSING
    weight_decay: float = MISSING
    loss_weighting: str = MISSING
    ema_decay: float = MISSING
    cond_drop_prob: float = MISSING
    max_steps: int = MISSING
    log_every: int = MISSING
    eval_every: int = MISSING
    sample_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    num_eval_images: int = MISSING
    num_grid_images: int = MISSING
    quality_every: int = MISSING
    num_quality_images: int = MISSING
    max_nonfinite_skips: int = MISSING
    grad_clip: float = MISSING
    precision: str = MISSING
    compile: bool = MISSING


@dataclass
class SampleConfig:
    """diffusion-sample's own keys; the model, schedule and data come from the checkpoint."""
    ckpt: str = MISSING
    num_samples: int = MISSING
    batch_size: int = MISSING
    seed: int = MISSING
    device: str = MISSING
    nrow: int = MISSING
    label: Optional[str] = MISSING
    prompt: Any = MISSING                   # a string, a list of strings, or null
    prompts_file: Optional[str] = MISSING
    negative_prompt: Optional[str] = MISSING
    guidance_scale: float = MISSING
    use_ema: bool = MISSING
    eval: bool = MISSING
    save_images: bool = MISSING
    precision: str = MISSING
    compile: bool = MISSING
    overwrite: bool = MISSING
    sampler: Any = MISSING


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(group="schema/data", name="data", node=DataConfig)
    store.store(group="schema/model", name="mlp", node=MLPConfig)
    store.store(group="schema/model", name="unet", node=UNetConfig)
    store.store(group="schema/model", name="resunet", node=ResUNetConfig)
    store.store(group="schema/model", name="dit", node=DiTConfig)
    store.store(group="schema/text_encoder", name="tiny", node=TextEncoderConfig)
    store.store(group="schema/text_encoder", name="clip", node=ClipTextEncoderConfig)
    store.store(group="schema/autoencoder", name="kl", node=AutoencoderConfig)
    store.store(group="schema/autoencoder", name="diffusers", node=DiffusersAutoencoderConfig)
    for kind, schedule in SCHEDULES.items():
        store.store(group="schema/schedule", name=kind, node=schema_of(schedule))
    store.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    for kind, sampler in SAMPLERS.items():
        store.store(group="schema/sampler", name=kind, node=schema_of(sampler))
    store.store(group="schema/logger", name="wandb", node=WandbConfig)
    store.store(group="schema/logger", name="mlflow", node=MLflowConfig)
    store.store(group="schema", name="sample", node=SampleConfig)


register_schemas()


def resume_run_dir(resume: str | None, default: str) -> str:
    """hydra.run.dir: a new dir, or for `resume=` of a run's latest state that run's dir (an older
    checkpoint branches into a new dir: see checkpoint.is_latest)."""
    if resume is None or not checkpoint.is_latest(resume):
        return default
    return str(checkpoint.run_dir_of(resume))


def resume_output_subdir(resume: str | None, run_dir: str) -> str | None:
    """hydra.output_subdir: a run resumed in its own dir keeps the .hydra/ it has."""
    if resume is not None and checkpoint.continues_in_place(resume, run_dir):
        return None
    return ".hydra"


OmegaConf.register_new_resolver("group_options", group_options, replace=True)
OmegaConf.register_new_resolver("resume_run_dir", resume_run_dir, replace=True)
OmegaConf.register_new_resolver("resume_output_subdir", resume_output_subdir, replace=True)


LR_SCHEDULES = ("cosine", "constant")
LOSS_WEIGHTINGS = ("none", "min_snr")


# Range checks: (full key, test, what is allowed). Keys absent from a config are skipped.
def _positive(v): return v >= 1
def _non_negative(v): return v >= 0


def _one_of(choices):
    return lambda v: v in choices, f"one of: {', '.join(choices)}"


RULES = [
    ("data.kind", *_one_of(tuple(DATASETS))),
    ("model.kind", *_one_of(tuple(MODELS))),
    ("schedule.kind", *_one_of(SCHEDULE_KINDS)),
    ("sampler.kind", *_one_of(SAMPLERS)),
    ("data.num_train", _positive, "an integer >= 1"),
    ("data.num_eval", _positive, "an integer >= 1"),
    ("data.channels", _positive, "an integer >= 1"),
    ("data.height", _positive, "an integer >= 1"),
    ("data.width", _positive, "an integer >= 1"),
    ("data.image_size", lambda v: v is None or v >= 1, "an integer >= 1, e.g. 32 or 64"),
    ("data.labels", *_one_of(("none", "subfolders"))),
    ("data.captions", *_one_of(("none", "auto", *CAPTION_FORMATS, "labels"))),
    ("data.missing_captions", *_one_of(("empty", "skip"))),
    ("task", *_one_of(("diffusion", "autoencoder"))),
    ("autoencoder.kind", *_one_of(("kl", "diffusers"))),
    ("autoencoder.base_channels", _positive, "an integer >= 1"),
    ("autoencoder.channel_mults", lambda v: len(v) >= 1 and min(v) >= 1, "a list of integers >= 1, e.g. [1,2,2]"),
    ("autoencoder.num_res_blocks", _positive, "an integer >= 1"),
    ("autoencoder.z_channels", _positive, "an integer >= 1"),
    ("autoencoder.loss", *_one_of(("l1", "l2"))),
    ("autoencoder.kl_weight", _non_negative, "a number >= 0, e.g. 1e-6"),
    ("autoencoder.scale_images", _positive, "an integer >= 1"),
    ("autoencoder.perceptual_weight", _non_negative, "a number >= 0 (0: no LPIPS term; Rombach et al.: 1)"),
    ("text_encoder.kind", *_one_of(tuple(ENCODERS))),
    ("text_encoder.width", _positive, "an integer >= 1"),
    ("text_encoder.depth", _non_negative, "an integer >= 0"),
    ("text_encoder.heads", _positive, "an integer >= 1 that divides text_encoder.width"),
    ("text_encoder.max_length", lambda v: v >= 2, "an integer >= 2 (tokens, the start token included)"),
    ("data.in_memory", lambda v: v in (True, False, "auto"), "true, false or auto"),
    ("data.num_workers", _non_negative, "an integer >= 0 (0: read in the training process)"),
    ("model.width", _positive, "an integer >= 1"),
    ("model.depth", _non_negative, "an integer >= 0"),
    ("model.base_channels", _positive, "an integer >= 1"),
    ("model.time_dim", lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2"),
    ("model.prediction", *_one_of(PREDICTIONS)),
    ("model.num_classes", _non_negative, "an integer >= 0 (0: unconditional)"),
    ("model.channel_mults", lambda v: len(v) >= 1 and min(v) >= 1, "a list of integers >= 1, e.g. [1,2,2]"),
    ("model.num_res_blocks", _positive, "an integer >= 1"),
    ("model.dropout", lambda v: 0 <= v < 1, "a number from 0 to below 1"),
    ("model.patch_size", _positive, "an integer >= 1 that divides the image height and width"),
    ("model.heads", _positive, "an integer >= 1 that divides model.width"),
    ("model.position", *_one_of(("learned", "sinusoidal"))),
    ("trainer.batch_size", _positive, "an integer >= 1"),
    ("trainer.lr", lambda v: v > 0, "a number > 0"),
    ("trainer.lr_warmup_steps", _non_negative, "an integer >= 0"),
    ("trainer.lr_schedule", *_one_of(LR_SCHEDULES)),
    ("trainer.weight_decay", _non_negative, "a number >= 0"),
    ("trainer.loss_weighting", *_one_of(LOSS_WEIGHTINGS)),
    ("trainer.ema_decay", lambda v: 0 <= v < 1, "a number from 0 (no EMA) to below 1, e.g. 0.999"),
    ("trainer.cond_drop_prob", lambda v: 0 <= v <= 1, "a probability from 0 to 1"),
    ("trainer.max_steps", _positive, "an integer >= 1"),
    ("trainer.log_every", _positive, "an integer >= 1"),
    ("trainer.eval_every", _non_negative, "an integer >= 0 (0: only at the end)"),
    ("trainer.sample_every", _non_negative, "an integer >= 0 (0: only at the end)"),
    ("trainer.checkpoint_every", _non_negative, "an integer >= 0 (0: only at the end)"),
    ("trainer.keep_checkpoints", _non_negative, "an integer >= 0"),
    ("trainer.num_eval_images", _positive, "an integer >= 1"),
    ("trainer.num_grid_images", _positive, "an integer >= 1"),
    ("trainer.quality_every", _non_negative, "an integer >= 0 (0: only at the end)"),
    ("trainer.num_quality_images", _non_negative, "an integer >= 0 (0: no quality metrics)"),
    ("trainer.max_nonfinite_skips", _non_negative, "an integer >= 0"),
    ("trainer.grad_clip", _non_negative, "a number >= 0 (0: no clipping)"),
    ("overwrite", lambda v: isinstance(v, bool), "true or false"),
    ("trainer.precision", *_one_of(tuple(PRECISIONS))),
    ("precision", *_one_of(tuple(PRECISIONS))),
    ("sweep.direction", *_one_of(("minimize", "maximize"))),
    ("logger.wandb.mode", lambda v: v in (None, "online", "offline", "disabled"), "online, offline, disabled or null"),
    *rules_of("sampler", SAMPLERS.values()),
    *rules_of("schedule", SCHEDULES.values()),
    ("num_samples", _positive, "an integer >= 1"),
    ("batch_size", _positive, "an integer >= 1"),
    ("nrow", _non_negative, "an integer >= 0 (0: a square grid)"),
    ("guidance_scale", _non_negative, "a number >= 0 (1: plain conditional, 0: unconditional)"),
]


def validate(cfg: DictConfig) -> None:
    """Raise UserError naming the first key whose value is out of range."""
    if "ckpt" in cfg.keys():  # diffusion-sample (`in cfg` is False for a missing value)
        if OmegaConf.is_missing(cfg, "ckpt"):
            raise UserError("ckpt is required: diffusion-sample ckpt=RUN_DIR (or a .pt checkpoint file)")
        checkpoint.resolve(cfg.ckpt)
    if cfg.get("resume") is not None:  # diffusion-train resume=
        path = checkpoint.resolve(cfg.resume, key="resume")
        if path.parent.name != "checkpoints":
            raise UserError(f"resume={cfg.resume} is not inside a run dir: give a diffusion-train "
                            f"run dir or a checkpoint in its checkpoints/ folder")
    for key, test, allowed in RULES:
        value = OmegaConf.select(cfg, key, default=MISSING)
        if value is not MISSING and not test(value):
            raise UserError(f"{key}={value} is not allowed: use {allowed}")
    schedule = cfg.get("schedule")
    if schedule is not None:
        check_schedule(schedule)
        if "sampler" in cfg:
            check_sampler_steps(cfg.sampler, schedule.T)
    if "model" in cfg:
        conditions.check_config(cfg)
        tasks.check_config(cfg)
        spaces.check_config(cfg)
    check_available(cfg.get("logger"))
    if "sweep" in cfg:
        check_objective(cfg)
    if "trainer" in cfg:
        resolve_device(cfg.trainer.device, key="trainer.device")
    if "device" in cfg:
        resolve_device(cfg.device)


def check_schedule(schedule: DictConfig) -> None:
    if schedule.kind == "edm" and schedule.sigma_min >= schedule.sigma_max:
        raise UserError(f"schedule.sigma_min={schedule.sigma_min} is not below schedule.sigma_max="
                        f"{schedule.sigma_max}: use e.g. sigma_min=0.002 sigma_max=80")
    if schedule.kind == "linear" and schedule.beta_start > schedule.beta_end:
        raise UserError(f"schedule.beta_start={schedule.beta_start} is above schedule.beta_end="
                        f"{schedule.beta_end}: the noise must grow, so use beta_start <= beta_end")


def check_objective(cfg: DictConfig) -> None:
    """sweep.objective must be a final metric this run reports."""
    available = ["loss", "eval_loss"] + list(quality_keys(cfg.data) if cfg.trainer.num_quality_images else [])
    if not cfg.model.num_classes and "label_accuracy" in available:
        available.remove("label_accuracy")
    if cfg.sweep.objective not in available:
        raise UserError(f"sweep.objective={cfg.sweep.objective} is not a final metric of this run: use "
                        f"one of {', '.join(available)}")


def check_sampler_steps(sampler_cfg: DictConfig, T: int) -> None:
    if sampler_cfg.steps is not None and sampler_cfg.steps > T:
        raise UserError(f"sampler.steps={sampler_cfg.steps} is more than the model's schedule.T={T}: "
                        f"use at most {T}, or null for all of them")
