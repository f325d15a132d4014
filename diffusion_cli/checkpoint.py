"""Checkpoints: self-describing dicts that load with `torch.load(path, weights_only=True)`.

A checkpoint holds `format_version`, `step`, `model` (state dict), `ema` (the EMA weights' state
dict, when trainer.ema_decay > 0), `ema_<sigma_rel>` (the power EMAs of trainer.ema_profiles),
`guide` (autoguidance's guide: the sampling weights at trainer.guide_at), `optimizer` (state
dict), `scaler` (fp16 only),
`latent` (task=autoencoder: the latent scale and shift), `autoencoder` (latent diffusion: the
frozen autoencoder, its config and scale: autoencoder.LatentSpace.state()),
`config` (the whole resolved run config as plain containers), `rng` (the device type and every
rank's generator states, as tensors) and `lr_rewarm` (after a resume that moved the learning-rate
curve). `load()` rebuilds model and schedule from that dict alone; `save_training()` and
`restore()` write and read the whole training state (config.resumed_config decides what a resumed
run may change).
"""

import json
import logging
import pickle
from dataclasses import fields
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import runtime
from .atomic import atomic_write
from .conditions import text_config
from .errors import UserError
from .models import build_model
from .runtime import use_channels_last
from .schedule import SCHEDULES, NoiseSchedule

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: random states per rank ("rng": {"device_type", "ranks"}), lr_rewarm


def save(state: dict, path: Path) -> None:
    """Write atomically, so `path` is always either the old or the new complete checkpoint."""
    with atomic_write(path, "wb") as file:
        torch.save(state, file)


def resolve(path: str | Path, key: str = "ckpt") -> Path:
    """A checkpoint file, or a run dir standing for its checkpoints/last.pt."""
    path = Path(path)
    if path.is_dir():
        last = path / "checkpoints" / "last.pt"
        if not last.is_file():
            raise UserError(f"{key}={path} is a directory without checkpoints/last.pt: give a "
                            f"diffusion-train run dir or a .pt checkpoint file")
        return last
    if not path.is_file():
        raise UserError(f"{key}={path} does not exist: give a .pt checkpoint file or a "
                        f"diffusion-train run dir")
    return path


def read(path: str | Path, map_location="cpu", key: str = "ckpt") -> dict:
    """The checkpoint dict, loaded with weights_only=True: a file whose pickle would run code is
    refused, not executed."""
    path = resolve(path, key)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" not in str(error):
            raise UserError(unreadable(path, key, error)) from None
        raise UserError(f"{key}={path} was refused: loading it would run code or build objects "
                        f"that are not weights (torch.load with weights_only=True); only load "
                        f"checkpoints written by diffusion-train") from None
    except Exception as error:  # anything a truncated or foreign file makes the unpickler raise
        raise UserError(unreadable(path, key, error)) from None
    if not isinstance(state, dict) or not {"format_version", "model", "config"} <= state.keys():
        raise UserError(f"{key}={path} is not a diffusion-cli checkpoint (no format_version, "
                        f"model and config entries)")
    if state["format_version"] > FORMAT_VERSION:
        raise UserError(f"{key}={path} has format_version {state['format_version']}, newer than "
                        f"this diffusion-cli reads ({FORMAT_VERSION}): upgrade diffusion-cli")
    state["config"] = migrated(state["config"])
    return state


