"""Contract tests that walk the registries: every model (each as debug=fast builds it), both
spaces, every condition, every text encoder and every dataset under one set of rules."""

import pytest
import torch
from omegaconf import OmegaConf

from diffusion_cli.conditions import Captions, ClassLabels, Unconditional, condition_of
from diffusion_cli.data import DATASETS, class_names, load_data
from diffusion_cli.models import MODELS, TEXT_MODELS, build_model
from diffusion_cli.models.autoencoder import AutoencoderKL
from diffusion_cli.models.text_encoder import ENCODERS, PAD
from diffusion_cli.spaces import LatentSpace, PixelSpace

SHAPE = (1, 8, 8)
TEXT = {"kind": "tiny", "width": 16, "depth": 1, "heads": 2, "max_length": 16}


def model_config(kind: str, num_classes: int = 0):
    """The model group's option `kind` under debug=fast, as diffusion-train composes it."""
    from hydra import compose, initialize_config_module

    import diffusion_cli.config  # noqa: F401  registers the schemas

    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"model={kind}", "debug=fast", f"model.num_classes={num_classes}"])
    return cfg.model


def built(kind: str, num_classes: int = 0, text: dict | None = None):
    """The model, its weights jittered: zero-initialised output layers would hide every input."""
    torch.manual_seed(0)
    model = build_model(model_config(kind, num_classes), SHAPE, text).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_maps_x_t_and_t_to_its_prediction_of_the_same_shape(kind):
    model = built(kind)
    x, t = torch.randn(3, *SHAPE), torch.tensor([0, 5, 9])
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == x.shape and torch.isfinite(out).all()
        assert model.prediction in ("eps", "x0", "v")
        # per sample: a batch of one gives what the batch gave it
        torch.testing.assert_close(model(x[1:2], t[1:2]), out[1:2], atol=1e-5, rtol=1e-4)
        with pytest.raises(ValueError):
            model(x, t, torch.tensor([1, 2, 3]))  # no classes: a label is refused
    assert type(condition_of(model)) is Unconditional


@pytest.mark.parametrize("kind", list(MODELS))
def test_class_conditional_models_take_labels_and_the_null_label(kind):
    model = built(kind, num_classes=3)
    x, t = torch.randn(2, *SHAPE), torch.tensor([4, 4])
    condition = condition_of(model)
    assert type(condition) is ClassLabels and condition.labelled
    labels = torch.tensor([0, 2])
    cond, null = condition.pair(labels)
    with torch.no_grad():
        assert torch.equal(null, torch.tensor([3, 3]))
        assert not torch.allclose(model(x, t, cond), model(x, t, torch.tensor([1, 1])))
        torch.testing.assert_close(model(x, t, null), model(x, t))  # no label: the null label


