"""Your own images (data=folder), the torchvision sets, streaming from the row cache, and the
models for them (DiT, the ResUNet presets)."""

import json
import logging
import urllib.request
import zlib

import numpy
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import TINY_TRAIN, data_config, run_in_process
from diffusion_cli.data import DATASETS, load_data, to_model_range
from diffusion_cli.metrics import QUALITY_METRICS
from diffusion_cli.data.batches import EpochShards
from diffusion_cli.data.folder import decode
from diffusion_cli.errors import UserError
from diffusion_cli.models import build_model

TINY = [*TINY_TRAIN, "model=resunet", "model.channel_mults=[1,2]", "data.image_size=16", "data.num_eval=4",
        "data.num_workers=0"]


def write_image(path, color, size=(24, 20), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = torch.randint(0, 40, (size[1], size[0], 3), generator=torch.Generator().manual_seed(zlib.crc32(str(path).encode())))
    Image.fromarray((pixels + torch.tensor(color)).byte().numpy()).save(path, format=fmt)


@pytest.fixture
def two_classes(tmp_path):
    """cat/ (PNG, reds) and dog/ (JPEG in a nested folder, blues), and one file that is no image."""
    root = tmp_path / "pets"
    for i in range(10):
        write_image(root / "cat" / f"{i}.png", (200, 20, 20))
        write_image(root / "dog" / "inside" / f"{i}.jpg", (20, 20, 200))
    (root / "cat" / "broken.png").write_bytes(b"not an image")
    return root


def test_a_folder_trains_and_samples_by_class_name(two_classes, tmp_path, caplog):
    run = tmp_path / "run"
    trained = run_in_process("diffusion-train", "data=folder", f"data.path={two_classes}",
                             "data.labels=subfolders", "model.num_classes=2", *TINY,
                             f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    log = (run / "train.log").read_text()
    assert "skipped 1 of 21 files" in log and "broken.png" in log  # one warning, no crash
    assert "16 training images" in log  # 20 readable, 4 held out
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["data"]["classes"] == ["cat", "dog"]

    for label in ("dog", "1"):
        sampled = run_in_process("diffusion-sample", f"ckpt={run}", f"label={label}", "num_samples=3",
                                 "save_images=true", f"hydra.run.dir={tmp_path / label}", cwd=tmp_path)
        assert sampled.returncode == 0, sampled.stderr
        pngs = sorted((tmp_path / label / "images").iterdir())
        assert [p.name for p in pngs] == ["000000.png", "000001.png", "000002.png"]
        assert Image.open(pngs[0]).size == (16, 16)
        saved = torch.load(tmp_path / label / "samples.pt")
        assert torch.equal(torch.from_numpy(numpy.array(Image.open(pngs[1]))).permute(2, 0, 1),
                           (saved[1] * 255).round().byte())  # the PNG holds the sample itself
    assert torch.equal(torch.load(tmp_path / "dog" / "samples.pt"), torch.load(tmp_path / "1" / "samples.pt"))

    titled = run_in_process("diffusion-sample", f"ckpt={run}", "label=all", "num_samples=4",
                            f"hydra.run.dir={tmp_path / 'all'}", cwd=tmp_path)
    untitled = run_in_process("diffusion-sample", f"ckpt={run}", "label=0", "num_samples=4", "nrow=2",
                              f"hydra.run.dir={tmp_path / 'zero'}", cwd=tmp_path)
    assert titled.returncode == untitled.returncode == 0
    wider = Image.open(tmp_path / "all" / "samples.png").width - Image.open(tmp_path / "zero" / "samples.png").width
    assert wider > 10  # the margin with the row titles
    wrong = run_in_process("diffusion-sample", f"ckpt={run}", "label=bird", f"hydra.run.dir={tmp_path / 'x'}",
                           cwd=tmp_path)
    assert wrong.returncode == 2 and "cat, dog" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.parametrize("make, num_eval, message", [
    (lambda root: None, "auto", "is not a folder"),
    (lambda root: root.mkdir(), "auto", "holds no images"),
    (lambda root: (root.mkdir(), (root / "a.png").write_bytes(b"junk")), "auto", "none of its 1 image files"),
    (lambda root: write_image(root / "a.png", (0, 0, 0)), 1, "lower data.num_eval (or leave it at auto)"),
    (lambda root: (write_image(root / "a.png", (0, 0, 0)), (root / "b.png").write_bytes(b"junk")), 1,
     "has 1 readable images"),
])
def test_bad_folders_are_one_line_errors(tmp_path, make, num_eval, message):
    make(tmp_path / "images")
    cfg = data_config("folder", path=str(tmp_path / "images"), num_eval=num_eval)
    with pytest.raises(UserError) as error:
        load_data(cfg)
    assert message in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("count, held", [(240, 24), (3000, 256), (15, 1), (2, 1)])
def test_auto_holds_out_a_tenth_between_one_and_256(tmp_path, count, held, caplog):
    for i in range(count):
        write_image(tmp_path / f"{i}.png", (i % 256, 0, 0), size=(4, 4))
    with caplog.at_level(logging.INFO):
        train, evaluation = load_data(data_config("folder", path=str(tmp_path), image_size=4, num_workers=0))
    assert (len(train.images), len(evaluation.images)) == (count - held, held)
    assert f"data.num_eval=auto: {held:,} of {count:,} images" in caplog.text  # the number used, stated
    assert ("will memorise" in caplog.text) == (count <= 20)


def test_a_single_image_trains_and_is_evaluated_on_itself(tmp_path, caplog):
    write_image(tmp_path / "me.png", (90, 10, 10), size=(8, 8))
    with caplog.at_level(logging.INFO):
        train, evaluation = load_data(data_config("folder", path=str(tmp_path), image_size=8, num_workers=0))
    assert torch.equal(to_model_range(train.images), evaluation.images) and len(train.images) == 1
    assert "none held out" in caplog.text and "has 1 image: the model will memorise it" in caplog.text


def test_loose_images_with_subfolder_labels_are_refused(two_classes):
    write_image(two_classes / "loose.png", (0, 0, 0))
    with pytest.raises(UserError, match="lie directly in"):
        load_data(data_config("folder", path=str(two_classes), labels="subfolders"))


def test_images_are_resized_by_the_shorter_side_and_center_cropped(tmp_path):
    # 40 wide, 20 high: left quarter black, middle half white, right quarter black.
    pixels = torch.zeros(20, 40, 3, dtype=torch.uint8)
    pixels[:, 10:30] = 255
    Image.fromarray(pixels.numpy()).save(tmp_path / "wide.png")
    image = decode(tmp_path / "wide.png", 10, 3)
    assert image.shape == (3, 10, 10) and image.dtype == torch.uint8
    # The center crop is the white half (antialiasing greys only its outermost columns a little).
    assert image[:, :, 1:-1].min() == 255 and image.min() > 200
    gray = decode(tmp_path / "wide.png", 10, 1)
    assert gray.shape == (1, 10, 10)


def test_png_images_at_their_own_size_are_read_losslessly(tmp_path):
    pixels = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    assert torch.equal(decode(tmp_path / "x.png", 32, 3), pixels)


def test_the_cache_is_decoded_once_and_split_the_same_way(two_classes, caplog):
    cfg = data_config("folder", path=str(two_classes), num_eval=4, num_workers=0)
    with caplog.at_level(logging.INFO):
        first_train, first_eval = load_data(cfg)
        assert "decoding" in caplog.text
        caplog.clear()
        train, evaluation = load_data(cfg)
        assert "decoding" not in caplog.text
    assert torch.equal(train.images, first_train.images) and torch.equal(evaluation.images, first_eval.images)
    assert train.images.dtype == torch.uint8 and len(train.images) == 16 and len(evaluation.images) == 4
    held_out = {tuple(img.flatten().tolist()) for img in evaluation.images}
    assert not held_out & {tuple(to_model_range(img).flatten().tolist()) for img in train.images}
    write_image(two_classes / "cat" / "new.png", (200, 20, 20))  # a changed folder is decoded again
    with caplog.at_level(logging.INFO):
        load_data(cfg)
    assert "decoding" in caplog.text


def test_streamed_batches_are_the_in_memory_images(two_classes):
    streamed, _ = load_data(data_config("folder", path=str(two_classes), num_eval=4, in_memory=False))
    in_memory, _ = load_data(data_config("folder", path=str(two_classes), num_eval=4, in_memory=True))
    from diffusion_cli.data.rows import RowReader
    images, labels = RowReader(streamed.images, None)[list(range(len(streamed.images)))]
    assert torch.equal(images, in_memory.images) and labels is None


def test_epoch_shards_cover_each_epoch_once_and_resume_mid_stream():
    n, batch = 50, 8
    ranks = [EpochShards(n, batch, seed=3, rank=r, world_size=2) for r in range(2)]
    streams = [iter(sampler) for sampler in ranks]
    first_epoch = [sum((next(s) for _ in range(3)), []) for s in streams]  # 24 of each rank's 25
    assert not set(first_epoch[0]) & set(first_epoch[1])  # disjoint shards
    straight = iter(EpochShards(n, batch, seed=3))
    batches = [next(straight) for _ in range(20)]  # crosses several epochs
    assert sorted(sum(batches[:7], [])[:50]) == list(range(50))  # every image once per epoch
    resumed = iter(EpochShards(n, batch, seed=3, start_step=7))
    assert [next(resumed) for _ in range(13)] == batches[7:]


@pytest.mark.parametrize("kind, folder", [("cifar10", "cifar-10-batches-py"), ("fashion_mnist", "FashionMNIST/raw")])
@pytest.mark.parametrize("download", [False, True])
def test_torchvision_sets_offline_are_one_line_errors(tmp_path, monkeypatch, kind, folder, download):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError) as error:
        load_data(data_config(kind, root=str(tmp_path / "nowhere"), download=download))
    message = str(error.value)
    assert f"{tmp_path / 'nowhere'}/{folder}" in message and "\n" not in message


@pytest.mark.parametrize("position", ["learned", "sinusoidal"])
def test_dit_maps_images_to_images_and_takes_labels(position):
    torch.manual_seed(0)
    cfg = data_config("gradients", height=8, width=12)
    model = build_model(OmegaConf.create(dict(
        kind="dit", num_classes=3, patch_size=2, width=32, depth=2, heads=4,
        position=position)), cfg)
    x, t = torch.randn(5, 3, 8, 12), torch.randint(0, 100, (5,))
    assert model(x, t).abs().max() == 0  # adaLN-Zero: the output layer starts at zero
    for parameter in model.parameters():  # any weights: the shapes and the conditioning
        torch.nn.init.normal_(parameter, std=0.1)
    out = model(x, t, torch.tensor([0, 1, 2, 0, 1]))
    assert out.shape == x.shape
    assert not torch.equal(out, model(x, t, torch.tensor([1, 1, 2, 0, 1])))
    # Patches come back where they were: changing one patch of x changes the output there most.
    y = x.clone()
    y[:, :, :2, :2] += 1
    change = (model(y, t) - model(x, t)).abs().sum((0, 1))
    assert change[:2, :2].mean() > change[4:, 6:].mean()


def test_resunet_presets_build_for_their_image_sizes():
    from hydra import compose, initialize_config_module
    import diffusion_cli.config  # noqa: F401

    for preset, size in (("resunet32", 32), ("resunet64", 64)):
        with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
            cfg = compose("train", overrides=["data=folder", f"model={preset}", f"data.image_size={size}"])
        model = build_model(cfg.model, cfg.data)
        attention = [name for name, m in model.named_modules() if type(m).__name__ == "Attention"]
        assert any(name.startswith("down.") for name in attention) and len(attention) > 2
        assert model(torch.randn(2, 3, size, size), torch.tensor([0, 5])).shape == (2, 3, size, size)


def test_dit_trains_on_gradients_and_samples(tmp_path):
    run = tmp_path / "run"
    trained = run_in_process("diffusion-train", "model=dit", "model.width=32", "model.depth=2", "schedule.T=10",
                             "trainer.max_steps=30", "trainer.batch_size=32", "trainer.eval_every=10",
                             "trainer.num_quality_images=0", "trainer.num_grid_images=4", "trainer.device=cpu",
                             "data.num_train=256", "data.num_eval=32", f"hydra.run.dir={run}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    losses = [json.loads(line)["eval_loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if "eval_loss" in line]
    assert losses[-1] < losses[0]  # it learns
    sampled = run_in_process("diffusion-sample", f"ckpt={run}", "num_samples=4", f"hydra.run.dir={tmp_path / 's'}",
                             cwd=tmp_path)
    assert sampled.returncode == 0 and torch.load(tmp_path / "s" / "samples.pt").shape == (4, 3, 16, 16)


@pytest.mark.parametrize("kind", sorted(DATASETS))
def test_every_registered_dataset_has_a_config_that_fits_its_row(kind):
    cfg, row = data_config(kind), DATASETS[kind]
    assert cfg.kind == kind
    if row.shape:
        assert (cfg.channels, cfg.height, cfg.width) == row.shape
    if kind != "folder":  # the folder's classes come from its subfolders
        names = row.classes(cfg)
        assert len(set(names)) == len(names) and all(isinstance(name, str) for name in names)
    assert row.quality is None or row.quality in QUALITY_METRICS
