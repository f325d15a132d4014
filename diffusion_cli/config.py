"""The config groups' schemas, registered with Hydra, and the checks run right after composing.

The YAML files in conf/ hold the values and their documentation; the dataclasses beside the code
each group configures (schedule.py, samplers/, models/, data/, ...) hold the types, so that Hydra
rejects `schedule.T=abc` while composing, and, in their fields' metadata, the ranges that RULES
checks. Each group file extends its schema with `- /schema/<group>/<option>@_here_` in its
defaults list. The checks across keys live with the part they concern (conditions, spaces, tasks).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from . import checkpoint, conditions, spaces, tasks
from .autoencoder import AutoencoderConfig, DiffusersAutoencoderConfig
from .data import DataConfig
from .errors import UserError
from .ema import MAX_SIGMA_REL
from .fidelity import EXTRACTORS, training_extractor
from .guidance import GUIDANCE
from .metrics import FIDELITY_KEYS, quality_keys
from .models import MODEL_SCHEMAS
from .objectives import ObjectiveConfig
from .models.text_encoder import ClipTextEncoderConfig, TextEncoderConfig
from .runtime import PRECISIONS, resolve_device
from .samplers import SAMPLERS
from .schema import (check, group_options, non_negative, one_of, plain, positive, resumable_keys, rules_of,
                     schema_of)
from .schedule import SCHEDULES
from .sweep import RESULT_FILE
from .tracking import MLflowConfig, WandbConfig, check_available


@dataclass
class TrainerConfig:
    """The trainer group; `resumable` keys may change when a run is resumed (how long it runs,
    where, and what it logs and keeps), the others would make it another run."""
    seed: int = plain()
    device: str = plain(resumable=True)
    batch_size: int = positive()
    lr: float = check(lambda v: v > 0, "a number > 0", MISSING)
    lr_warmup_steps: int = non_negative()
    lr_schedule: str = one_of(("cosine", "constant"))
    weight_decay: float = non_negative("a number >= 0")
    ema_decay: float = check(lambda v: 0 <= v < 1, "a number from 0 (no EMA) to below 1, e.g. 0.999", MISSING)
    ema_sigma_rel: Optional[float] = check(lambda v: v is None or 0 < v < MAX_SIGMA_REL,
                                           f"null or a number from 0 to {MAX_SIGMA_REL:.3f}, e.g. 0.1", MISSING)
    ema_profiles: list[float] = check(lambda v: all(0 < s < MAX_SIGMA_REL for s in v),
                                      f"a list of numbers from 0 to {MAX_SIGMA_REL:.3f}, e.g. [0.05,0.1,0.2]", MISSING)
    guide_at: float = check(lambda v: 0 <= v < 1, "a fraction from 0 (no guide) to below 1, e.g. 0.25", MISSING)
    cond_drop_prob: float = check(lambda v: 0 <= v <= 1, "a probability from 0 to 1", MISSING)
    max_steps: int = positive(resumable=True)
    log_every: int = positive(resumable=True)
    eval_every: int = non_negative("an integer >= 0 (0: only at the end)", resumable=True)
    sample_every: int = non_negative("an integer >= 0 (0: only at the end)", resumable=True)
    checkpoint_every: int = non_negative("an integer >= 0 (0: only at the end)", resumable=True)
    keep_checkpoints: int = non_negative(resumable=True)
    num_eval_images: int = positive()
    num_grid_images: int = positive(resumable=True)
    quality_every: int = non_negative("an integer >= 0 (0: only at the end)", resumable=True)
    num_quality_images: Any = check(lambda v: v == "auto" or (type(v) is int and v >= 0),
                                    "auto or an integer >= 0 (0: no quality metrics)", MISSING, resumable=True)
    quality_extractor: str = one_of(("auto", "none", *EXTRACTORS), resumable=True)
    quality_weights: Optional[str] = plain(resumable=True)
    max_nonfinite_skips: int = non_negative(resumable=True)
    grad_clip: float = non_negative("a number >= 0 (0: no clipping)")
    grad_accum: int = positive()
    precision: str = one_of(PRECISIONS, resumable=True)
    compile: bool = plain(resumable=True)


@dataclass
class EvalConfig:
    """diffusion-eval's keys (conf/eval.yaml documents them)."""
    samples: str = MISSING
    reference: str = MISSING
    extractor: str = one_of(EXTRACTORS)
    weights: Optional[str] = None
    max_samples: Optional[int] = check(lambda v: v is None or v >= 2, "null (all) or an integer >= 2", None)
    max_reference: Optional[int] = check(lambda v: v is None or v >= 2, "null (all) or an integer >= 2", None)
    batch_size: int = positive()
    kid_subsets: int = positive()
    kid_subset_size: int = check(lambda v: v >= 2, "an integer >= 2", MISSING)
    prc_neighborhood: int = positive()
    seed: int = MISSING
    device: str = MISSING
    overwrite: bool = MISSING


