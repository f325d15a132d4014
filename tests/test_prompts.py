"""Text conditioning: the byte tokenizer, cross-attention and its padding mask, guidance on
prompts, captions made from class names, caption draws and dropout, and the two commands on
captioned data (a folder of captions, MNIST's class names)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY_TRAIN, data_config, has_mnist, run_in_process
from diffusion_cli.data import load_data
from diffusion_cli.data.captions import CaptionTable, label_captions
from diffusion_cli.errors import UserError
from diffusion_cli.conditions import condition_of
from diffusion_cli.models import build_model
from diffusion_cli.models.text_encoder import PAD, ByteTokenizer
from diffusion_cli.objectives import objective
from diffusion_cli.prompts import prompt_classes
from diffusion_cli.guidance import guided
from diffusion_cli.schedule import NoiseSchedule

TEXT = {"kind": "tiny", "width": 16, "depth": 1, "heads": 2, "max_length": 24}
MODELS = {
    "resunet": dict(kind="resunet", base_channels=8, channel_mults=[1, 2], num_res_blocks=1, attention=True,
                    dropout=0.0, num_classes=0, attention_resolutions=[],
                    cross_attention_resolutions=None),
    "dit": dict(kind="dit", patch_size=4, width=16, depth=2, heads=2, position="learned",
                num_classes=0),
}
SHAPE = OmegaConf.create({"channels": 3, "height": 8, "width": 8})


def text_model(kind: str, cross_attention_only: bool = False):
    """A tiny text-conditioned model; with cross_attention_only the caption reaches it through
    cross-attention alone (the pooled path zeroed, the zero-initialised outputs made random)."""
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(MODELS[kind]), SHAPE, TEXT).eval()
    if cross_attention_only:
        torch.nn.init.zeros_(model.text.pooled.weight)
        torch.nn.init.zeros_(model.text.pooled.bias)
        for name, parameter in model.named_parameters():
            if ".cross.out." in name or name.startswith(("out.", "final")) or "modulation" in name \
                    or "conv2" in name:
                torch.nn.init.normal_(parameter, std=0.2)
    return model


def test_the_tokenizer_writes_utf8_bytes_after_a_start_token_and_counts_cut_captions():
    tokens, truncated = ByteTokenizer(6)(["", "ab", "é", "abcdefgh"])
    assert tokens.tolist() == [[256, PAD, PAD, PAD, PAD, PAD],
                               [256, 97, 98, PAD, PAD, PAD],
                               [256, 0xC3, 0xA9, PAD, PAD, PAD],
                               [256, 97, 98, 99, 100, 101]]
    assert truncated == 1
    with pytest.raises(ValueError, match="max_length"):
        ByteTokenizer(1)


@pytest.mark.parametrize("kind", MODELS)
def test_cross_attention_ignores_padding_and_follows_the_prompt(kind):
    model = text_model(kind, cross_attention_only=True)
    x, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    tokens = model.text.encoder.tokenizer(["a red square", "blue"])[0]
    with torch.no_grad():
        output = model(x, t, tokens)
        assert torch.allclose(model(x, t, tokens[:, :14]), output, atol=1e-5)  # less padding: the same
        other = model(x, t, model.text.encoder.tokenizer(["a red circle", "blue"])[0])
    assert not torch.allclose(other[0], output[0], atol=1e-3)   # another prompt: another output
    assert torch.allclose(other[1], output[1], atol=1e-5)       # per sample
    assert model.text.pooled.weight.abs().sum() == 0            # it came through cross-attention


@pytest.mark.parametrize("kind", MODELS)
def test_guidance_on_prompts_mixes_the_conditional_and_the_empty_or_negative_prompt(kind):
    model = text_model(kind)
    tokens = model.text.encoder.tokenizer(["seven", "three"])[0]
    negative = model.text.encoder.tokenizer(["one", "one"])[0]
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 5])
    pair = condition_of(model).pair  # the prompt beside the empty caption, or the negative prompt
    with torch.no_grad():
        conditional, empty, one = model(x, t, tokens), model(x, t, pair(tokens)[1]), model(x, t, negative)
        assert torch.equal(guided(model, tokens, scale=1.0)(x, t), conditional)
        assert torch.allclose(guided(model, *pair(tokens), scale=0.0)(x, t), empty, atol=1e-5)
        assert torch.allclose(model(x, t), empty, atol=1e-6)  # no condition: the empty caption
        assert torch.allclose(guided(model, *pair(tokens), scale=3.0)(x, t), empty + 3 * (conditional - empty), atol=1e-4)
        assert torch.allclose(guided(model, *pair(tokens, negative), scale=3.0)(x, t), one + 3 * (conditional - one),
                              atol=1e-4)


def test_caption_dropout_trains_on_the_empty_caption():
    seen = []

    class Spy(torch.nn.Module):
        num_classes, prediction = 0, "eps"

        def forward(self, x, t, cond):
            seen.append(cond)
            return torch.zeros_like(x)

    tokens = ByteTokenizer(8)(["seven"] * 4000)[0]
    null = ByteTokenizer(8)([""])[0]
    objective("eps").loss(Spy(), NoiseSchedule(T=10), torch.zeros(4000, 1, 2, 2), torch.Generator().manual_seed(0),
                          tokens, drop_prob=0.1, null=null)
    dropped = (seen[0] == null).all(1)
    assert ((seen[0][~dropped] == tokens[0]).all(1)).all()   # the others keep their caption
    assert abs(dropped.float().mean().item() - 0.1) < 0.015


def test_caption_draws_come_from_each_images_own_group():
    groups = [["zero", "0"], ["one"], ["two", "2", "a two"]]
    table = CaptionTable(groups, lambda captions: ByteTokenizer(8)(captions)[0], "cpu")
    images = torch.tensor([0, 1, 2] * 300)
    drawn = table.draw(images, torch.Generator().manual_seed(0))
    text = [bytes(v for v in row.tolist() if 0 <= v < 256).decode() for row in drawn]
    for group, options in enumerate(groups):
        assert {caption for image, caption in zip(images.tolist(), text) if image == group} == set(options)
    assert table.first(torch.tensor([2, 0])).tolist() == ByteTokenizer(8)(["two", "zero"])[0].tolist()


def test_label_captions_use_every_template_and_keep_the_held_out_one_apart():
    cfg = data_config("mnist", captions="labels")
    captions = label_captions(cfg, [str(d) for d in range(10)])
    assert captions[7][:3] == ["seven", "7", "a handwritten seven"]
    assert "a drawing of the number seven" not in captions[7]
    assert prompt_classes(["seven", "the digit 3", "a drawing of the number two"], cfg).tolist() == [7, 3, 2]
    assert prompt_classes(["a seven", "seven"], cfg) is None  # a phrasing of no template
    cfg.caption_templates = ["{digit}"]
    with pytest.raises(UserError, match="placeholder"):
        label_captions(cfg, ["7"])


@pytest.fixture
def captioned_folder(tmp_path):
    """12 images with a metadata.jsonl; image 11 has no caption."""
    root = tmp_path / "shapes"
    root.mkdir()
    rows = []
    for i in range(12):
        color = (200, 30, 30) if i % 2 else (30, 30, 200)
        Image.new("RGB", (12, 12), color).save(root / f"{i:02d}.png")
        if i < 11:
            rows.append({"file_name": f"{i:02d}.png", "text": ["a red square", "red"] if i % 2 else "a blue square"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.mark.parametrize("missing, trained", [("empty", 10), ("skip", 9)])
def test_a_folder_missing_a_caption_says_so_and_skips_or_keeps_it(captioned_folder, caplog, missing, trained):
    cfg = data_config("folder", path=str(captioned_folder), captions="auto", missing_captions=missing,
                      image_size=8, num_eval=2, num_workers=0)
    with caplog.at_level("WARNING"):
        train, evaluation = load_data(cfg)
    assert "1 of 12 images have no caption" in caplog.text
    assert len(train.labels) + len(evaluation.labels) == trained + 2
    captions = [train.captions[group] for group in train.labels.tolist()]
    assert ([""] in captions) == (missing == "empty")
    assert ["a red square", "red"] in captions and ["a blue square"] in captions


TINY_TEXT = [*TINY_TRAIN, "model=resunet", "model.channel_mults=[1,2]"]


def test_a_captioned_folder_trains_and_samples_prompts(captioned_folder, tmp_path):
    run = tmp_path / "run"
    trained = run_in_process("diffusion-train", "data=folder", f"data.path={captioned_folder}",
                             "data.captions=jsonl", "data.image_size=8", "data.num_eval=2",
                             "data.num_workers=0", *TINY_TEXT, f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert (run / "samples" / "step_0000006.png").is_file() and (run / "denoising.png").is_file()
    out = tmp_path / "out"
    sampled = run_in_process("diffusion-sample", f"ckpt={run}", 'prompt=["a red square","a blue square"]',
                             "guidance_scale=3", "num_samples=4", "save_images=true", "sampler=ddim",
                             "sampler.steps=3", f"hydra.run.dir={out}", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["a red square"] * 2 + ["a blue square"] * 2
    assert [row["file_name"] for row in rows] == [f"images/{i:06d}.png" for i in range(4)]
    assert len({row["seed"] for row in rows}) == 4 and rows[0]["guidance_scale"] == 3.0

    def images(*args):
        directory = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        result = run_in_process("diffusion-sample", f"ckpt={run}", "num_samples=2", "sampler=ddim",
                                "sampler.steps=3", *args, f"hydra.run.dir={directory}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return torch.load(directory / "samples.pt")
    wrong = run_in_process("diffusion-sample", f"ckpt={run}", "label=1", f"hydra.run.dir={tmp_path / 'x'}",
                           cwd=tmp_path)
    assert wrong.returncode == 2 and "was trained on captions: use prompt=" in wrong.stderr
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red square\n\n")
    assert torch.equal(images("prompt=a red square"), images(f"prompts_file={prompts_file}"))
    assert not torch.equal(images("prompt=a red square", "guidance_scale=3"),
                           images("prompt=a red square", "guidance_scale=3", "negative_prompt=red"))


@pytest.mark.slow
@pytest.mark.skipif(not has_mnist(), reason="no MNIST beside the checkout")
def test_mnist_captions_from_class_names_resume_exactly(tmp_path):
    args = ["data=mnist", "data.captions=labels", "debug=fast", "trainer.num_quality_images=0",
            "trainer.lr_schedule=constant"]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert run_in_process("diffusion-train", *args, f"hydra.run.dir={whole}", cwd=tmp_path).returncode == 0
    assert run_in_process("diffusion-train", *args, "trainer.max_steps=3",
                          f"hydra.run.dir={part}", cwd=tmp_path).returncode == 0
    resumed = run_in_process("diffusion-train", f"resume={part}", "trainer.max_steps=6", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a, b = (torch.load(run / "checkpoints" / "last.pt", weights_only=True) for run in (whole, part))
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert any(key.startswith("text.encoder.") for key in a["model"])  # the text encoder trained with it


@pytest.mark.parametrize("args, message", [
    (["model=mlp"], "needs a model that attends to text"),
    (["model.num_classes=10"], "choose one"),
    (["data.captions=sidecar"], "reads a folder's caption files"),
    (["data.caption_dropout=0.2"], "data.caption_dropout is now trainer.cond_drop_prob"),
])
def test_bad_caption_settings_are_one_line_errors(tmp_path, args, message):
    result = run_in_process("diffusion-train", "data=mnist", "data.captions=labels", *args,
                            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_prompts_and_labels_go_to_the_models_that_take_them(trained_run, tmp_path):
    result = run_in_process("diffusion-sample", f"ckpt={trained_run}", "prompt=seven",
                            f"hydra.run.dir={tmp_path / 'x'}", cwd=tmp_path)
    assert result.returncode == 2 and "needs a model trained on captions" in result.stderr
