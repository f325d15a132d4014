"""The console scripts end to end, as a user runs them: subprocesses, run dirs under tmp_path."""

import csv
import json
import os

import pytest
import torch
from PIL import Image

from conftest import TINY_TRAIN, run_cli, run_in_process, snapshot
from diffusion_cli import checkpoint
from diffusion_cli.samplers import SAMPLERS


def test_train_writes_a_complete_run_dir(trained_run):
    for path in [".hydra/config.yaml", "train.log", "metrics.jsonl", "result.json",
                 "checkpoints/last.pt", "checkpoints/step_0000003.pt", "checkpoints/step_0000006.pt",
                 "samples/step_0000003.png", "samples/step_0000006.png",
                 "reconstructions/step_0000006.png", "loss.png", "loss_by_t.png", "denoising.png"]:
        assert (trained_run / path).is_file(), path
        if path.endswith(".png"):
            assert (trained_run / path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 3, 4, 6]
    assert {"loss", "lr", "images_per_s", "eval_loss", "rms", "valid_frac"} <= lines[-1].keys()
    assert all(l["loss"] > 0 for l in lines if "loss" in l)
    by_t = lines[-1]["eval_loss_by_t"]
    assert len(by_t) == 10 and all(v > 0 for v in by_t)
    # The eval loss is the mean over images spread evenly over t: the mean of the buckets.
    assert abs(sum(by_t) / 10 - lines[-1]["eval_loss"]) < 0.2 * lines[-1]["eval_loss"]


def test_checkpoint_is_self_describing_and_loads_with_weights_only(trained_run):
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "ema", "config", "step", "optimizer", "format_version", "rng"} <= state.keys()
    assert state["step"] == 6 and type(state["config"]) is dict
    assert state["config"]["model"]["kind"] == "mlp" and state["config"]["schedule"]["T"] == 20
    model, schedule, config = checkpoint.load(trained_run)
    assert schedule.T == 20 and config.data.kind == "gradients" and not model.training
    x = torch.zeros(2, 3, 16, 16)
    assert model(x, torch.tensor([0, 19])).shape == x.shape


def test_sample_from_a_run_dir_is_reproducible(trained_run, tmp_path):
    outputs = []
    for name in ("a", "b"):
        result = run_in_process("diffusion-sample", f"ckpt={trained_run}", "num_samples=5", "batch_size=2",
                                "seed=7", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert str(tmp_path / name / "samples.png") in result.stdout
        outputs.append(torch.load(tmp_path / name / "samples.pt", weights_only=True))
    assert outputs[0].shape == (5, 3, 16, 16)
    assert outputs[0].min() >= 0 and outputs[0].max() <= 1
    torch.testing.assert_close(outputs[0], outputs[1])
    assert (tmp_path / "a" / "samples.png").stat().st_size > 0


def test_sample_uses_the_ema_weights_unless_told_not_to(trained_run, tmp_path):
    drawn = {}
    for use_ema in ("true", "false"):
        run_in_process("diffusion-sample", f"ckpt={trained_run}", "num_samples=3", f"use_ema={use_ema}",
                       f"hydra.run.dir={tmp_path / use_ema}", cwd=tmp_path)
        drawn[use_ema] = torch.load(tmp_path / use_ema / "samples.pt", weights_only=True)
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    assert not torch.equal(state["ema"]["out.1.weight"], state["model"]["out.1.weight"])
    assert not torch.equal(drawn["true"], drawn["false"])
    model, _, _ = checkpoint.load(trained_run)
    assert torch.equal(model.state_dict()["out.1.weight"], state["ema"]["out.1.weight"])


def test_autoguidance_by_the_runs_guide_or_an_earlier_checkpoint(trained_run, tmp_path):
    """guidance=auto guides by the snapshot the run kept at trainer.guide_at (step 2 of 6 by
    default), or by guide=CKPT; a checkpoint without a guide is refused in one line."""
    def draw(*args):
        result = run_in_process("diffusion-sample", "guidance=auto", "guidance_scale=2", "num_samples=2", *args,
                                cwd=tmp_path)
        return result.returncode, result.stdout + result.stderr

    early = trained_run / "checkpoints" / "step_0000003.pt"
    assert "autoguidance 2.0 by its guide (step 2)" in draw(f"ckpt={trained_run}", "hydra.run.dir=own")[1]
    assert f"by ckpt={early}" in draw(f"ckpt={trained_run}", f"guide={early}", "hydra.run.dir=file")[1]
    images = [torch.load(tmp_path / d / "samples.pt", weights_only=True) for d in ("own", "file")]
    assert not torch.equal(*images)  # two guides, two sets of images
    state = torch.load(trained_run / "checkpoints" / "last.pt", weights_only=True)
    del state["guide"]
    torch.save(state, tmp_path / "no_guide.pt")
    code, output = draw(f"ckpt={tmp_path / 'no_guide.pt'}", "hydra.run.dir=refused")
    assert code != 0 and "holds no guide" in output and len(output.strip().splitlines()) == 1


def test_sample_accepts_a_checkpoint_file_and_a_respaced_sampler(trained_run, tmp_path):
    run_in_process("diffusion-sample", f"ckpt={trained_run / 'checkpoints' / 'step_0000003.pt'}",
                   "num_samples=3", "sampler.steps=5", f"hydra.run.dir={tmp_path / 's'}", cwd=tmp_path)
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True).shape == (3, 3, 16, 16)


