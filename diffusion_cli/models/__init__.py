"""The denoisers. Every model is called as model(x_t, t) or model(x_t, t, cond), t a LongTensor of
shape (B,) and cond the condition: class indices (B,) for a class-conditional model, caption
tokens (B, L) for a text-conditioned one (model.text; models/text_encoder.py); it returns a
tensor shaped like x_t: the noise, the clean image or v, as its `prediction` attribute says (set
from the run's objective.prediction: objectives.py). A self-conditioned ResUNet
(model.self_condition) also takes x0_hint=, an estimate of x0 shaped like x_t."""

from dataclasses import dataclass, field
from typing import List, Optional

from omegaconf import MISSING, OmegaConf
from torch import nn

from ..errors import UserError
from ..schema import check, levels, non_negative, one_of, positive
from .dit import DiT
from .mlp import MLP
from .resunet import ResUNet
from .unet import UNet

MODELS = {"mlp": MLP, "unet": UNet, "resunet": ResUNet, "dit": DiT}
TEXT_MODELS = ("resunet", "dit")  # the models with cross-attention


def image_shape(data_cfg) -> tuple[int, int, int]:
    return (data_cfg.channels, data_cfg.height, data_cfg.width)


def size_factor(model_cfg) -> int:
    """What a model needs its input's height and width divisible by."""
    if model_cfg.kind == "resunet":
        return 2 ** (len(model_cfg.channel_mults) - 1)
    return {"unet": 4, "dit": model_cfg.get("patch_size", 1)}.get(model_cfg.kind, 1)


def build_model(model_cfg, data_cfg, text_cfg: dict | None = None, prediction: str = "eps") -> nn.Module:
    """The model named by `model_cfg.kind`, its other keys as keyword arguments, sized for `data`
    (or for a (C, H, W) tuple: a latent's shape); conditioned on captions through the text encoder
    `text_cfg` where given; outputting the objective's `prediction` kind."""
    if model_cfg.kind not in MODELS:
        raise UserError(f"model.kind={model_cfg.kind!r} is unknown; choose one of: {', '.join(MODELS)}")
    options = {key: value for key, value in OmegaConf.to_container(model_cfg, resolve=True).items()
               if key != "kind"}
    if text_cfg:
        if model_cfg.kind not in TEXT_MODELS:
            raise UserError(f"model={model_cfg.kind} can't attend to captions: use model=resunet (or "
                            f"resunet32, resunet64) or model=dit with data.captions")
        options["text"] = text_cfg
    else:
        options.pop("cross_attention_resolutions", None)
    try:
        shape = tuple(data_cfg) if isinstance(data_cfg, tuple) else image_shape(data_cfg)
        model = MODELS[model_cfg.kind](shape, **options)
    except ValueError as error:
        raise UserError(str(error)) from None
    model.prediction = prediction
    return model


# The config group's schema (conf/ holds the values and their docs).
@dataclass
class ModelConfig:
    kind: str = one_of(MODELS)
    num_classes: int = non_negative("an integer >= 0 (0: unconditional)")


@dataclass
class MLPConfig(ModelConfig):
    width: int = positive()
    depth: int = non_negative()


@dataclass
class UNetConfig(ModelConfig):
    base_channels: int = positive()
    time_dim: int = check(lambda v: v >= 2 and v % 2 == 0, "an even integer >= 2", MISSING)


@dataclass
class ResUNetConfig(ModelConfig):
    base_channels: int = positive()
    channel_mults: List[int] = levels()
    num_res_blocks: int = positive()
    attention: bool = MISSING
    dropout: float = check(lambda v: 0 <= v < 1, "a number from 0 to below 1", MISSING)
    attention_resolutions: List[int] = field(default_factory=list)
    cross_attention_resolutions: Optional[List[int]] = None
    self_condition: bool = False


@dataclass
class DiTConfig(ModelConfig):
    patch_size: int = positive("an integer >= 1 that divides the image height and width")
    width: int = positive()
    depth: int = non_negative()
    heads: int = positive("an integer >= 1 that divides model.width")
    position: str = one_of(("learned", "sinusoidal"))


MODEL_SCHEMAS = {"mlp": MLPConfig, "unet": UNetConfig, "resunet": ResUNetConfig, "dit": DiTConfig}