@dataclass
class MovedWeights:
    path: Optional[str] = None   # where a checkpoint's pretrained weights are on this machine


@dataclass
class SampleConfig:
    """diffusion-sample's own keys; the model, schedule and data come from the checkpoint."""
    ckpt: str = MISSING
    num_samples: int = positive()
    batch_size: int = positive()
    seed: int = MISSING
    device: str = MISSING
    nrow: int = non_negative("an integer >= 0 (0: a square grid)")
    label: Optional[str] = MISSING
    prompt: Any = MISSING                   # a string, a list of strings, or null
    prompts_file: Optional[str] = MISSING
    negative_prompt: Optional[str] = MISSING
    guidance_scale: float = non_negative("a number >= 0 (1: plain conditional, 0: unconditional)")
    guidance: str = one_of(GUIDANCE)
    guide: Optional[str] = MISSING
    use_ema: bool = MISSING
    ema: Optional[float] = MISSING
    eval: bool = MISSING
    save_images: bool = MISSING
    precision: str = one_of(PRECISIONS)
    compile: bool = MISSING
    overwrite: bool = check(lambda v: isinstance(v, bool), "true or false", MISSING)
    sampler: Any = MISSING
    text_encoder: MovedWeights = field(default_factory=MovedWeights)
    autoencoder: MovedWeights = field(default_factory=MovedWeights)


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(group="schema/data", name="data", node=DataConfig)
    for kind, model in MODEL_SCHEMAS.items():
        store.store(group="schema/model", name=kind, node=model)
    store.store(group="schema/text_encoder", name="tiny", node=TextEncoderConfig)
    store.store(group="schema/text_encoder", name="clip", node=ClipTextEncoderConfig)
    store.store(group="schema/autoencoder", name="kl", node=AutoencoderConfig)
    store.store(group="schema/autoencoder", name="diffusers", node=DiffusersAutoencoderConfig)
    for kind, schedule in SCHEDULES.items():
        store.store(group="schema/schedule", name=kind, node=schema_of(schedule))
    store.store(group="schema/trainer", name="trainer", node=TrainerConfig)
    store.store(group="schema/objective", name="objective", node=ObjectiveConfig)
    for kind, sampler in SAMPLERS.items():
        store.store(group="schema/sampler", name=kind, node=schema_of(sampler))
    store.store(group="schema/logger", name="wandb", node=WandbConfig)
    store.store(group="schema/logger", name="mlflow", node=MLflowConfig)
    store.store(group="schema", name="sample", node=SampleConfig)
    store.store(group="schema", name="eval", node=EvalConfig)


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


