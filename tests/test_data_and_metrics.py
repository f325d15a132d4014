import os

import pytest
import torch
from omegaconf import OmegaConf

from conftest import data_config
from diffusion_cli.data import load_data, make_gradients, to_model_range
from diffusion_cli.errors import UserError
from diffusion_cli.metrics import gradient_quality


def test_gradient_images_follow_the_generator_formula():
    images = make_gradients(5, (3, 6, 10), seed=0)
    assert images.shape == (5, 3, 6, 10) and images.dtype == torch.float32
    corners = torch.randint(0, 256, (2, 5, 3), generator=torch.Generator().manual_seed(0)).float() / 255
    torch.testing.assert_close(images[:, :, 0, 0], corners[0])      # color a at the top-left
    torch.testing.assert_close(images[:, :, -1, -1], corners[1])    # color b at the bottom-right
    # By hand: grid[y, x] = x/(W-1) * W/(W+H) + y/(H-1) * H/(W+H), which is 1 at the bottom-right.
    H, W = 6, 10
    y, x = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    grid = x / (W - 1) * W / (W + H) + y / (H - 1) * H / (W + H)
    a, b = corners[0][:, :, None, None], corners[1][:, :, None, None]
    torch.testing.assert_close(images, a + grid * (b - a))


def test_load_data_gives_disjoint_sets_in_minus_one_one():
    train, evaluation = load_data(data_config("gradients", num_train=200, num_eval=50))
    assert train.labels is None and train.captions is None  # gradients have no classes
    train, evaluation = to_model_range(train.images), evaluation.images
    assert train.shape == (200, 3, 16, 16) and evaluation.shape == (50, 3, 16, 16)
    assert train.min() >= -1 and train.max() <= 1
    assert train.min() < -0.9 and train.max() > 0.9  # the full range, not rescaled per image
    pairs = (train.flatten(1)[:, None] - evaluation.flatten(1)[None]).abs().amax(-1)
    assert pairs.min() > 0  # no eval image is also a train image


def test_quality_of_the_data_itself_is_perfect():
    q = gradient_quality(make_gradients(512, (3, 16, 16), seed=3))
    assert q["rms"] < 1e-5 and q["valid_frac"] == 1.0
    assert q["color_std"] == pytest.approx(0.289, abs=0.02) and q["color_ks"] < 0.05
    assert 0.01 < q["clipped_frac"] < 0.1  # a color of exactly 0 or 255: 6 colors x 2/256


def test_quality_rejects_gradients_that_overshoot_the_color_range():
    """Stretched 10% past [0, 1] and clipped: each image stays close to a gradient in RMS, but
    its fitted colors leave the data's range, and its pixels pile up at 0 and 1."""
    data = make_gradients(512, (3, 16, 16), seed=3)
    stretched = ((data - 0.5) * 1.1 + 0.5).clamp(0, 1)
    q = gradient_quality(stretched)
    outside = ((data - 0.5) * 1.1 + 0.5 < -0.02) | ((data - 0.5) * 1.1 + 0.5 > 1.02)
    assert q["valid_frac"] < 1 - 0.5 * outside.flatten(1).any(1).float().mean().item()
    assert q["clipped_frac"] > 0.4


def test_quality_flags_noise_and_collapse():
    noisy = (make_gradients(64, (3, 16, 16), seed=3) + 0.1 * torch.randn(64, 3, 16, 16)).clamp(0, 1)
    assert gradient_quality(noisy)["valid_frac"] < 0.1
    collapsed = make_gradients(1, (3, 16, 16), seed=3).repeat(64, 1, 1, 1)
    q = gradient_quality(collapsed)
    assert q["valid_frac"] == 1.0 and q["color_ks"] > 0.3  # perfect gradients, one color pair


@pytest.mark.skipif(not os.path.isdir(os.path.join(os.environ["DIFFUSION_CLI_DATA"], "MNIST")),
                    reason="no MNIST beside the checkout")
def test_mnist_loads_from_the_shared_data_root():
    cfg = data_config("mnist", download=False, num_train=100, num_eval=10)
    (train, train_labels, _), (evaluation, eval_labels, _) = load_data(cfg)
    assert train.dtype == torch.uint8  # stored as pixels: 4x smaller than floats
    train = to_model_range(train)
    assert train.shape == (100, 1, 28, 28) and evaluation.shape == (10, 1, 28, 28)
    assert train.min() == -1 and train.max() == 1
    assert train_labels.shape == (100,) and set(train_labels.tolist()) == set(range(10))
    assert eval_labels[:3].tolist() == [7, 2, 1]  # the first digits of the MNIST test set


@pytest.mark.parametrize("download", [False, True])
def test_missing_mnist_is_one_clear_error(tmp_path, download, monkeypatch):
    # Offline: make any download attempt fail as it does without internet.
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = data_config("mnist", root=str(tmp_path / "nowhere"), download=download)
    with pytest.raises(UserError) as error:
        load_data(cfg)
    message = str(error.value)
    assert str(tmp_path / "nowhere") in message and "DIFFUSION_CLI_DATA" in message
    assert "\n" not in message
