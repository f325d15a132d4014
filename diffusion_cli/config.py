"""Typed schemas of the config groups, and the range checks run right after composing.

The YAML files in conf/ hold the values and their documentation; the dataclasses here hold the
types, so that Hydra rejects `schedule.T=abc` while composing. Each group file extends its schema
with `- /schema/<group>/<option>@_here_` in its defaults list.
"""

from dataclasses import dataclass, field
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from . import checkpoint
from .data import DATASETS, class_names
from .data.captions import FORMATS as CAPTION_FORMATS
from .errors import UserError
from .metrics import quality_keys
from .models import MODELS, TEXT_MODELS, image_shape, pretrained, size_factor
from .models.text_encoder import ENCODERS, build_text_encoder
from .runtime import PRECISIONS, resolve_device
from .samplers import SAMPLERS
from .schema import rules_of, schema_of
from .spaces import latent_diffusion, run_space
from .schedule import PREDICTIONS, SCHEDULE_KINDS, SCHEDULES
from .tracking import check_available


@dataclass
class DataConfig:
    kind: str = MISSING
    root: Optional[str] = MISSING
    download: bool = MISSING
    channels: int = MISSING
    height: int = MISSING
    width: int = MISSING
    num_train: int = MISSING
    num_eval: int = MISSING
    hflip: bool = MISSING
    in_memory: Any = MISSING                # true | false | auto
    num_workers: int = MISSING
    path: Optional[str] = None              # data=folder's own keys
    image_size: Optional[int] = None
    labels: str = "none"
    classes: Optional[List[str]] = None     # filled in by training from the data: the class names
    captions: str = "none"                  # captions (data/captions.py); documented in the data YAMLs
    caption_column: str = "text"
    missing_captions: str = "empty"
    caption_templates: List[str] = field(default_factory=lambda: [
        "{name}", "a {name}", "a picture of a {name}", "a photo of a {name}"])
    held_out_template: str = "an image of a {name}"


@dataclass
class ModelConfig:
    kind: str = MISSING
    prediction: str = MISSING
    num_classes: int = MISSING


@dataclass
class MLPConfig(ModelConfig):
    width: int = MISSING
    depth: int = MISSING


@dataclass
class UNetConfig(ModelConfig):
    base_channels: int = MISSING
    time_dim: int = MISSING


@dataclass
class ResUNetConfig(ModelConfig):
    base_channels: int = MISSING
    channel_mults: List[int] = MISSING
    num_res_blocks: int = MISSING
    attention: bool = MISSING
    dropout: float = MISSING
    attention_resolutions: List[int] = field(default_factory=list)
    cross_attention_resolutions: Optional[List[int]] = None


@dataclass
class DiTConfig(ModelConfig):
    patch_size: int = MISSING
    width: int = MISSING
    depth: int = MISSING
    heads: int = MISSING
    position: str = MISSING


@dataclass
class TextEncoderConfig:
    kind: str = MISSING
    width: int = MISSING
    depth: int = MISSING
    heads: int = MISSING
    max_length: int = MISSING


@dataclass
class ClipTextEncoderConfig:
    kind: str = MISSING
    path: str = MISSING
    max_length: int = MISSING


@dataclass
class AutoencoderConfig:
    kind: str = MISSING
    base_channels: int = MISSING
    channel_mults: List[int] = MISSING
    num_res_blocks: int = MISSING
    z_channels: int = MISSING
    loss: str = MISSING
    kl_weight: float = MISSING
    shift: bool = MISSING
    perceptual_weight: float = 0.0
    scale_images: int = MISSING
    ckpt: Optional[str] = MISSING
    cache_latents: bool = MISSING


@dataclass
class DiffusersAutoencoderConfig:
    kind: str = MISSING
    path: Optional[str] = MISSING
    subfolder: Optional[str] = MISSING
    ckpt: Optional[str] = MISSING
    cache_latents: bool = MISSING


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
class WandbConfig:
    project: str = MISSING
    entity: Optional[str] = MISSING
    group: Optional[str] = MISSING
    tags: List[str] = MISSING
    name: Optional[str] = MISSING
    mode: Optional[str] = MISSING


@dataclass
class MLflowConfig:
    tracking_uri: Optional[str] = MISSING
    experiment: str = MISSING
    run_name: Optional[str] = MISSING


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


def group_options(group: str) -> str:
    """The options of a config group, as --help lists them: ddpm|ddim|..."""
    from importlib.resources import files

    folder = files("diffusion_cli.conf").joinpath(group)
    return "|".join(sorted(path.name[:-5] for path in folder.iterdir() if path.name.endswith(".yaml"))
                    if folder.is_dir() else [])


def option_keys(group: str, option: str) -> set[str]:
    """The keys a group option's YAML sets, those of the options it extends included."""
    from importlib.resources import files

    path = files("diffusion_cli.conf").joinpath(group, f"{option}.yaml")
    if not path.is_file():
        return set()
    node = OmegaConf.create(path.read_text())
    keys = set(node) - {"defaults"}
    for parent in node.get("defaults", []):
        if isinstance(parent, str) and not parent.startswith(("/", "_self_")):
            keys |= option_keys(group, parent)
    return keys


# Keys that moved: old name -> new name (checkpoint.migrated moves them in saved configs).
MOVED = {"data.caption_dropout": "trainer.cond_drop_prob"}