# Range checks: (full key, test, what is allowed), from the schemas' field metadata, and for the
# top-level keys that have no schema. Keys absent from a config are skipped.
RULES = [
    *rules_of("data", [DataConfig]),
    *rules_of("model", MODEL_SCHEMAS.values()),
    *rules_of("schedule", SCHEDULES.values()),
    *rules_of("sampler", SAMPLERS.values()),
    *rules_of("trainer", [TrainerConfig]),
    *rules_of("objective", [ObjectiveConfig]),
    *rules_of("text_encoder", [TextEncoderConfig, ClipTextEncoderConfig]),
    *rules_of("autoencoder", [AutoencoderConfig, DiffusersAutoencoderConfig]),
    *rules_of("logger.wandb", [WandbConfig]),
    *rules_of("", [SampleConfig, EvalConfig]),  # the commands' own top-level keys
    ("sampler.kind", lambda v: v in SAMPLERS, f"one of: {', '.join(SAMPLERS)}"),
    ("schedule.kind", lambda v: v in SCHEDULES, f"one of: {', '.join(SCHEDULES)}"),
    ("task", lambda v: v in tasks.TASKS, f"one of: {', '.join(tasks.TASKS)}"),
    ("overwrite", lambda v: isinstance(v, bool), "true or false"),
    ("sweep.direction", lambda v: v in ("minimize", "maximize"), "one of: minimize, maximize"),
]
# Keys that may change when a run is resumed: the trainer's resumable ones, and whole groups.
MOVABLE = ("text_encoder.path", "autoencoder.path")  # a run moved to another machine: its weights' folders
NAMED_TO_MOVE = tuple(key.partition(".")[0] for key in MOVABLE)  # their groups, named on resume to give them
RESUMABLE = (*resumable_keys("trainer", TrainerConfig), "sampler", "logger", "sweep", *MOVABLE)


def resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, dict]:
    """The checkpoint's own config with the command line's resumable overrides applied, and the
    checkpoint itself. Any other override is refused: it would not be the same run. The caller
    validates the result."""
    state = checkpoint.read(cfg.resume, key="resume")
    moved = {key: OmegaConf.select(cfg, key) for key in MOVABLE
             if any(override.partition("=")[0].lstrip("+~") == key for override in overrides)}
    state = spaces.relocated(state, moved.get("text_encoder.path"), moved.get("autoencoder.path"))
    saved = OmegaConf.create(state["config"])
    for group in ("trainer", "data"):  # keys newer than the checkpoint: the defaults
        for key, value in cfg[group].items():
            saved[group].setdefault(key, value)
    for key in ("task", "autoencoder", "text_encoder"):  # groups newer than it (pixel space, no text)
        saved.setdefault(key, cfg[key])
    for override in overrides:
        key = override.partition("=")[0].lstrip("+~")
        if key == "resume" or key.startswith("hydra."):
            continue
        if key in NAMED_TO_MOVE and override.partition("=")[2] == saved[key].get("kind"):
            continue  # the run's own option, named to give its path (a run moved to another machine)
        if not any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE):
            raise UserError(f"{key} cannot change when resuming (the run has {key}="
                            f"{OmegaConf.select(saved, key)}): drop that override, or start a new run")
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    saved.resume = cfg.resume
    if state["step"] >= saved.trainer.max_steps and finished(checkpoint.run_dir_of(cfg.resume)):
        raise UserError(f"resume={cfg.resume} is at step {state['step']}, trainer.max_steps is "
                        f"{saved.trainer.max_steps}: raise trainer.max_steps to train further")
    return saved, state


def finished(run_dir: Path) -> bool:
    """Whether a run did all its end-of-run work: its result.json says ok (a run stopped or killed
    after its last step resumes to finish it)."""
    result = run_dir / RESULT_FILE
    return result.is_file() and json.loads(result.read_text()).get("status") == "ok"


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
    if training_extractor(cfg.trainer, cfg.data):
        available += FIDELITY_KEYS
    if not cfg.model.num_classes and "label_accuracy" in available:
        available.remove("label_accuracy")
    if cfg.sweep.objective not in available:
        raise UserError(f"sweep.objective={cfg.sweep.objective} is not a final metric of this run: use "
                        f"one of {', '.join(available)}")


def check_sampler_steps(sampler_cfg: DictConfig, T: int) -> None:
    if sampler_cfg.steps is not None and sampler_cfg.steps > T:
        raise UserError(f"sampler.steps={sampler_cfg.steps} is more than the model's schedule.T={T}: "
                        f"use at most {T}, or null for all of them")
