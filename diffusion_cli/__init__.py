"""diffusion-cli: train DDPM diffusion models and sample from them, configured with Hydra."""

__version__ = "0.1.0"