def other_kinds_key(message: str) -> str | None:
    """For Hydra's error on a key that the chosen option of its group lacks, the one line naming
    the options that have it (None where no option has it)."""
    import re

    match = re.search(r"Could not override '(\w+)\.(\w+)'", message)
    if not match or "not in" not in message:
        return None
    group, key = match.groups()
    if f"{group}.{key}" in MOVED:
        return (f"{group}.{key} is now {MOVED[group + '.' + key]} (one key for class labels and captions): "
                f"use {MOVED[group + '.' + key]}=...")
    have = [option for option in group_options(group).split("|") if key in option_keys(group, option)] \
        if group_options(group) else []
    if not have:
        return None
    return (f"{group}.{key} is a key of {group}={'|'.join(have)}; add {group}={have[0]} (each {group} "
            f"option has its own keys: --cfg job shows this run's)")


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
        check_num_classes(cfg.model, cfg.data)
        check_captions(cfg)
        check_autoencoder(cfg)
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


def check_num_classes(model_cfg: DictConfig, data_cfg: DictConfig) -> None:
    """A class-conditional model needs as many classes as the data's labels have."""
    if not model_cfg.num_classes:
        return
    available = len(data_cfg.classes) if data_cfg.get("classes") else len(class_names(data_cfg))
    if model_cfg.num_classes != available:
        fix = (f"use model.num_classes={available} (class-conditional) or 0" if available
               else "use model.num_classes=0, or labelled data (data=mnist, data.labels=subfolders)")
        raise UserError(f"model.num_classes={model_cfg.num_classes} but data={data_cfg.kind} has "
                        f"{available or 'no'} classes: {fix}")


def check_captions(cfg: DictConfig) -> None:
    """A model is conditioned on class labels or on captions, not both, and captions need a model
    with cross-attention; the data must have the captions asked for."""
    kind = cfg.data.get("captions", "none")
    if kind == "none":
        return
    if kind == "labels" and not class_names(cfg.data):
        raise UserError(f"data.captions=labels makes captions from class names, but data="
                        f"{cfg.data.kind} has no labels: use data.labels=subfolders, a labelled "
                        f"set (data=mnist), or a caption format (auto, jsonl, csv, sidecar)")
    if kind != "labels" and DATASETS[cfg.data.kind].captions is None:
        raise UserError(f"data.captions={kind} reads a folder's caption files: use data=folder, or "
                        f"data.captions=labels for captions made from data={cfg.data.kind}'s class names")
    if cfg.model.num_classes:
        raise UserError(f"data.captions={cfg.data.captions} conditions the model on captions, and "
                        f"model.num_classes={cfg.model.num_classes} on class labels: choose one "
                        f"(model.num_classes=0, or data.captions=none)")
    if cfg.model.kind not in TEXT_MODELS:
        raise UserError(f"data.captions={cfg.data.captions} needs a model that attends to text: use "
                        f"model=resunet (or resunet32, resunet64) or model=dit, not model={cfg.model.kind}")
    try:  # built now (CLIP's weights loaded once), so that a bad one stops the run here
        build_text_encoder(OmegaConf.to_container(cfg.text_encoder, resolve=True))
    except ValueError as error:
        raise UserError(str(error)) from None


def check_autoencoder(cfg: DictConfig) -> None:
    """task=autoencoder: the perceptual term's weights, loaded up front. Latent diffusion
    (autoencoder.ckpt= or autoencoder=diffusers): the autoencoder must be one, for images of the
    data's channels, and both it and the denoiser must divide the image size. A resumed run uses
    the autoencoder its checkpoint embeds: nothing to check."""
    kind = OmegaConf.select(cfg, "autoencoder.kind")
    if kind == "diffusers" and cfg.get("task") == "autoencoder":
        raise UserError("autoencoder=diffusers is pretrained, not trained here: train a denoiser on its latents "
                        "(task=diffusion, the default), or an autoencoder of your own (autoencoder=kl_f4)")
    if cfg.get("task") == "autoencoder" and cfg.autoencoder.get("perceptual_weight", 0) > 0:
        pretrained.lpips_vgg()  # loaded now (once), so that missing weights stop the run here
    if kind == "diffusers" and cfg.autoencoder.path is None:
        raise UserError("autoencoder=diffusers needs autoencoder.path: a hub name (stabilityai/sd-vae-ft-mse) "
                        "or a local folder with a diffusers AutoencoderKL")
    if not latent_diffusion(cfg) or cfg.get("resume") is not None:
        return
    latents = run_space(cfg)
    key = "autoencoder.path" if kind == "diffusers" else "autoencoder.ckpt"
    channels, height, width = image_shape(cfg.data)
    if channels != latents.image_shape[0]:
        raise UserError(f"{key}={latents.source} encodes {latents.image_shape[0]}-channel "
                        f"images, data={cfg.data.kind} has {channels}: train an autoencoder on this data "
                        f"(diffusion-train task=autoencoder data=...)")
    f, m = latents.model.factor, size_factor(cfg.model)
    if height % (f * m) or width % (f * m):
        raise UserError(f"latent diffusion: the autoencoder (f={f}) and model={cfg.model.kind} (which divides "
                        f"its input by {m}) need image sizes divisible by {f * m}, got {height}x{width}: use "
                        f"such a size (data.image_size={-(-height // (f * m)) * f * m}), or a model for "
                        f"{height // f}x{width // f} latents (fewer model.channel_mults, or model.patch_size=1)")


def check_sampler_steps(sampler_cfg: DictConfig, T: int) -> None:
    if sampler_cfg.steps is not None and sampler_cfg.steps > T:
        raise UserError(f"sampler.steps={sampler_cfg.steps} is more than the model's schedule.T={T}: "
                        f"use at most {T}, or null for all of them")
