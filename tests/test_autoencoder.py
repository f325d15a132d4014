"""The autoencoder stage and latent diffusion: the KL autoencoder's math and shapes, the measured
latent scale, decoding outside fp16, `task=autoencoder` runs, and denoisers trained on its latents
that sample with the autoencoder's run dir gone."""

import json
import shutil

import pytest
import torch

from conftest import run_in_process
from diffusion_cli.autoencoder import latent_statistics
from diffusion_cli.spaces import LatentSpace
from diffusion_cli.models.autoencoder import AutoencoderKL, kl_divergence, psnr
from diffusion_cli.autoencoder import autoencoder_loss

# debug=fast (batch 16 of 256 16x16 gradients), 4 steps with a checkpoint every 2.
GRADIENTS_16 = ["data=gradients", "debug=fast", "trainer.device=cpu", "trainer.max_steps=4",
                "trainer.eval_every=2", "trainer.sample_every=4", "trainer.checkpoint_every=2"]
TINY_AE = ["task=autoencoder", "autoencoder=tiny", *GRADIENTS_16]
TINY_LATENT = ["model=resunet", "model.channel_mults=[1,2]", "schedule.T=20", "trainer.num_quality_images=8",
               "sampler=ddim", "sampler.steps=4", *GRADIENTS_16]


@pytest.fixture(scope="module")
def tiny_autoencoder(tmp_path_factory):
    """A task=autoencoder run of 4 steps on 16x16 gradients (shared: tests copy it to change it)."""
    run = tmp_path_factory.mktemp("autoencoder") / "run"
    trained = run_in_process("diffusion-train", *TINY_AE, f"hydra.run.dir={run}", cwd=run.parent)
    assert trained.returncode == 0, trained.stderr
    return run


def test_kl_divergence_and_psnr_follow_their_formulas():
    mean, log_variance = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    posterior = torch.distributions.Normal(mean, (0.5 * log_variance).exp())
    expected = torch.distributions.kl_divergence(posterior, torch.distributions.Normal(0, 1)).flatten(1).sum(1)
    assert torch.allclose(kl_divergence(mean, log_variance), expected, atol=1e-5)
    images = torch.zeros(2, 1, 4, 4)
    assert psnr(images, images + 0.2).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)  # error 0.1 of [0, 1]


def test_the_autoencoder_downsamples_by_2_to_the_levels_minus_one():
    model = AutoencoderKL((3, 32, 32), base_channels=8, channel_mults=[1, 2, 2], z_channels=4)
    assert model.factor == 4 and model.latent_shape == (4, 8, 8)
    decoded, mean, log_variance = model(torch.randn(2, 3, 32, 32), torch.Generator().manual_seed(0))
    assert decoded.shape == (2, 3, 32, 32) and mean.shape == log_variance.shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="downsamples by 8"):
        AutoencoderKL((1, 28, 28), channel_mults=[1, 2, 2, 2])
    loss = autoencoder_loss(model, torch.zeros(2, 3, 32, 32), torch.Generator().manual_seed(0), "l2", 0.0)
    assert loss.item() == pytest.approx(decoded.pow(2).mean().item(), rel=0.5)  # per pixel, not summed


def test_the_latent_scale_gives_unit_variance_on_the_measured_images():
    torch.manual_seed(0)
    model = AutoencoderKL((1, 8, 8), base_channels=8, channel_mults=[1, 2])
    images = torch.rand(64, 1, 8, 8) * 2 - 1
    for shift in (False, True):
        stats = latent_statistics(model, images, shift, batch_size=16)
        space = LatentSpace(model, {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1, "z_channels": 4},
                            (1, 8, 8), stats, "test")
        latents = space.encode(images)
        assert latents.std().item() == pytest.approx(1.0, abs=1e-4)
        assert latents.mean((0, 2, 3)).abs().max().item() < 1e-4 or not shift  # shift centres each channel
        assert torch.allclose(space.decode(latents), model.decode(model.encode(images)[0]), atol=1e-5)


