"""The KL autoencoder of latent diffusion (Rombach et al. 2022), small: a convolutional residual
encoder to a diagonal Gaussian over a latent of z_channels x H/f x W/f (f = 2^(levels - 1)), and
a decoder back to pixels. Trained by `diffusion-train task=autoencoder` (autoencoder.py:
autoencoder_loss); a denoiser then learns the scaled latents of the frozen model
(spaces.py: LatentSpace)."""

import torch
from torch import nn

from .unet import group_norm


class ResBlock(nn.Module):
    """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), with a 1x1 skip when widths differ."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                  group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class AutoencoderKL(nn.Module):
    """Levels of widths base_channels * channel_mults[i] with num_res_blocks residual blocks each,
    halving the resolution between levels (a strided conv) on the way down and doubling it
    (nearest, then a conv) on the way up. encode(x) -> (mean, log-variance) of the latent;
    decode(z) -> the image; forward(x) -> the reconstruction from a drawn latent, and the
    posterior's mean and log-variance."""

    def __init__(self, image_shape: tuple[int, int, int], base_channels: int = 32,
                 channel_mults: tuple[int, ...] = (1, 2, 2), num_res_blocks: int = 1, z_channels: int = 4):
        super().__init__()
        channels, height, width = image_shape
        self.factor = 2 ** (len(channel_mults) - 1)
        if height % self.factor or width % self.factor:
            raise ValueError(f"autoencoder with {len(channel_mults)} levels downsamples by {self.factor}: "
                             f"the image height and width must be divisible by it, got {height}x{width}; "
                             f"use another data size or autoencoder.channel_mults")
        self.image_shape, self.z_channels = tuple(image_shape), z_channels
        self.latent_shape = (z_channels, height // self.factor, width // self.factor)
        widths = [base_channels * mult for mult in channel_mults]

        down, current = [nn.Conv2d(channels, widths[0], 3, padding=1)], widths[0]
        for level, width_ in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(ResBlock(current, width_))
                current = width_
            if level < len(widths) - 1:
                down.append(nn.Conv2d(current, current, 3, stride=2, padding=1))
        down += [ResBlock(current, current), group_norm(current), nn.SiLU(), nn.Conv2d(current, 2 * z_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*down)

        up = [nn.Conv2d(z_channels, current, 3, padding=1), ResBlock(current, current)]
        for level, width_ in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks):
                up.append(ResBlock(current, width_))
                current = width_
            if level > 0:
                up += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(current, current, 3, padding=1)]
        up += [group_norm(current), nn.SiLU(), nn.Conv2d(current, channels, 3, padding=1)]
        self.decoder = nn.Sequential(*up)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_variance = self.encoder(x).chunk(2, dim=1)
        return mean, log_variance.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        mean, log_variance = self.encode(x)
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.decode(mean + (0.5 * log_variance).exp() * noise), mean, log_variance


def kl_divergence(mean: torch.Tensor, log_variance: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(log_variance)) || N(0, 1)) of each sample, summed over the latent."""
    return 0.5 * (mean.pow(2) + log_variance.exp() - 1 - log_variance).flatten(1).sum(1)


def psnr(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Each image's peak signal-to-noise ratio in dB, both in [-1, 1] (measured on [0, 1])."""
    error = ((images - reconstructions.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / error.clamp(min=1e-10))


def reconstruction_error(images: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample L1 or L2 reconstruction error, summed over the pixels."""
    difference = reconstructions - images
    return (difference.abs() if kind == "l1" else difference.pow(2)).flatten(1).sum(1)


def perceptual_distance(lpips: nn.Module, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-sample LPIPS distance of images in [-1, 1]; grey images are seen as RGB."""
    if images.shape[1] not in (1, 3):
        raise ValueError(f"autoencoder.perceptual_weight: LPIPS compares grey or RGB images, not "
                         f"{images.shape[1]}-channel ones; set autoencoder.perceptual_weight=0")
    repeat = 3 // images.shape[1]
    return lpips(images.repeat(1, repeat, 1, 1), reconstructions.repeat(1, repeat, 1, 1)).flatten()