def migrated(config: dict) -> dict:
    """A saved config in today's form; every change of the config's shape is undone here, once.
    - Before each schedule kind had keys of its own, cosine and edm kept beta_start and beta_end
      (null): dropped.
    - data.caption_dropout was the captions' own dropout: it is trainer.cond_drop_prob now.
    - autoencoder=diffusers kept an unused autoencoder.ckpt (null): dropped.
    - model.prediction and trainer.loss_weighting are the objective's prediction and weighting now
      (a checkpoint older than both predicted eps, unweighted).
    - Before issue 26 training drew timesteps uniformly (schedule.time_density), kept one EMA and no
      autoguidance guide (trainer.ema_sigma_rel, ema_profiles, guide_at)."""
    if "objective" not in config:
        config["objective"] = {"prediction": config.get("model", {}).pop("prediction", "eps"),
                               "weighting": config.get("trainer", {}).pop("loss_weighting", "none")}
    autoencoder = config.get("autoencoder", {})
    if autoencoder.get("kind") == "diffusers":
        autoencoder.pop("ckpt", None)
    data, trainer = config.get("data", {}), config.get("trainer", {})
    if "caption_dropout" in data:
        dropout = data.pop("caption_dropout")
        if data.get("captions", "none") != "none":
            trainer["cond_drop_prob"] = dropout
    schedule = config.get("schedule", {})
    if schedule.get("kind") in ("linear", "cosine"):
        for key, value in (("time_density", "uniform"), ("logit_mean", 0.0), ("logit_std", 1.0)):
            schedule.setdefault(key, value)
    if trainer:
        for key, value in (("ema_sigma_rel", None), ("ema_profiles", []), ("guide_at", 0.0)):
            trainer.setdefault(key, value)
    if schedule.get("kind") in SCHEDULES:
        keep = {"kind"} | {f.name for f in fields(SCHEDULES[schedule["kind"]])}
        config["schedule"] = {key: value for key, value in schedule.items() if key in keep}
    return config


def unreadable(path: Path, key: str, error: Exception) -> str:
    return (f"{key}={path} is not a readable checkpoint (truncated or not a .pt file: "
            f"{type(error).__name__}); point {key} at a checkpoint written by diffusion-train")


def load(path: str | Path, device="cpu", use_ema: bool = True, state: dict | None = None,
         weights: str | None = None) -> tuple[torch.nn.Module, NoiseSchedule, DictConfig]:
    """(model, schedule, config) from a checkpoint file or a run dir (or from its `state`, read
    already); the model in eval mode, with the EMA weights where the checkpoint has them and
    use_ema is true, or the entry `weights` names ("guide", a power EMA "ema_0.1"). The same
    loader `diffusion-sample` uses; call it from a notebook as well."""
    state = state if state is not None else read(path, map_location=device)
    config = OmegaConf.create(state["config"])
    if config.get("task") == "autoencoder":
        raise UserError(f"ckpt={path} is an autoencoder (task=autoencoder), not a denoiser: train one on "
                        f"its latents with diffusion-train autoencoder.ckpt={run_dir_of(resolve(path))} ...")
    shape = tuple(state["autoencoder"]["latent_shape"]) if "autoencoder" in state else config.data
    try:
        model = build_model(config.model, shape, text_config(config), config.objective.prediction).to(device)
    except UserError as error:  # its CLIP not where it was: a run from another machine, most often
        raise UserError(f"{error} (a run moved from another machine: text_encoder.path=DIR names where its "
                        f"CLIP is on this one)") from None
    weights = weights or ("ema" if use_ema and "ema" in state else "model")
    try:
        model.load_state_dict(state[weights])
    except RuntimeError as error:
        raise UserError(f"ckpt={path}: its weights do not match its own model config "
                        f"({str(error).splitlines()[0]})") from None
    schedule = NoiseSchedule.from_config(config.schedule).to(device)
    return use_channels_last(model).eval(), schedule, config


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python containers, for checkpoints and result files."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def save_training(trainer, cfg: DictConfig, step: int, run_dir: Path, rng: dict, record: dict) -> None:
    """checkpoints/step_N.pt, keeping the last `keep_checkpoints`, and last.pt, from a TrainStep,
    the random states `rng` (every rank's, gathered by the caller) and the step's metrics so far
    (`record`: its training part, saved before its evaluation, which a resumed run may redo)."""
    state = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "model": trainer.model.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "config": to_plain(cfg),
        "rng": rng,
        "record": record,
    }
    state.update(trainer.averages.state())
    if trainer.scaler.is_enabled():
        state["scaler"] = trainer.scaler.state_dict()
    if trainer.lr_rewarm is not None:
        state["lr_rewarm"] = list(trainer.lr_rewarm)
    # task=autoencoder: "latent", what latent diffusion scales its latents by; latent diffusion:
    # "autoencoder", the space's autoencoder, so that sampling needs no other file.
    state.update(trainer.task.state())
    directory = run_dir / "checkpoints"
    for stale in directory.glob(".*.tmp"):  # left by a process killed while writing
        stale.unlink()
    keep = cfg.trainer.keep_checkpoints
    if keep > 0 and cfg.trainer.checkpoint_every > 0 and step % cfg.trainer.checkpoint_every == 0:
        save(state, directory / f"step_{step:07d}.pt")
        for old in sorted(directory.glob("step_*.pt"))[:-keep]:
            old.unlink()
    save(state, directory / "last.pt")


