"""The samplers moved to diffusion_cli.samplers (one module each, one loop); the names code outside
the project imports from here stay."""

from .samplers import SAMPLERS, class_rows, image_seeds, model_device, sample, sample_images  # noqa: F401
