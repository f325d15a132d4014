"""The denoisers. Every model is called as model(x_t, t) or model(x_t, t, labels), t and labels
LongTensors of shape (B,), and returns a tensor shaped like x_t: the noise, the clean image or v,
as its `prediction` attribute says (set from model.prediction)."""

from omegaconf import OmegaConf
from torch import nn

from ..errors import UserError
from .dit import DiT
from .mlp import MLP
from .resunet import ResUNet
from .unet import UNet

MODELS = {"mlp": MLP, "unet": UNet, "resunet": ResUNet, "dit": DiT}


def image_shape(data_cfg) -> tuple[int, int, int]:
    return (data_cfg.channels, data_cfg.height, data_cfg.width)


def build_model(model_cfg, data_cfg) -> nn.Module:
    """The model named by `model_cfg.kind`, its other keys as keyword arguments, sized for `data`."""
    if model_cfg.kind not in MODELS:
        raise UserError(f"model.kind={model_cfg.kind!r} is unknown; choose one of: {', '.join(MODELS)}")
    options = {key: value for key, value in OmegaConf.to_container(model_cfg, resolve=True).items()
               if key not in ("kind", "prediction")}
    try:
        model = MODELS[model_cfg.kind](image_shape(data_cfg), **options)
    except ValueError as error:
        raise UserError(str(error)) from None
    model.prediction = model_cfg.get("prediction", "eps")  # checkpoints before it predicted eps
    return model
