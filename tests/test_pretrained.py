"""The pretrained extras, built tiny and random offline from config dicts: CLIP's text model
(text_encoder=clip), and their one-line errors."""

import copy
import json
import shutil
import string
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import run_in_process
from diffusion_cli.errors import UserError
from diffusion_cli.models import build_model, pretrained
from diffusion_cli.models.text_encoder import PAD, tokenize

transformers = pytest.importorskip("transformers")

MODEL = dict(kind="resunet", base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=False,
             dropout=0.0, num_classes=0, attention_resolutions=[],
             cross_attention_resolutions=None)


def save_tiny_clip(path, seed: int = 0, full: bool = False):
    """A CLIP tokenizer (lower-case letters, digits and punctuation, no merges) and a random
    2-layer text model of width 32, saved as `save_pretrained` saves a downloaded one; `full`: a
    whole CLIP model (with a 2-layer image tower on 16x16 images), as openai/clip-* are."""
    units = string.ascii_lowercase + string.digits + string.punctuation
    vocab = {unit + end: i for i, (end, unit) in enumerate((end, unit) for end in ("", "</w>") for unit in units)}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path))
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"])
    if full:
        vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, image_size=16, patch_size=4)
        transformers.CLIPModel(transformers.CLIPConfig(text_config=config.to_dict(), vision_config=vision.to_dict(),
                                                       projection_dim=16)).save_pretrained(str(path))
    else:
        transformers.CLIPTextModel(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    for loaded in (pretrained.clip, pretrained.is_full_clip, pretrained.clip_pair):
        loaded.cache_clear()  # a new model at a path this process may have loaded before
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def clip_model(path):
    torch.manual_seed(0)
    text = {"kind": "clip", "path": str(path), "max_length": 20}
    return build_model(OmegaConf.create(MODEL), (3, 8, 8), text).eval()


def test_clip_is_frozen_shared_and_out_of_the_denoisers_weights(tiny_clip):
    model = clip_model(tiny_clip)
    frozen = model.text.encoder.frozen
    assert not any(p is q for p in model.parameters() for q in frozen.model.parameters())
    assert [key for key in model.state_dict() if key.startswith("text.encoder.")] == ["text.encoder.fingerprint"]
    assert copy.deepcopy(model).text.encoder.frozen is frozen  # the EMA copy shares it
    tokens, cut = model.text.encoder.tokenizer(["seven", "a b c d e f g h i j k l m n o p q r s t"])
    start, end = frozen.tokenizer.bos_token_id, frozen.tokenizer.eos_token_id
    assert tokens[0, 0] == start and tokens[0, 6] == end and (tokens[0, 7:] == PAD).all()  # s e v e n
    assert cut == 1 and tokens[1, -1] == end  # a cut caption keeps its end token


def test_clip_embeds_each_distinct_caption_once_and_padding_changes_nothing(tiny_clip):
    model = clip_model(tiny_clip)
    encoder, frozen = model.text.encoder, model.text.encoder.frozen
    tokens = tokenize(encoder, ["seven", "three", "seven"])
    with torch.no_grad():
        direct = frozen.model(input_ids=tokens[:1, :7]).last_hidden_state  # s e v e n between start, end
    frozen.cache.clear()
    calls = []
    hook = frozen.model.register_forward_hook(lambda *args: calls.append(1))
    states, mask = encoder(tokens)
    assert len(calls) == 1 and len(frozen.cache) == 2
    assert torch.allclose(states[0, :7], direct[0], atol=1e-6) and (states[0, 7:] == 0).all()
    wider = torch.nn.functional.pad(tokens, (0, 4), value=PAD)
    assert torch.equal(encoder(wider)[0][:, : tokens.shape[1]], states) and len(calls) == 1  # cached
    hook.remove()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 5, 9])
    with torch.no_grad():
        assert torch.allclose(model(x, t, wider), model(x, t, tokens), atol=1e-5)


def shapes_folder(root):
    """8 captioned 8x8 squares: 'a red square' and 'a blue square' in turn."""
    from PIL import Image

    root.mkdir()
    for i in range(8):
        Image.new("RGB", (8, 8), (200, 30, 30) if i % 2 else (30, 30, 200)).save(root / f"{i}.png")
        (root / f"{i}.txt").write_text("a red square" if i % 2 else "a blue square")
    return root