def restore(state: dict, trainer) -> int:
    """Load a checkpoint's model, EMA, optimizer and random states into a TrainStep; returns its
    step. On another device type (a GPU run resumed on the CPU, or the reverse) the weights and
    optimizer move over, but a generator's state can't: the training stream starts anew from
    trainer.seed, the step and the rank, with a warning that the run is no longer bit-identical
    to an uninterrupted one."""
    device_type, ranks = _random_states(state["rng"])
    if len(ranks) != runtime.world_size():
        raise UserError(f"this run trained on {len(ranks)} process(es), not {runtime.world_size()}: "
                        f"resume it with torchrun --nproc-per-node {len(ranks)}, so every rank "
                        f"continues its own random stream")
    trainer.model.load_state_dict(state["model"])
    trainer.averages.restore(state, trainer.model)
    trainer.optimizer.load_state_dict(state["optimizer"])
    if "scaler" in state:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.task.restore(state)
    mine, device = ranks[runtime.rank()], trainer.device
    torch.set_rng_state(mine["torch"])
    if device_type == device.type:
        trainer.generator.set_state(mine["train"])
        if "cuda" in mine:
            torch.cuda.set_rng_state(mine["cuda"], device)
        if "mps" in mine:
            torch.mps.set_rng_state(mine["mps"])
    else:
        seed = trainer.tc.seed + runtime.world_size() * state["step"] + runtime.rank()
        log.warning(f"this run trained on {device_type}, it resumes on {device.type}: weights, EMA "
                    f"and optimizer carry over, but random streams can't move between device "
                    f"types, so batches and noise continue from seed {seed} (not bit-identical "
                    f"to an uninterrupted run)")
        trainer.generator.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(seed)
        if device.type == "mps":
            torch.mps.manual_seed(seed)
    return state["step"]


def _random_states(rng: dict) -> tuple[str, list[dict]]:
    """(device type, each rank's states), from a format 2 checkpoint or a format 1 one (CPU
    runs: the training streams per rank, torch's global state of rank 0)."""
    if "ranks" in rng:
        return rng["device_type"], rng["ranks"]
    streams = rng.get("train_ranks", [rng["train"]])
    return "cpu", [{"train": stream, "torch": rng["torch"]} for stream in streams]


def run_dir_of(path: str | Path) -> Path:
    """The run dir of a resume= path: the dir itself, or the run dir of checkpoints/<file>.pt."""
    path = Path(path)
    return path.parent.parent if path.suffix == ".pt" else path


def continues_in_place(resume: str | Path, run_dir: str | Path) -> bool:
    """Whether resume= goes on in run_dir as the same run: its latest state, in its own dir."""
    return run_dir_of(resume).resolve() == Path(run_dir).resolve() and is_latest(resume)


def step_of(path: Path) -> int:
    """A checkpoint's step, read without loading its tensors (memory-mapped)."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]


def is_latest(path: str | Path) -> bool:
    """Whether resume= names its run's newest state (the run dir, last.pt, or a step_N.pt at
    last.pt's step). An older checkpoint branches into a new run dir, so that the run's later
    checkpoints and metrics stay as they are. A path that can't be read counts as the latest:
    validate() names what is wrong with it."""
    path = Path(path)
    last = path.parent / "last.pt"
    if path.suffix != ".pt" or path.name == "last.pt" or not last.is_file():
        return True
    try:
        return step_of(path) >= step_of(last)
    except Exception:
        return True


def metric_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, leaving out a line cut off by a kill."""
    records = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def continue_metrics(source: Path, target: Path, step: int) -> None:
    """Write to `target` the lines of `source` (the resumed run's metrics.jsonl; the same file when
    it continues in place) up to `step`, dropping later ones and a line cut off by a kill: the
    resumed run logs them again, so the file has every step once."""
    kept = [json.dumps(record) + "\n" for record in metric_records(source) if record["step"] <= step]
    with atomic_write(target) as file:
        file.write("".join(kept))
