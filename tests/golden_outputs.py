"""The golden outputs: fixed-seed runs of both commands whose results must not change by a bit
when the code is reorganised. `python tests/golden_outputs.py OUT_DIR [CASE ...] [--all] [--resume]` runs
the cases (all but the slow ones by default, `--all` for every one) in this one process and writes
OUT_DIR/<case>.pt: the samples of diffusion-sample and the final losses of the training runs;
`--resume` also resumes the checkpoints of tests/golden/checkpoints/ (OUT_DIR/resumed.pt).
tests/golden/ holds what main wrote at de2f18b; tests/test_golden.py compares against it.

Every case trains with `debug=fast` (a tiny model, 6 steps) except `gradients_default`, the
default run itself (4,500 steps, slow)."""

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import torch

FAST = ["debug=fast", "trainer.device=cpu"]
MNIST = ["data=mnist", *FAST]
LINEAR = ["schedule=linear"]  # MNIST's default since issue 26 is linear_logit_normal; the cases were recorded on linear

# name: (training runs, in order: the last is sampled; sampling runs: name suffix -> arguments).
# "{prev}" in an argument is the previous training run's dir (the autoencoder of latent diffusion).
CASES = {
    "gradients_fast": ([FAST], {"": ["num_samples=8", "sampler=ddpm"]}),
    "mnist_fast": ([[*MNIST, *LINEAR]], {
        "": ["num_samples=6", "sampler=ddpm"],
        "ddpm5": ["num_samples=4", "sampler=ddpm", "sampler.steps=5"],
        "ddim5": ["num_samples=4", "sampler=ddim", "sampler.steps=5"],
        "ddim5_eta1": ["num_samples=4", "sampler=ddim", "sampler.steps=5", "sampler.eta=1"],
        "dpmpp5": ["num_samples=4", "sampler=dpmpp_2m", "sampler.steps=5"],
        "dpmpp5_sde": ["num_samples=4", "sampler=dpmpp_2m", "sampler.steps=5", "sampler.eta=1"],
        "heun5": ["num_samples=4", "sampler=heun", "sampler.steps=5"],
        "ddim5_noclip": ["num_samples=4", "sampler=ddim", "sampler.steps=5", "sampler.clip_x0=false"],
        "batch_split": ["num_samples=5", "sampler=ddim", "sampler.steps=5", "batch_size=2"],
    }),
    "mnist_edm": ([[*MNIST, "schedule=edm", "objective=v"]], {
        "heun5": ["num_samples=4", "sampler=heun", "sampler.steps=5"],
        "dpmpp5": ["num_samples=4", "sampler=dpmpp_2m", "sampler.steps=5"],
    }),
    "mnist_class": ([[*MNIST, *LINEAR, "model.num_classes=10", "objective.weighting=min_snr"]], {
        "label_all": ["label=all", "guidance_scale=3", "num_samples=10", "sampler=ddim", "sampler.steps=5"],
        "label_3": ["label=3", "num_samples=2", "sampler=ddpm", "sampler.steps=5"],
    }),
    "mnist_prompt": ([[*MNIST, *LINEAR, "data.captions=labels"]], {
        "seven": ["prompt=seven", "guidance_scale=3", "num_samples=4", "sampler=ddim", "sampler.steps=5"],
        "negative": ["prompt=[seven,the digit 3]", "negative_prompt=one", "guidance_scale=2",
                     "num_samples=4", "sampler=dpmpp_2m", "sampler.steps=5"],
    }),
    "mnist_dit_prompt": ([[*MNIST, *LINEAR, "model=dit", "data.captions=labels", "objective=x0"]], {
        "seven": ["prompt=seven", "guidance_scale=3", "num_samples=2", "sampler=ddim", "sampler.steps=5"],
    }),
    "mnist_latent": ([[*MNIST, "task=autoencoder", "autoencoder=tiny"],
                      [*MNIST, *LINEAR, "autoencoder.ckpt={prev}", "model.channel_mults=[1]"]], {
        "": ["num_samples=4", "sampler=ddim", "sampler.steps=5"],
        "ddpm5": ["num_samples=4", "sampler=ddpm", "sampler.steps=5"],
    }),
    "mnist_unet_dpmpp": ([[*MNIST, *LINEAR, "model=unet", "sampler=dpmpp_2m"]], {"": ["num_samples=4", "sampler=ddpm"]}),
    "gradients_default": ([["trainer.device=cpu"]], {"": ["num_samples=16", "sampler=ddpm"]}),
}
SLOW = {"gradients_default"}