def test_clip_trains_on_captions_and_samples_prompts_then_refuses_other_weights(tiny_clip, tmp_path):
    root = shapes_folder(tmp_path / "shapes")
    clip = tmp_path / "clip"
    save_tiny_clip(clip)
    run = tmp_path / "run"
    args = ["data=folder", f"data.path={root}", "data.captions=sidecar", "data.num_eval=2", "data.num_workers=0",
            "text_encoder=clip", f"text_encoder.path={clip}", "model=resunet", "model.base_channels=8",
            "model.channel_mults=[1,2]", "schedule.T=10", "trainer.max_steps=2", "trainer.batch_size=4",
            "trainer.num_grid_images=2", "trainer.device=cpu", f"hydra.run.dir={run}"]
    too_long = run_in_process("diffusion-train", *args, cwd=tmp_path)  # max_length 77, this CLIP takes 32
    assert too_long.returncode == 2 and "takes 2 to 32 tokens" in too_long.stderr and not run.exists()
    trained = run_in_process("diffusion-train", *args, "text_encoder.max_length=32", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(".frozen." in key or "text_model" in key for key in state["model"])
    sampled = run_in_process("diffusion-sample", f"ckpt={run}", "prompt=a red square", "num_samples=2",
                             "sampler=ddim", "sampler.steps=2", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    shutil.copytree(clip, tmp_path / "moved")  # the run's CLIP, somewhere else on another machine
    save_tiny_clip(clip, seed=1)  # other weights where the run's CLIP was
    refused = run_in_process("diffusion-sample", f"ckpt={run}", "prompt=a red square",
                             f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert refused.returncode == 2 and "holds other CLIP weights" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    moved = run_in_process("diffusion-sample", f"ckpt={run}", "prompt=a red square", "num_samples=2",
                           "sampler=ddim", "sampler.steps=2", f"text_encoder.path={tmp_path / 'moved'}",
                           f"hydra.run.dir={tmp_path / 'm'}", cwd=tmp_path)
    assert moved.returncode == 0, moved.stderr
    assert torch.equal(torch.load(tmp_path / "m" / "samples.pt"), torch.load(tmp_path / "s" / "samples.pt"))


@pytest.mark.parametrize("path", ["{tmp}/empty", "diffusion-cli-tests/no-such-clip"])
def test_clip_weights_that_cannot_be_had_are_one_line(tmp_path, monkeypatch, path):
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # a hub name, offline
    pretrained.clip.cache_clear()
    result = run_in_process("diffusion-train", "data=mnist", "data.captions=labels", "text_encoder=clip",
                            f"text_encoder.path={path.format(tmp=tmp_path)}", f"hydra.run.dir={tmp_path / 'run'}",
                            cwd=tmp_path)
    assert result.returncode == 2 and "could not load CLIP's tokenizer" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_a_missing_extra_is_one_line_naming_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    pretrained.clip.cache_clear()
    with pytest.raises(UserError, match=r"text_encoder=clip needs the 'clip' extra: pip install 'diffusion-cli\[clip\]'"):
        pretrained.clip("openai/clip-vit-base-patch32")


def save_tiny_vae(path, seed: int = 0):
    """A random diffusers AutoencoderKL (RGB, f=2, 4 latent channels) with its own scale and shift."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=8, scaling_factor=0.5, shift_factor=0.25)
    vae.save_pretrained(str(path))
    pretrained.diffusers_autoencoder.cache_clear()
    return path


def test_a_pretrained_autoencoder_uses_its_own_scale_and_shift(tmp_path):
    from diffusion_cli.spaces import pretrained_latent_space

    vae_dir = save_tiny_vae(tmp_path / "vae")
    latents = pretrained_latent_space(str(vae_dir), None, (3, 8, 8))
    assert latents.shape == (4, 4, 4) and latents.model.factor == 2
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    vae = latents.model.vae
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
        assert torch.allclose(latents.encode(images), (mean - 0.25) * 0.5, atol=1e-6)
        assert torch.allclose(latents.decode(latents.encode(images)), vae.decode(mean).sample, atol=1e-5)
    assert "model" not in latents.state() and latents.state()["config"]["fingerprint"] == latents.model.fingerprint


def train_on(vae_dir, run, *extra: str):
    """A tiny latent diffusion run of 2 steps on the diffusers autoencoder at vae_dir."""
    return run_in_process(
        "diffusion-train", "data=gradients", "data.height=8", "data.width=8", "data.num_train=64",
        "data.num_eval=16", "autoencoder=diffusers", f"autoencoder.path={vae_dir}", "model=resunet",
        "model.base_channels=8", "model.channel_mults=[1,2]", "schedule.T=10", "trainer.max_steps=2",
        "trainer.batch_size=8", "trainer.num_grid_images=2", "trainer.num_quality_images=0",
        "trainer.device=cpu", *extra, f"hydra.run.dir={run}", cwd=run.parent)


def test_latent_diffusion_on_a_diffusers_autoencoder_keeps_its_name_not_its_weights(tmp_path):
    vae_dir = save_tiny_vae(tmp_path / "vae")
    run = tmp_path / "run"
    trained = train_on(vae_dir, run)
    assert trained.returncode == 0, trained.stderr
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["autoencoder"]["config"]["path"] == str(vae_dir) and "model" not in state["autoencoder"]
    assert state["autoencoder"]["latent"] == {"scale": 0.5, "shift": [0.25] * 4}
    sampled = run_in_process("diffusion-sample", f"ckpt={run}", "num_samples=2", "sampler=ddim",
                             "sampler.steps=2", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert torch.load(tmp_path / "s" / "samples.pt").shape == (2, 3, 8, 8)  # decoded to images
    save_tiny_vae(vae_dir, seed=1)  # other weights where the run's autoencoder was
    refused = run_in_process("diffusion-sample", f"ckpt={run}", f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert refused.returncode == 2 and "holds other weights than the autoencoder" in refused.stderr, refused.stderr


def test_a_moved_run_reads_its_autoencoder_where_it_is_now(tmp_path):
    """autoencoder.path= for diffusion-sample and resume=: the run's autoencoder from another
    folder; its fingerprint still refuses other weights."""
    vae_dir = save_tiny_vae(tmp_path / "vae")
    run = tmp_path / "run"
    trained = train_on(vae_dir, run, "trainer.lr_warmup_steps=100")
    assert trained.returncode == 0, trained.stderr
    moved = tmp_path / "elsewhere"
    shutil.move(vae_dir, moved)
    pretrained.diffusers_autoencoder.cache_clear()
    sample = ["num_samples=2", "sampler=ddim", "sampler.steps=2"]
    lost = run_in_process("diffusion-sample", f"ckpt={run}", *sample, f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert lost.returncode == 2 and f"autoencoder.path={vae_dir}" in lost.stderr
    found = run_in_process("diffusion-sample", f"ckpt={run}", *sample, f"autoencoder.path={moved}",
                           f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    resumed = run_in_process("diffusion-train", f"resume={run}", "trainer.max_steps=3", "autoencoder=diffusers",
                             f"autoencoder.path={moved}",
                             cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["autoencoder"]["config"]["path"] == str(moved)
    save_tiny_vae(tmp_path / "other", seed=1)
    other = run_in_process("diffusion-sample", f"ckpt={run}", f"autoencoder.path={tmp_path / 'other'}",
                           f"hydra.run.dir={tmp_path / 'y'}", cwd=tmp_path)
    assert other.returncode == 2 and "holds other weights than the autoencoder" in other.stderr
    no_text = run_in_process("diffusion-sample", f"ckpt={run}", f"text_encoder.path={moved}",
                             f"hydra.run.dir={tmp_path / 'z'}", cwd=tmp_path)
    assert no_text.returncode == 2 and "reads no pretrained text encoder" in no_text.stderr


@pytest.mark.parametrize("args, message", [
    (["autoencoder=diffusers"], "autoencoder=diffusers needs autoencoder.path"),
    (["autoencoder=diffusers", "autoencoder.path={tmp}"], "could not load a diffusers AutoencoderKL"),
    (["autoencoder=diffusers", "autoencoder.path={tmp}", "task=autoencoder"], "is pretrained, not trained here"),
])
def test_bad_pretrained_autoencoder_settings_are_one_line(tmp_path, args, message):
    pytest.importorskip("diffusers")
    result = run_in_process("diffusion-train", "data=gradients", *[a.format(tmp=tmp_path) for a in args],
                            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_the_perceptual_term_adds_lpips_at_every_pixel(monkeypatch, tmp_path):
    pytest.importorskip("lpips")
    from diffusion_cli.models.autoencoder import AutoencoderKL
    from diffusion_cli.autoencoder import autoencoder_loss

    lpips = pretrained.lpips_vgg(random_trunk=True)
    torch.manual_seed(0)
    model, images = AutoencoderKL((1, 16, 16), 8, [1, 2], 1, 4), torch.rand(4, 1, 16, 16) * 2 - 1
    plain = autoencoder_loss(model, images, torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded = model(images, torch.Generator().manual_seed(0))[0]
        distance = lpips(images.repeat(1, 3, 1, 1), decoded.repeat(1, 3, 1, 1)).mean()
    perceptual = autoencoder_loss(model, images, torch.Generator().manual_seed(0), lpips=lpips, perceptual_weight=0.5)
    assert distance > 0 and torch.allclose(perceptual, plain + 0.5 * distance, atol=1e-5)
    # The command trains with it (a random VGG trunk here, offline).
    monkeypatch.setattr(pretrained, "lpips_vgg", lambda: lpips)
    run = tmp_path / "run"
    trained = run_in_process("diffusion-train", "task=autoencoder", "autoencoder=tiny", "autoencoder.perceptual_weight=1",
                             "data=gradients", "data.num_train=64", "data.num_eval=8", "trainer.max_steps=2",
                             "trainer.batch_size=8", "trainer.device=cpu", f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr


def test_lpips_weights_that_cannot_be_downloaded_are_one_line(monkeypatch, tmp_path):
    pytest.importorskip("lpips")
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    pretrained.lpips_vgg.cache_clear()
    result = run_in_process("diffusion-train", "task=autoencoder", "autoencoder=tiny", "autoencoder.perceptual_weight=1",
                            "data=gradients", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "could not load LPIPS's VGG-16 weights" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_clip_score_is_clips_own_cosine_of_each_image_and_its_prompt(tmp_path):
    """Ours equals transformers' CLIPImageProcessor and CLIPModel forward on the same images."""
    from diffusion_cli.metrics import clip_cosines, clip_score

    clip = save_tiny_clip(tmp_path / "clip", full=True)
    images = torch.rand(6, 3, 24, 20, generator=torch.Generator().manual_seed(0))
    prompts = ["a red square", "a blue square", "a cat"] * 2
    model = transformers.CLIPModel.from_pretrained(str(clip)).eval()
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    pixels = processor(list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    tokens = transformers.AutoTokenizer.from_pretrained(str(clip))(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    theirs = (out.image_embeds * out.text_embeds).sum(1)
    ours = clip_cosines(images, prompts, str(clip))
    assert torch.allclose(ours, theirs, atol=0.01)  # PIL's bicubic resize against torch's
    assert not torch.allclose(clip_cosines(images, prompts[::-1], str(clip)), theirs, atol=0.01)
    assert clip_score(images, prompts, str(clip)) == pytest.approx(100 * ours.clamp(min=0).mean().item())


def test_prompt_runs_get_a_clip_score_where_their_clip_is_whole(tmp_path):
    root = shapes_folder(tmp_path / "shapes")
    args = ["data=folder", f"data.path={root}", "data.captions=sidecar", "data.num_eval=2", "data.num_workers=0",
            "text_encoder=clip", "text_encoder.max_length=32", "model=resunet", "model.base_channels=8",
            "model.channel_mults=[1,2]", "schedule.T=10", "trainer.max_steps=2", "trainer.batch_size=4",
            "trainer.num_grid_images=2", "trainer.num_quality_images=4", "trainer.device=cpu"]
    sample = ["prompt=a red square", "num_samples=2", "sampler=ddim", "sampler.steps=2", "eval=true"]
    for full in (True, False):
        clip, run = save_tiny_clip(tmp_path / f"clip{full}", full=full), tmp_path / f"run{full}"
        trained = run_in_process("diffusion-train", *args, f"text_encoder.path={clip}", f"hydra.run.dir={run}",
                                 cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr
        final = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
        sampled = run_in_process("diffusion-sample", f"ckpt={run}", *sample, f"hydra.run.dir={tmp_path / str(full)}",
                                 cwd=tmp_path)
        if full:
            assert 0 <= final["clip_score"] <= 100 and "clip_score" in trained.stdout
            assert sampled.returncode == 0, sampled.stderr
            assert json.loads((tmp_path / "True" / "quality.json").read_text())["clip_score"] >= 0
        else:  # CLIP's text model alone: nothing to score the images with
            assert "clip_score" not in final
            assert sampled.returncode == 2 and "CLIP score needs" in sampled.stderr
            assert len(sampled.stderr.strip().splitlines()) == 1
