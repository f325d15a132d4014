"""Sample quality measured inside the project."""

import torch

from .data import gradient_grid

# A sample counts as a valid gradient when its residual RMS (in [0, 1] units) is below this.
VALID_RMS = 0.02


def gradient_fit(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit every image, per channel, by least squares to a + g (b - a), g the generators' fixed grid.

    images: (N, C, H, W) in [0, 1]. Returns (residual RMS per image (N,), fitted colors (N, C, 2)).
    """
    n, channels, height, width = images.shape
    g = gradient_grid(height, width).flatten()
    design = torch.stack([1 - g, g], dim=1)                       # (HW, 2): a (1-g) + b g
    targets = images.double().reshape(n * channels, -1).T         # (HW, N*C)
    colors = torch.linalg.pinv(design) @ targets                  # (2, N*C): least squares
    residual = (design @ colors - targets).reshape(-1, n, channels)
    rms = residual.pow(2).mean(dim=(0, 2)).sqrt()
    return rms.float(), colors.T.reshape(n, channels, 2).float()


def gradient_quality(images: torch.Tensor) -> dict[str, float]:
    """How close samples in [0, 1] are to the gradient data.

    rms: mean residual RMS of the per-channel fit (0 = perfect gradients);
    valid_frac: fraction of samples with residual RMS < VALID_RMS;
    color_std: spread of the fitted colors (the data's, uniform on [0, 1], is 0.289);
    color_ks: Kolmogorov-Smirnov distance between the fitted colors and Uniform[0, 1], the data's
    distribution (0 = the same spread; a model that paints few color pairs scores high).
    """
    rms, colors = gradient_fit(images.cpu())
    values = colors.flatten().clamp(0, 1).sort().values
    n = len(values)
    below = torch.arange(1, n + 1) / n                      # empirical CDF just after each value
    ks = torch.maximum(below - values, values - (below - 1 / n)).max()
    return {
        "rms": rms.mean().item(),
        "valid_frac": (rms < VALID_RMS).float().mean().item(),
        "color_std": values.std().item(),
        "color_ks": ks.item(),
    }