def test_relative_paths_resolve_from_the_working_directory(trained_run, tmp_path):
    """version_base 1.3: Hydra does not change directory, so a relative ckpt= works."""
    relative = os.path.relpath(trained_run, tmp_path)
    result = run_in_process("diffusion-sample", f"ckpt={relative}", "num_samples=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "outputs").glob("*/*-sample/samples.png"))) == 1


@pytest.mark.slow
def test_unet_on_mnist_trains_and_samples(tmp_path, mnist_classifier):
    run_dir = tmp_path / "mnist"
    trained = run_in_process("diffusion-train", *TINY_TRAIN, "model=unet", "data=mnist", f"hydra.run.dir={run_dir}",
                             cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert (run_dir / "samples" / "step_0000006.png").is_file()
    result = json.loads((run_dir / "result.json").read_text())
    assert {"classifier_fd", "confident_frac", "class_entropy"} <= result.keys()
    sampled = run_in_process("diffusion-sample", f"ckpt={run_dir}", "num_samples=2", f"hydra.run.dir={tmp_path / 's'}",
                             cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert torch.load(tmp_path / "s" / "samples.pt", weights_only=True).shape == (2, 1, 28, 28)


TINY_RESUNET = ["data=mnist", *TINY_TRAIN, "trainer.num_grid_images=12", "trainer.num_quality_images=20"]


@pytest.mark.slow
def test_class_conditional_v_prediction_trains_and_samples_with_guidance(tmp_path, mnist_classifier):
    run_dir = tmp_path / "conditional"
    trained = run_in_process("diffusion-train", *TINY_RESUNET, "model.num_classes=10", "objective=v",
                             "objective.weighting=min_snr", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = json.loads((run_dir / "result.json").read_text())
    assert 0 <= result["label_accuracy"] <= 1 and result["classifier_fd"] > 0
    model, _, config = checkpoint.load(run_dir)
    assert model.prediction == "v" and model.num_classes == 10 and config.objective.prediction == "v"

    sampled = run_in_process("diffusion-sample", f"ckpt={run_dir}", "label=all", "num_samples=15", "guidance_scale=3",
                             "eval=true", "sampler=ddim", "sampler.steps=5", f"hydra.run.dir={tmp_path / 'all'}",
                             cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    images = torch.load(tmp_path / "all" / "samples.pt", weights_only=True)
    assert images.shape == (20, 1, 28, 28)  # one row of ceil(15 / 10) = 2 per class
    quality = json.loads((tmp_path / "all" / "quality.json").read_text())
    assert len(quality["label_accuracy_by_class"]) == 10 and "classifier_fd" in quality

    drawn = {}
    for scale in ("1", "3"):
        sampled = run_in_process("diffusion-sample", f"ckpt={run_dir}", "label=3", "num_samples=4",
                                 f"guidance_scale={scale}", "sampler=ddim", "sampler.steps=5",
                                 f"hydra.run.dir={tmp_path / scale}", cwd=tmp_path)
        assert sampled.returncode == 0, sampled.stderr
        drawn[scale] = torch.load(tmp_path / scale / "samples.pt", weights_only=True)
    assert not torch.equal(drawn["1"], drawn["3"])

    result = run_in_process("diffusion-sample", f"ckpt={run_dir}", "label=10", cwd=tmp_path)
    assert result.returncode == 2 and "0 to 9" in result.stderr


def read_summary(sweep_dir):
    with open(sweep_dir / "summary.csv") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_sweep_runs_every_combination_and_writes_a_summary(tmp_path):
    sweep_dir = tmp_path / "sweep"
    tiny = [arg for arg in TINY_TRAIN if not arg.startswith("schedule.T=")]
    swept = run_in_process("diffusion-train", "-m", "schedule=linear,cosine", "schedule.T=10,20", *tiny,
                           f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    assert swept.returncode == 0, swept.stderr
    rows = read_summary(sweep_dir)
    assert len(rows) == 4 and len(list(sweep_dir.glob("*/checkpoints/last.pt"))) == 4
    assert {(r["schedule"], r["schedule.T"]) for r in rows} == \
        {("linear", "10"), ("linear", "20"), ("cosine", "10"), ("cosine", "20")}
    header = list(rows[0])
    assert header[:2] == ["schedule", "schedule.T"]  # the swept keys, not the constant ones
    for column in ("loss", "eval_loss", "rms", "valid_frac", "steps", "wall_s", "run_dir", "status"):
        assert column in header
    assert all(r["status"] == "ok" and float(r["eval_loss"]) > 0 and r["steps"] == "6" for r in rows)
    assert (sweep_dir / "summary.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_a_failing_sweep_job_is_recorded_and_the_others_still_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    tiny = [arg for arg in TINY_TRAIN if not arg.startswith("schedule.T=")]
    result = run_in_process("diffusion-train", "-m", "schedule.T=0,10", *tiny, f"hydra.sweep.dir={sweep_dir}",
                            cwd=tmp_path)
    assert result.returncode == 1
    assert "1 of 2 sweep jobs failed" in result.stderr and "Traceback" not in result.stderr
    rows = {r["schedule.T"]: r for r in read_summary(sweep_dir)}
    assert rows["0"]["status"] == "failed" and "schedule.T" in rows["0"]["error"]
    assert rows["10"]["status"] == "ok"


# Offline for torchvision's download, whatever the machine: every request goes to a closed port.
OFFLINE = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}

BAD_INPUT = [
    ("diffusion-train", ["model=unett"], "unett"),                            # unknown group option
    ("diffusion-train", ["trainer.no_such_key=1"], "no_such_key"),           # unknown key
    ("diffusion-train", ["schedule.T=abc"], "schedule.T"),                   # wrong type
    ("diffusion-train", ["schedule.T=0"], "schedule.T"),
    ("diffusion-train", ["schedule=linear", "schedule.beta_end=1.5"], "schedule.beta_end"),  # beta outside (0, 1)
    ("diffusion-train", ["schedule.beta_end=0.01"], "is a key of schedule=linear|linear_logit_normal; add schedule=linear"),
    ("diffusion-train", ["sampler.s_churn=1"], "is a key of sampler=euler"),
    ("diffusion-train", ["schedule=linear", "schedule.beta_start=0.5"], "beta_start"),          # beta_start > beta_end
    ("diffusion-train", ["schedule=edm", "schedule.sigma_min=100"], "sigma_min"),  # sigma_min > sigma_max
    ("diffusion-train", ["trainer.batch_size=0"], "trainer.batch_size"),
    ("diffusion-train", ["trainer.lr=-1"], "trainer.lr"),
    ("diffusion-train", ["data=mnist", "data.root=nowhere", "data.download=false"], "nowhere"),
    ("diffusion-train", ["data=mnist", "data.root=nowhere", "data.download=true"], "downloading it failed"),
    ("diffusion-train", ["hydra.run.dir=/proc/no/run"], "/proc/no/run"),     # unwritable output dir
    ("diffusion-train", ["model=unet", "data.height=18"], "divisible by 4"),  # shape the U-Net can't take
    ("diffusion-train", ["resume=missing_run"], "missing_run"),
    ("diffusion-sample", [], "ckpt"),
    ("diffusion-sample", ["ckpt=missing.pt"], "missing.pt"),
    ("diffusion-sample", ["ckpt=empty_dir"], "empty_dir"),
    ("diffusion-sample", ["ckpt=not_a_checkpoint.pt"], "not_a_checkpoint.pt"),
    ("diffusion-sample", ["ckpt=x.pt", "num_samples=0"], "num_samples"),
    ("diffusion-sample", ["ckpt=TRAINED", "sampler.steps=0"], "sampler.steps"),
    ("diffusion-sample", ["ckpt=TRAINED", "sampler.steps=5000"], "sampler.steps"),
    ("diffusion-sample", ["ckpt=TRAINED", "label=3"], "class-conditional"),  # unconditional model
    ("diffusion-sample", ["ckpt=TRAINED", "label=three"], "label"),
    ("diffusion-sample", ["ckpt=TRAINED", "guidance_scale=3"], "guidance_scale"),
    ("diffusion-train", ["model.num_classes=10"], "model.num_classes"),        # gradients: no labels
    ("diffusion-train", ["objective.prediction=noise"], "objective.prediction"),
    ("diffusion-train", ["objective.weighting=snr"], "objective.weighting"),
    ("diffusion-train", ["trainer.ema_decay=1"], "trainer.ema_decay"),
    ("diffusion-train", ["model=resunet", "model.channel_mults=[1,2,2,2,2,2]"], "divisible by 32"),
    ("diffusion-train", ["trainer.precision=fp8"], "trainer.precision"),
    ("diffusion-sample", ["ckpt=TRAINED", "precision=half"], "precision"),
    ("diffusion-sample", ["ckpt=TRAINED", "compile=maybe"], "compile"),
    ("diffusion-sample", ["ckpt=TRAINED", "ema=0.1"], "keeps no power EMA"),   # trainer.ema_profiles=[]
    ("diffusion-sample", ["ckpt=TRAINED", "guidance=classifier"], "guidance"),
    ("diffusion-sample", ["ckpt=TRAINED", "guidance=auto", "guide=missing.pt"], "missing.pt"),
    ("diffusion-train", ["trainer.ema_sigma_rel=0.5"], "trainer.ema_sigma_rel"),
    ("diffusion-train", ["trainer.ema_profiles=[0.1,2]"], "trainer.ema_profiles"),
    ("diffusion-train", ["trainer.guide_at=1"], "trainer.guide_at"),
    ("diffusion-train", ["trainer.num_quality_images=many"], "trainer.num_quality_images"),
    ("diffusion-train", ["schedule.time_density=normal"], "schedule.time_density"),
]
# The data keys and sources: the same checks as above (config rules, loaders), in-process only.
BAD_DATA_INPUT = [
    ("diffusion-train", ["data=folder"], "data.path"),                        # no folder given
    ("diffusion-train", ["data=folder", "data.path=nowhere"], "nowhere"),
    ("diffusion-train", ["data=folder", "data.path=empty_dir"], "holds no images"),
    ("diffusion-train", ["data=folder", "data.path=empty_dir", "model.num_classes=2"], "holds no images"),
    ("diffusion-train", ["data=folder", "data.labels=folders"], "data.labels"),
    ("diffusion-train", ["data.in_memory=maybe"], "data.in_memory"),
    ("diffusion-train", ["data.in_memory=false"], "generated"),              # gradients: nothing to stream
    ("diffusion-train", ["data=cifar10", "data.root=nowhere"], "downloading it failed"),
    ("diffusion-train", ["data=fashion_mnist", "data.root=nowhere", "data.download=false"], "nowhere"),
    ("diffusion-train", ["model=dit", "model.patch_size=3"], "patch_size"),  # 16x16 gradients
    ("diffusion-train", ["model=dit", "model.heads=3"], "model.heads"),
    ("diffusion-sample", ["ckpt=TRAINED", "save_images=maybe"], "save_images"),
    ("diffusion-train", ["data=folder", "data.path=one_image", "data.num_eval=all"], "data.num_eval"),
    ("diffusion-train", ["data=folder", "data.path=one_image", "data.num_eval=1"], "leave it at auto"),
    ("diffusion-train", ["trainer.device=mps"], "it has: cpu"),                # no Apple GPU here
    ("diffusion-train", ["trainer.device=cuda:3"], "it has: cpu"),
    ("diffusion-sample", ["ckpt=TRAINED", "device=mps"], "it has: cpu"),
    ("diffusion-sample", ["ckpt=TRAINED", "text_encoder.path=clip"], "reads no pretrained text encoder"),
    ("diffusion-sample", ["ckpt=TRAINED", "autoencoder.path=vae"], "has no pretrained autoencoder"),
    ("diffusion-train", ["trainer.quality_extractor=vgg"], "trainer.quality_extractor"),
    ("diffusion-train", ["trainer.quality_extractor=inception", "trainer.quality_weights=missing.pth"],
     "trainer.quality_weights=missing.pth is not a file"),                 # before the first step
]
# Trackers, presets and the sweep objective: config checks as above, in-process only.
BAD_TRACKING_INPUT = [
    ("diffusion-train", ["logger=neptune"], "neptune"),                       # not a tracker
    ("diffusion-train", ["logger=wandb", "logger.wandb.mode=sometimes"], "logger.wandb.mode"),
    ("diffusion-train", ["experiment=mnist_1h"], "mnist_1h"),                 # not a preset
    ("diffusion-train", ["sweep.objective=fid"], "sweep.objective"),           # not a metric of the run
    ("diffusion-train", ["sweep.direction=up"], "sweep.direction"),
]


def check_bad_input(run, trained_run, tmp_path, script, args, named):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "one_image").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "one_image" / "a.png")
    (tmp_path / "not_a_checkpoint.pt").write_text("hello")
    (tmp_path / "x.pt").write_text("")
    before = snapshot(trained_run)
    args = [arg.replace("TRAINED", str(trained_run)) for arg in args]
    result = run(script, *args, cwd=tmp_path, env=OFFLINE)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    error_lines = result.stderr.strip().splitlines()
    assert len(error_lines) == 1 and named in error_lines[0] and "error" in error_lines[0]
    assert snapshot(trained_run) == before  # nothing lost