def call(name: str, args: list[str]) -> None:
    """A console script's entry point in this process; raises on a non-zero exit."""
    from hydra.core.global_hydra import GlobalHydra

    from diffusion_cli import sample, train

    entry = {"diffusion-train": train.cli, "diffusion-sample": sample.cli}[name]
    sys.argv = [name, *args]
    GlobalHydra.instance().clear()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            entry()
    except SystemExit as exit:
        if exit.code:
            raise RuntimeError(f"{name} {' '.join(args)} exited {exit.code}: {err.getvalue()[-2000:]}")
    finally:
        GlobalHydra.instance().clear()


def final_losses(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {key: value for record in records for key, value in record.items()
            if key in ("loss", "eval_loss", "psnr", "latent_scale")}


def run_case(name: str, work: Path) -> dict:
    trainings, samplings = CASES[name]
    result, previous = {}, None
    for k, args in enumerate(trainings):
        run_dir = work / name / f"train{k}"
        args = [arg.replace("{prev}", str(previous)) for arg in args]
        call("diffusion-train", [*args, f"hydra.run.dir={run_dir}"])
        result[f"train{k}"] = final_losses(run_dir)
        previous = run_dir
    for suffix, args in samplings.items():
        out = work / name / f"sample_{suffix or 'default'}"
        call("diffusion-sample", [f"ckpt={previous}", *args, "device=cpu", f"hydra.run.dir={out}"])
        result[f"samples_{suffix or 'default'}"] = torch.load(out / "samples.pt", weights_only=True)
    result["checkpoint"] = previous / "checkpoints" / "last.pt"
    return result


# Checkpoints main wrote at de2f18b (tests/golden/checkpoints/NAME.pt), from these cases' runs.
CHECKPOINTS = {"pixel_unet": "mnist_unet_dpmpp", "latent": "mnist_latent", "prompt_dit": "mnist_dit_prompt"}
RESUME_SAMPLES = ["num_samples=2", "sampler=ddim", "sampler.steps=3"]


def resume_checkpoint(checkpoint: Path, work: Path) -> dict:
    """An old checkpoint sampled as its case sampled it, then resumed for 2 more steps: the
    samples, the final losses and then samples again."""
    import shutil

    suffix, args = next(iter(CASES[CHECKPOINTS[checkpoint.stem]][1].items()))
    loaded = work / f"loaded_{checkpoint.stem}"
    call("diffusion-sample", [f"ckpt={checkpoint}", *args, "device=cpu", f"hydra.run.dir={loaded}"])

    run_dir = work / f"resumed_{checkpoint.stem}"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run_dir / "checkpoints" / "last.pt")
    call("diffusion-train", [f"resume={run_dir}", "trainer.max_steps=8"])
    out = work / f"resumed_{checkpoint.stem}_samples"
    call("diffusion-sample", [f"ckpt={run_dir}", *RESUME_SAMPLES, "device=cpu", f"hydra.run.dir={out}"])
    return {"loaded": torch.load(loaded / "samples.pt", weights_only=True), "train": final_losses(run_dir),
            "samples": torch.load(out / "samples.pt", weights_only=True)}


def main(argv: list[str]) -> None:
    flags = {a for a in argv if a.startswith("--")}
    out, names = Path(argv[0]).resolve(), [a for a in argv[1:] if not a.startswith("--")]
    names = names or ([] if "--resume" in flags and len(flags) == 1 else
                      [n for n in CASES if "--all" in flags or n not in SLOW])
    os.environ.setdefault("DIFFUSION_CLI_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    for name in names:
        result = run_case(name, out / "runs")
        result.pop("checkpoint")
        torch.save(result, out / f"{name}.pt")
        print(f"{name}: {sorted(result)}", flush=True)
    if "--resume" in flags:  # the old checkpoints of tests/golden/checkpoints/, resumed
        torch.save({path.stem: resume_checkpoint(path, out / "runs")
                    for path in sorted((Path(__file__).parent / "golden" / "checkpoints").glob("*.pt"))},
                   out / "resumed.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
