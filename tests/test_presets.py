"""The experiment presets and debug=fast: every preset composes and runs (tiny, through
debug=fast), and debug=fast writes every periodic output."""

import json
from pathlib import Path

import pytest

from conftest import has_mnist, run_in_process
from diffusion_cli.bench.data import write_gradient_pngs

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml"))
# The fast tier runs one preset; CI runs them all.
FAST = "mnist_10min"


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    return write_gradient_pngs(tmp_path_factory.mktemp("pngs") / "images", 96, 64)


def test_the_presets_are_there():
    assert {"mnist_10min", "mnist_cond", "mnist_prompts", "folder_32", "folder_64", "cifar10"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", [pytest.param(name, marks=[] if name == FAST else pytest.mark.slow)
                                        for name in EXPERIMENTS])
def test_each_preset_runs_under_debug_fast(experiment, pngs, tmp_path):
    data = []
    if experiment.startswith("mnist") and not has_mnist():
        pytest.skip("no MNIST beside the checkout")
    if experiment.startswith("folder"):
        data = [f"data.path={pngs}"]
    if experiment == "cifar10":  # CIFAR-10 can't be downloaded here: its model and trainer on a folder
        data = ["data=folder", f"data.path={pngs}"]
    run_dir = tmp_path / "run"
    result = run_in_process("diffusion-train", f"experiment={experiment}", "debug=fast", *data,
                            "trainer.device=cpu", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "max_steps: 6" in config and "base_channels: 8" in config  # debug=fast's tiny model
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 3, 4, 6]
    for output in ("samples/step_0000003.png", "reconstructions/step_0000006.png",
                   "checkpoints/step_0000003.pt", "checkpoints/last.pt", "loss.png", "loss_by_t.png",
                   "denoising.png", "result.json"):
        assert (run_dir / output).is_file(), output
    if experiment.startswith("mnist"):
        assert "confident_frac" in json.loads((run_dir / "result.json").read_text())


def test_cfg_job_shows_what_a_preset_sets(tmp_path):
    result = run_in_process("diffusion-train", "experiment=mnist_10min", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0
    assert "max_steps: 3340" in result.stdout and "batch_size: 64" in result.stdout and "kind: dpmpp_2m" in result.stdout
    assert "kind: mnist" in result.stdout and "prediction: v" in result.stdout
