"""Checkpoints: self-describing dicts that load with `torch.load(path, weights_only=True)`.

A checkpoint holds `format_version`, `step`, `model` (state dict), `ema` (the EMA weights' state
dict, when trainer.ema_decay > 0), `optimizer` (state dict),
`config` (the whole resolved run config as plain containers) and `rng` (generator states as
tensors). `load()` rebuilds model and schedule from that dict alone.
"""

import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .atomic import atomic_write
from .errors import UserError
from .models import build_model
from .runtime import use_channels_last
from .schedule import NoiseSchedule

FORMAT_VERSION = 1


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
    return state


def unreadable(path: Path, key: str, error: Exception) -> str:
    return (f"{key}={path} is not a readable checkpoint (truncated or not a .pt file: "
            f"{type(error).__name__}); point {key} at a checkpoint written by diffusion-train")


def load(path: str | Path, device="cpu", use_ema: bool = True
         ) -> tuple[torch.nn.Module, NoiseSchedule, DictConfig]:
    """(model, schedule, config) from a checkpoint file or a run dir; the model in eval mode,
    with the EMA weights where the checkpoint has them and use_ema is true.
    The same loader `diffusion-sample` uses; call it from a notebook as well."""
    state = read(path, map_location=device)
    config = OmegaConf.create(state["config"])
    model = build_model(config.model, config.data).to(device)
    try:
        model.load_state_dict(state["ema"] if use_ema and "ema" in state else state["model"])
    except RuntimeError as error:
        raise UserError(f"ckpt={path}: its weights do not match its own model config "
                        f"({str(error).splitlines()[0]})") from None
    schedule = NoiseSchedule.from_config(config.schedule).to(device)
    return use_channels_last(model).eval(), schedule, config
