"""The denoisers. Every model is called as model(x_t, t), t a LongTensor of shape (B,), and returns
the predicted noise, shaped like x_t."""

from contextlib import contextmanager

from torch import nn

from ..errors import UserError
from .mlp import MLP
from .unet import UNet

MODELS = {"mlp": MLP, "unet": UNet}


def image_shape(data_cfg) -> tuple[int, int, int]:
    return (data_cfg.channels, data_cfg.height, data_cfg.width)


def build_model(model_cfg, data_cfg) -> nn.Module:
    """The model named by `model_cfg.kind`, its other keys as keyword arguments, sized for `data`."""
    if model_cfg.kind not in MODELS:
        raise UserError(f"model.kind={model_cfg.kind!r} is unknown; choose one of: {', '.join(MODELS)}")
    options = {key: value for key, value in dict(model_cfg).items() if key != "kind"}
    try:
        return MODELS[model_cfg.kind](image_shape(data_cfg), **options)
    except ValueError as error:
        raise UserError(str(error)) from None


@contextmanager
def eval_mode(model: nn.Module):
    """Evaluate in eval mode, then give the model back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
