import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import diffusion_cli.config  # noqa: F401  registers the schemas
from diffusion_cli.config import validate
from diffusion_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
GROUPS = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))
          for group in ("data", "model", "schedule", "trainer", "sampler")}


def compose_train(*overrides):
    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        return compose("train", overrides=list(overrides))


# Presets: options that set another option's keys to other values.
PRESETS = {"resunet32": "resunet", "resunet64": "resunet", "linear_logit_normal": "linear",
           "dpmpp_2m_sde": "dpmpp_2m"}
# Every option of every group once (a data set with its default model), and every model on MNIST.
CHOICES = [{group: option} for group in GROUPS for option in GROUPS[group]] + [
    {"data": "mnist", "model": model} for model in GROUPS["model"]]


@pytest.mark.parametrize("choice", CHOICES, ids=lambda c: ",".join(c.values()))
def test_every_group_option_composes_and_validates(choice):
    cfg = compose_train(*(f"{group}={option}" for group, option in choice.items()))
    validate(cfg)
    for group, option in choice.items():
        assert cfg[group].get("kind", option) == PRESETS.get(option, option) or group == "trainer"


def test_every_group_file_names_what_it_builds():
    for group in ("data", "model", "schedule", "sampler"):
        for path in (ROOT / "conf" / group).glob("*.yaml"):
            kind = OmegaConf.load(path).get("kind")
            assert kind == path.stem or (path.stem in PRESETS and kind is None)


def test_mnist_defaults_to_the_resunet_unless_a_model_is_given():
    assert compose_train().model.kind == "mlp"
    assert compose_train("data=mnist").model.kind == "resunet"
    assert compose_train("model=unet", "data=mnist").model.kind == "unet"
    assert compose_train("data=mnist", "model=mlp").model.kind == "mlp"


def test_mnist_and_folders_pick_their_measured_trainers_unless_one_is_given():
    mnist = compose_train("data=mnist").trainer
    assert (mnist.batch_size, mnist.max_steps) == (64, 3340)
    assert compose_train("data=mnist", "trainer=default").trainer.batch_size == 128
    assert compose_train("data=folder").trainer.batch_size == 16
    assert compose_train("experiment=mnist_cond").trainer.batch_size == 128  # measured at 128


def test_sample_config_composes_with_its_sampler_group():
    with initialize_config_module("diffusion_cli.conf", version_base="1.3"):
        cfg = compose("sample", overrides=["ckpt=x.pt", "sampler.steps=10"])
    assert cfg.ckpt == "x.pt" and cfg.sampler.kind == "dpmpp_2m" and cfg.sampler.steps == 10
    assert cfg.sampler.eta == 1.0  # the default, dpmpp_2m_sde


@pytest.mark.parametrize("override", ["schedule.T=abc", "trainer.lr=fast", "data.download=maybe",
                                      "model=unett", "trainer.no_such_key=1"])
def test_wrong_types_and_unknown_names_fail_at_compose_time(override):
    with pytest.raises(ConfigCompositionException):
        compose_train(override)


@pytest.mark.parametrize("override, key", [
    ("schedule.T=0", "schedule.T"),
    ("schedule=linear schedule.beta_start=0", "schedule.beta_start"),
    ("schedule=linear schedule.beta_end=1.5", "schedule.beta_end"),
    ("schedule=linear schedule.beta_start=0.03", "schedule.beta_start"),   # above beta_end
    ("trainer.batch_size=-1", "trainer.batch_size"),
    ("trainer.lr=-0.1", "trainer.lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.lr_schedule=step", "trainer.lr_schedule"),
    ("sampler.steps=5000", "sampler.steps"),
    ("model.depth=-2", "model.depth"),
    ("model.num_classes=-1", "model.num_classes"),
    ("trainer.cond_drop_prob=2", "trainer.cond_drop_prob"),
    ("trainer.quality_every=-1", "trainer.quality_every"),
    ("trainer.num_quality_images=-5", "trainer.num_quality_images"),
])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")) as error:
        validate(compose_train(*override.split()))
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_wheel_install_finds_its_config_from_another_directory(tmp_path):
    """conf/ ships inside the wheel as diffusion_cli.conf, group folders included."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("diffusion_cli-*.whl"))
    target = tmp_path / "target"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = (
        "import sys, diffusion_cli, diffusion_cli.config, diffusion_cli.train, diffusion_cli.sample\n"
        "from hydra import compose, initialize_config_module\n"
        "loaded = [m.__file__ for name, m in sys.modules.items() if name.startswith('diffusion_cli')]\n"
        f"assert all(f.startswith({str(target)!r}) for f in loaded if f), loaded\n"
        "with initialize_config_module('diffusion_cli.conf', version_base='1.3'):\n"
        "    cfg = compose('train', overrides=['model=unet', 'data=mnist'])\n"
        "print(cfg.model.kind, cfg.data.kind, cfg.schedule.T)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=elsewhere, capture_output=True, text=True,
                            env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["unet", "mnist", "1000"]
    assert (target / "diffusion_cli" / "conf" / "model" / "unet.yaml").is_file()


def test_the_help_names_every_option_of_every_group(tmp_path):
    from conftest import run_in_process

    shown = run_in_process("diffusion-train", "--help", cwd=tmp_path).stdout
    help_text = shown.split("Groups (group=option):")[1].split("Set any key")[0]
    named = {group: set(options.split("|")) for group, options in re.findall(r"(\w+)=([\w|]+)", help_text)}
    for group in ("data", "model", "schedule", "sampler", "trainer", "logger", "experiment", "hparams_search",
                  "text_encoder", "task", "autoencoder"):
        assert set(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")) <= named[group], group