def test_decoding_never_runs_in_fp16():
    model = AutoencoderKL((1, 8, 8), base_channels=8, channel_mults=[1, 2])
    space = LatentSpace(model, {}, (1, 8, 8), {"scale": 2.0, "shift": [0.0] * 4}, "test")
    latents = torch.randn(2, 4, 4, 4)
    plain = space.decode(latents)
    with torch.autocast("cpu", dtype=torch.float16):
        assert torch.equal(space.decode(latents), plain)         # fp16 asked: decoded in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = space.decode(latents)
    assert in_bf16.dtype == torch.float32 and not torch.equal(in_bf16, plain)   # bf16 is allowed
    assert torch.allclose(in_bf16, plain, atol=0.1)


def test_an_autoencoder_trains_then_a_denoiser_on_its_latents_samples_without_it(tiny_autoencoder, tmp_path):
    ae_run, run = tmp_path / "ae", tmp_path / "latent"
    shutil.copytree(tiny_autoencoder, ae_run)
    result = json.loads((ae_run / "result.json").read_text())
    assert result["psnr"] > 0 and abs(result["latent_scaled_std"] - 1) < 0.5
    state = torch.load(ae_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["latent"]["scale"] == pytest.approx(result["latent_scale"])
    assert (ae_run / "reconstructions" / "step_0000004.png").is_file() and (ae_run / "psnr.png").is_file()

    refused = run_in_process("diffusion-sample", f"ckpt={ae_run}", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert refused.returncode == 2 and "is an autoencoder" in refused.stderr

    trained = run_in_process("diffusion-train", f"autoencoder.ckpt={ae_run}", *TINY_LATENT,
                             f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "encodes 3x16x16 images to 4x4x4 latents" in (run / "train.log").read_text()
    assert "valid_frac" in json.loads((run / "result.json").read_text())  # quality on decoded images
    shutil.rmtree(ae_run)
    out = tmp_path / "samples"
    sampled = run_in_process("diffusion-sample", f"ckpt={run}", "num_samples=3", "sampler=ddim", "sampler.steps=3",
                             f"hydra.run.dir={out}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    images = torch.load(out / "samples.pt")
    assert images.shape == (3, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


@pytest.mark.slow
def test_cached_latents_train_as_encoded_ones_and_resume_exactly(tiny_autoencoder, tmp_path):
    # Latents encoded per batch and all at once differ in their last bits; a slow warm-up keeps the
    # weights that difference reaches within the tolerance below.
    common = [f"autoencoder.ckpt={tiny_autoencoder}", *TINY_LATENT, "trainer.num_quality_images=0",
              "trainer.lr_schedule=constant", "trainer.lr_warmup_steps=100"]

    def train(name, *args):
        result = run_in_process("diffusion-train", *common, *args, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return torch.load(tmp_path / name / "checkpoints" / "last.pt", weights_only=True)

    encoded, cached = train("encoded"), train("cached", "autoencoder.cache_latents=true")
    assert "encoded 256 training images once" in (tmp_path / "cached" / "train.log").read_text()
    for key in encoded["model"]:
        assert torch.allclose(encoded["model"][key], cached["model"][key], atol=1e-4), key
    train("again", "autoencoder.cache_latents=true")
    assert "cached latents" in (tmp_path / "again" / "train.log").read_text()
    train("part", "autoencoder.cache_latents=true", "trainer.max_steps=2")
    resumed = run_in_process("diffusion-train", f"resume={tmp_path / 'part'}", "trainer.max_steps=4", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    part = torch.load(tmp_path / "part" / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.equal(part["model"][key], cached["model"][key]) for key in cached["model"])


@pytest.mark.parametrize("args, message", [
    (["data.height=12", "data.width=12"], "need image sizes divisible by 8, got 12x12: use such a size"),
    (["data.channels=1"], "encodes 3-channel images, data=gradients has 1"),
    (["AE=denoiser"], "is not an autoencoder (it was trained with task=diffusion)"),
])
def test_bad_latent_settings_are_one_line_errors(tiny_autoencoder, trained_run, tmp_path, args, message):
    ckpt = trained_run if args == ["AE=denoiser"] else tiny_autoencoder
    args = [] if args == ["AE=denoiser"] else args
    result = run_in_process("diffusion-train", f"autoencoder.ckpt={ckpt}", *TINY_LATENT, *args,
                            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
