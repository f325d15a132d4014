"""diffusion-eval: FID, KID and precision/recall through torch-fidelity, offline (the project's
MNIST classifier as the extractor, through the same code path as Inception's)."""

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY_TRAIN, data_config, run_in_process
from diffusion_cli import fidelity, score
from diffusion_cli.data import make_gradients
from diffusion_cli.images import save_each

torch_fidelity = pytest.importorskip("torch_fidelity")
MNIST = ["extractor=mnist", "kid_subsets=20", "device=cpu"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two sets of the same kind (gradients of 16x16, other seeds) and the first one brightened."""
    root = tmp_path_factory.mktemp("sets")
    first, second = make_gradients(200, (3, 16, 16), seed=0), make_gradients(400, (3, 16, 16), seed=1)
    for name, images in (("first", first), ("second", second), ("brighter", first * 0.5 + 0.5)):
        save_each(images, root / name)
    return {name: root / name for name in ("first", "second", "brighter")}


def evaluate(samples, reference, tmp_path, *extra):
    run = tmp_path / f"eval_{len(list(tmp_path.iterdir()))}"
    result = run_in_process("diffusion-eval", f"samples={samples}", f"reference={reference}", *MNIST, *extra,
                            f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    return json.loads((run / "eval.json").read_text()), result


def test_a_set_against_itself_against_its_kind_and_against_a_shifted_set(folders, tmp_path):
    same, _ = evaluate(folders["first"], folders["first"], tmp_path)
    kind, said = evaluate(folders["first"], folders["second"], tmp_path)
    shifted, _ = evaluate(folders["first"], folders["brighter"], tmp_path)
    # KID's unbiased estimate of a set against itself is -2 (mean k(x, x) - mean k(x, y)) / m: about 0
    assert abs(same["fid"]) < 1e-3 and abs(same["kid_mean"]) < 0.1 * shifted["kid_mean"]
    assert same["precision"] == same["recall"] == 1.0
    assert 0 < kind["fid"] < shifted["fid"] and kind["kid_mean"] < shifted["kid_mean"]
    assert kind["precision"] > shifted["precision"] and kind["recall"] > shifted["recall"]
    # Every result says what it depends on, and FID at small N points to KID.
    assert (kind["num_samples"], kind["num_reference"], kind["extractor"]) == (200, 400, "mnist")
    assert "28x28" in kind["resize"] and str(folders["second"]) in kind["reference"]
    assert "biased upward" in said.stdout + said.stderr


def test_the_numbers_are_torch_fidelity_s_own(folders):
    """The project's path gives what torch-fidelity's calculate_metrics gives on the same images."""
    cfg = OmegaConf.create({"extractor": "mnist", "weights": None, "kid_subsets": 20, "kid_subset_size": 100,
                            "prc_neighborhood": 3, "seed": 0})
    model, layer = fidelity.extractor(cfg, torch.device("cpu"))
    sets = [score.read_images(str(folders[name]), 16, None, cfg)[0] for name in ("first", "second")]
    ours = fidelity.metrics(*[fidelity.features(model, layer, images, 64, torch.device("cpu")) for images in sets], cfg)
    theirs = torch_fidelity.calculate_metrics(
        input1=fidelity.Images(sets[0]), input2=fidelity.Images(sets[1]), feature_extractor="diffusion-cli-mnist",
        fid=True, kid=True, prc=True, kid_subsets=20, kid_subset_size=100, rng_seed=0, cuda=False, cache=False,
        verbose=False, save_cpu_ram=True)
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])


def test_reference_features_are_cached_under_a_key_of_what_they_depend_on(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUSION_CLI_CACHE", str(tmp_path / "cache"))
    first, said = evaluate(folders["first"], folders["second"], tmp_path)
    assert "cache key" in said.stdout and "cached in" in said.stdout
    again, said = evaluate(folders["first"], folders["second"], tmp_path)
    assert "read from" in said.stdout and again["fid"] == first["fid"]
    fewer, said = evaluate(folders["first"], folders["second"], tmp_path, "max_reference=300")
    assert "cached in" in said.stdout  # another N: another key
    (cached,) = [path for path in (tmp_path / "cache" / "fidelity").glob("*.pt")
                 if torch.load(path)["features"].shape[0] == 400]
    by_file, _ = evaluate(folders["first"], cached, tmp_path)
    assert by_file["fid"] == first["fid"]


@pytest.mark.parametrize("args, named", [
    (["extractor=inception", "weights=missing.pth"], "weights=missing.pth is not a file"),
    (["extractor=dinov2", "weights=missing.pth"], "extractor=dinov2 loads from torch.hub's cache only"),
    (["extractor=vgg"], "extractor"),
    (["reference=nowhere", "extractor=mnist"], "neither a folder"),
    (["extractor=mnist", "max_samples=1"], "max_samples"),
])
def test_bad_eval_input_is_one_line(folders, tmp_path, args, named):
    result = run_in_process("diffusion-eval", f"samples={folders['first']}", f"reference={folders['second']}",
                            "device=cpu", *args, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and named in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_inception_weights_that_cannot_be_downloaded_are_one_line_naming_the_file(folders, tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no internet")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", offline)
    result = run_in_process("diffusion-eval", f"samples={folders['first']}", f"reference={folders['second']}",
                            "device=cpu", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and fidelity.INCEPTION_FILE in result.stderr and "weights=PATH" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "run" / "eval.json").exists()


def test_a_missing_extra_is_one_line_naming_it(folders, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    result = run_in_process("diffusion-eval", f"samples={folders['first']}", f"reference={folders['second']}",
                            f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode == 2 and "pip install 'diffusion-cli[eval]'" in result.stderr


FOLDER_RUN = [*TINY_TRAIN, "data=folder", "data.height=16", "data.width=16", "data.num_workers=0",
              "trainer.num_quality_images=32"]


def test_training_logs_fid_and_kid_on_folder_data_stating_n(folders, tmp_path):
    run = tmp_path / "run"
    result = run_in_process("diffusion-train", *FOLDER_RUN, f"data.path={folders['first']}",
                            "trainer.quality_extractor=mnist", "trainer.max_steps=1", f"hydra.run.dir={run}",
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["fid"] > 0 and final["kid_mean"] != 0 and 0 <= final["precision"] <= 1
    assert "of 32 samples by mnist features" in result.stdout and "vs 32 training images" in result.stdout
    assert "FID/KID: mnist features" in result.stdout  # the last line says what they compare


def test_training_s_fidelity_of_its_own_reference_images_is_perfect(folders):
    images = score.read_images(str(folders["first"]), 16, None, OmegaConf.create({"seed": 0}))[0]
    check = fidelity.Fidelity("mnist", None, images, count=50, seed=0, device=torch.device("cpu"))
    same = check(images[fidelity.chosen(len(images), 50, 0)].float() / 255)
    assert abs(same["fid"]) < 1e-3 and same["precision"] == same["recall"] == 1.0
    assert check(images[:50].float() / 255 * 0.5)["fid"] > 1


def test_auto_measures_folders_with_inception_only_where_its_weights_are(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    tc = OmegaConf.create({"num_quality_images": 256, "quality_extractor": "auto", "quality_weights": None})
    folder, mnist = data_config("folder"), data_config("mnist")
    assert fidelity.training_extractor(tc, folder) is None
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / fidelity.INCEPTION_FILE).touch()
    assert fidelity.training_extractor(tc, folder) == "inception"
    assert fidelity.training_extractor(tc, mnist) is None  # it has its own metrics
    assert fidelity.training_extractor(OmegaConf.merge(tc, {"quality_extractor": "mnist"}), mnist) == "mnist"
    assert fidelity.training_extractor(OmegaConf.merge(tc, {"num_quality_images": 0}), folder) is None


def test_training_without_fidelity_says_why_and_missing_weights_stop_it_before_training(folders, tmp_path):
    said = run_in_process("diffusion-train", *FOLDER_RUN, f"data.path={folders['first']}", "trainer.max_steps=1",
                          f"hydra.run.dir={tmp_path / 'plain'}", cwd=tmp_path)
    assert said.returncode == 0 and "FID/KID during training need" in said.stdout
    assert "fid" not in (tmp_path / "plain" / "metrics.jsonl").read_text()
    run = tmp_path / "run"
    result = run_in_process("diffusion-train", *FOLDER_RUN, f"data.path={folders['first']}",
                            "trainer.quality_extractor=inception", "trainer.quality_weights=missing.pth",
                            f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 2 and "trainer.quality_weights=missing.pth is not a file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (run / "checkpoints").exists()
