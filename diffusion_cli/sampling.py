"""The samplers moved to diffusion_cli.samplers (one module each, one loop); the names code outside
the project imports from here stay."""

from .generation import image_seeds, sample_images  # noqa: F401
from .samplers import SAMPLERS, model_device, sample  # noqa: F401