@pytest.mark.parametrize("kind", TEXT_MODELS)
def test_text_models_take_tokens_and_the_empty_caption(kind):
    model = built(kind, text=TEXT)
    condition = condition_of(model, OmegaConf.create({"captions": "auto"}))
    assert type(condition) is Captions and condition.labelled
    tokens = condition.tokens(["a cat", "a long caption of a dog"])
    cond, null = condition.pair(tokens)
    assert cond.shape == null.shape and (null[:, 1:] == PAD).all()
    x, t = torch.randn(2, *SHAPE), torch.tensor([3, 3])
    with torch.no_grad():
        torch.testing.assert_close(model(x, t, null), model(x, t), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", [kind for kind in MODELS if kind not in TEXT_MODELS])
def test_models_without_cross_attention_refuse_captions(kind):
    with pytest.raises(Exception, match="captions"):
        build_model(model_config(kind), SHAPE, TEXT)


@pytest.mark.parametrize("kind", list(ENCODERS))
def test_every_text_encoder_pads_with_pad_and_ignores_padding(kind):
    if kind == "clip":
        pytest.importorskip("transformers")
        from test_pretrained import save_tiny_clip
        import tempfile
        from pathlib import Path

        options = {"path": str(save_tiny_clip(Path(tempfile.mkdtemp()) / "clip")), "max_length": 16}
    else:
        options = {key: value for key, value in TEXT.items() if key != "kind"}
    torch.manual_seed(0)
    encoder = ENCODERS[kind](**options).eval()
    tokens, _ = encoder.tokenizer(["a cat", ""])
    assert tokens.dtype == torch.long and tokens.shape == (2, options["max_length"])
    assert (tokens[1] != PAD).sum() < (tokens[0] != PAD).sum()
    with torch.no_grad():
        embeddings, mask = encoder(tokens)
        short, _ = encoder(tokens[:, : int((tokens != PAD).sum(1).max())])
    assert embeddings.shape[:2] == tokens.shape and torch.equal(mask, tokens != PAD)
    torch.testing.assert_close(short, embeddings[:, : short.shape[1]], atol=1e-5, rtol=1e-4)


def spaces():
    torch.manual_seed(0)
    model = AutoencoderKL(SHAPE, base_channels=8, channel_mults=[1, 2], num_res_blocks=1, z_channels=4)
    latent = LatentSpace(model, {"kind": "kl", "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                                 "z_channels": 4}, SHAPE, {"scale": 2.0, "shift": [0.1] * 4}, "test")
    return [PixelSpace(SHAPE), latent]


@pytest.mark.parametrize("space", spaces(), ids=["pixel", "latent"])
def test_every_space_encodes_decodes_and_round_trips_its_state(space):
    images = torch.rand(3, *SHAPE) * 2 - 1
    x = space.encode(images)
    assert x.shape == (3, *space.shape)
    assert space.decode(x).shape == images.shape
    assert space.held_out(images, 2).shape == x.shape
    torch.testing.assert_close(space.held_out(images, 2), x)  # batched as one
    state = space.state()
    if state is None:
        assert space.clip and torch.equal(space.decode(x), images)
    else:
        again = LatentSpace.from_state(state)
        assert not space.clip and again.shape == space.shape
        torch.testing.assert_close(again.encode(images), x)


@pytest.mark.parametrize("condition", [Unconditional(), ClassLabels(3, ["a", "b", "c"])], ids=["none", "labels"])
def test_every_condition_draws_rows_and_turns_and_refuses_what_it_cannot_draw(condition):
    rows, each = condition.rows(7), condition.each(7)
    if condition.labelled:
        assert rows.conditions.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and rows.titles == ["a", "b", "c"]
        assert each.conditions.tolist() == [0, 1, 2, 0, 1, 2, 0]
    else:
        assert rows.conditions is None and each.conditions is None
    request = OmegaConf.create({"label": None, "prompt": "a cat", "prompts_file": None, "negative_prompt": None,
                                "guidance_scale": 1.0, "nrow": 0, "num_samples": 4, "ckpt": "RUN", "eval": False})
    with pytest.raises(Exception, match="prompt= needs a model trained on captions"):
        condition.requested(request)


def dataset_config(kind: str, tmp_path):
    """data=kind with a few images: a folder of PNG gradients for data=folder; the torchvision sets
    where their files lie in $DIFFUSION_CLI_DATA (none can be downloaded here)."""
    import os

    from conftest import data_config
    from diffusion_cli.bench.data import write_gradient_pngs

    values = {"num_train": 24, "num_eval": 8}
    if kind == "folder":
        values.update(path=str(write_gradient_pngs(tmp_path / "pngs", 32, 8)), image_size=8, height=8, width=8,
                      num_workers=0)
    elif kind != "gradients":
        folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py"}[kind]
        if not os.path.isdir(os.path.join(os.environ["DIFFUSION_CLI_DATA"], folder)):
            pytest.skip(f"no {folder} in $DIFFUSION_CLI_DATA")
        values["download"] = False
    return data_config(kind, **values)


@pytest.mark.parametrize("kind", list(DATASETS))
def test_every_dataset_gives_images_of_its_shape_in_range_and_the_same_each_time(kind, tmp_path):
    cfg = dataset_config(kind, tmp_path)
    train, held_out = load_data(cfg)
    shape = (cfg.channels, cfg.height, cfg.width)
    assert tuple(train.images.shape[1:]) == shape and tuple(held_out.images.shape[1:]) == shape
    assert 0 < len(train.images) <= 24 and 0 < len(held_out.images) <= 8
    assert train.images.dtype == torch.uint8 or 0 <= train.images.min() <= train.images.max() <= 1  # as stored
    assert held_out.images.dtype == torch.float32 and -1 <= held_out.images.min() <= held_out.images.max() <= 1
    classes = class_names(cfg)
    for split in (train, held_out):  # labels: one class index per image, where the data has classes
        assert (split.labels is None) == (not classes)
        if classes:
            assert len(split.labels) == len(split.images) and 0 <= split.labels.min() <= split.labels.max() < len(classes)
    again, _ = load_data(cfg)
    assert torch.equal(again.images, train.images)