@pytest.mark.parametrize("script, args, named", BAD_INPUT + BAD_DATA_INPUT + BAD_TRACKING_INPUT)
def test_bad_input_is_one_line_and_a_non_zero_exit(trained_run, tmp_path, script, args, named):
    """The entry points called in this process: the fast tier covers every case."""
    check_bad_input(run_in_process, trained_run, tmp_path, script, args, named)


# One case of each way a command fails, through the console scripts: Hydra's composition (an
# unknown option, a wrong type, another kind's key), a range rule, a loader, the run dir, a
# missing or foreign checkpoint, and a request the trained model can't serve.
CONSOLE_CASES = [BAD_INPUT[i] for i in (0, 2, 5, 9, 12, 13, 17, 19, 23)]


@pytest.mark.slow
@pytest.mark.parametrize("script, args, named", CONSOLE_CASES)
def test_bad_input_from_the_console_scripts(trained_run, tmp_path, script, args, named):
    """The table's ways of failing through the installed console scripts, as a user runs them
    (the fast tier runs every case of the table in this process)."""
    check_bad_input(lambda *a, **k: run_cli(*a, check=False, **k), trained_run, tmp_path, script, args, named)


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    result = run_cli("diffusion-train", "schedule.T=abc", cwd=tmp_path, check=False,
                     env={"HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_edm_schedule_trains_and_every_sampler_draws_from_it(tmp_path):
    run = tmp_path / "edm"
    result = run_in_process("diffusion-train", *TINY_TRAIN, "schedule=edm", "objective=v",
                            "sampler=heun", "sampler.steps=4", f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert checkpoint.load(run)[2].schedule.kind == "edm"
    for sampler in SAMPLERS:
        result = run_in_process("diffusion-sample", f"ckpt={run}", "num_samples=3", f"sampler={sampler}",
                                "sampler.steps=4", f"hydra.run.dir={tmp_path / sampler}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        images = torch.load(tmp_path / sampler / "samples.pt", weights_only=True)
        assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()
