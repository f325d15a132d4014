"""The pictures in a run dir (loss.png, loss_by_t.png, denoising.png) and a sweep dir
(summary.png), drawn with matplotlib from what the run already wrote."""

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed, safe in sweeps and on servers

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .atomic import atomic_write  # noqa: E402
from .samplers import model_device, sample, sampler_from_config  # noqa: E402


def save(figure, path: Path) -> None:
    with atomic_write(path, "wb") as file:
        figure.savefig(file, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def training_curves(run_dir: Path) -> None:
    """loss.png: train and eval loss against steps (log scale); loss_by_t.png: the eval loss in
    each bucket of timesteps, one line per evaluation, later ones darker (a denoiser's); psnr.png:
    the held-out PSNR (an autoencoder's)."""
    records = read_metrics(run_dir)
    figure, axes = plt.subplots(figsize=(6, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            axes.plot(*zip(*points), style, label=key.replace("_", " "), markersize=4)
    axes.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    axes.grid(alpha=0.3, which="both")
    axes.legend()
    save(figure, run_dir / "loss.png")

    psnr = [(r["step"], r["psnr"]) for r in records if "psnr" in r]
    if psnr:
        figure, axes = plt.subplots(figsize=(6, 4))
        axes.plot(*zip(*psnr), "o-", markersize=4)
        axes.set(xlabel="step", ylabel="dB", title="held-out reconstruction PSNR")
        axes.grid(alpha=0.3)
        save(figure, run_dir / "psnr.png")
    evaluations = [r for r in records if "eval_loss_by_t" in r]
    if not evaluations:
        return
    figure, axes = plt.subplots(figsize=(6, 4))
    colors = plt.cm.viridis_r([0.15 + 0.85 * (i + 1) / len(evaluations) for i in range(len(evaluations))])
    for record, color in zip(evaluations, colors):
        buckets = len(record["eval_loss_by_t"])
        centres = [(b + 0.5) / buckets for b in range(buckets)]
        axes.plot(centres, record["eval_loss_by_t"], "o-", color=color, markersize=3,
                  label=f"step {record['step']}")
    axes.set(xlabel="t / T (0: almost clean, 1: pure noise)", ylabel="eval loss",
             yscale="log", title="eval loss by timestep")
    axes.grid(alpha=0.3, which="both")
    axes.legend(fontsize=7, ncol=2)
    save(figure, run_dir / "loss_by_t.png")


def denoising(model, schedule, cfg, path: Path, condition, space,
              count: int = 8, columns: int = 10) -> None:
    """The reverse process of `count` samples (rows) with the training grids' sampler, at
    `columns` evenly spaced steps from x_T to the final sample; the run's classes or prompts in
    turn; each state decoded from the run's space."""
    sampler = sampler_from_config(cfg.sampler, clip_x0=cfg.sampler.clip_x0 and space.clip)
    labels = condition.each(count).conditions
    generator = torch.Generator(model_device(model, schedule)).manual_seed(cfg.trainer.seed)
    trajectory = sample(model, schedule, (count, *space.shape),
                        sampler=sampler, generator=generator, return_all_steps=True, labels=labels)
    # The timestep each state is the model's input at; the last state is the sample itself.
    inputs = sampler.timesteps(schedule, sampler.steps or schedule.T)
    titles = [f"t={t}" for t in inputs] + ["sample"]
    shown = [round(k * len(inputs) / (columns - 1)) for k in range(columns)]
    trajectory = trajectory[shown]
    trajectory = torch.stack([space.decode(states) for states in trajectory]).cpu()
    figure, axes = plt.subplots(count, columns, figsize=(columns * 0.9, count * 0.9), squeeze=False)
    for column, k in enumerate(shown):
        axes[0, column].set_title(titles[k], fontsize=8)
        for row in range(count):
            image = ((trajectory[column, row] + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()
            axes[row, column].imshow(image.squeeze(-1) if image.shape[-1] == 1 else image,
                                     cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[row, column].axis("off")
    figure.suptitle(f"reverse process ({sampler.kind}, {len(inputs)} steps): x_T on the left", fontsize=9)
    save(figure, path)


def sweep_summary(sweep_dir: Path, rows: list[dict], swept: list[str], metrics: list[str],
                  objective: str | None = None) -> None:
    """summary.png: each final metric (rows of plots) against each swept key (columns); the points
    of jobs that share the other swept values are joined by a line; a star marks the best row of
    the objective (summary.csv's `best`)."""
    done = [row for row in rows if row.get("status") == "ok"]
    metrics = [m for m in metrics if any(_number(row.get(m)) is not None for row in done)]
    if not done or not swept or not metrics:
        return
    figure, axes = plt.subplots(len(metrics), len(swept), figsize=(4 * len(swept), 2.8 * len(metrics)),
                                squeeze=False)
    for column, key in enumerate(swept):
        values = sorted({row[key] for row in done}, key=_sort_key)
        others = [k for k in swept if k != key]
        groups = {}
        for row in done:
            groups.setdefault(", ".join(f"{k}={_short(row[k])}" for k in others), []).append(row)
        for line, (name, members) in enumerate(groups.items()):
            members.sort(key=lambda row: values.index(row[key]))
            for r, metric in enumerate(metrics):
                points = [(values.index(row[key]), _number(row.get(metric))) for row in members]
                points = [(x, y) for x, y in points if y is not None]
                if points:
                    axes[r, column].plot(*zip(*points), "o-", label=name or None, color=f"C{line}")
        for r, metric in enumerate(metrics):
            ax = axes[r, column]
            for row in done:
                if row.get("best") and _number(row.get(metric)) is not None:
                    ax.plot(values.index(row[key]), _number(row[metric]), "*", markersize=16,
                            color="gold", markeredgecolor="black", zorder=3)
            ax.set_xticks(range(len(values)), [_short(value) for value in values],
                          rotation=45 if len(values) > 4 else 0)
            ax.set(xlabel=key if r == len(metrics) - 1 else None, ylabel=metric if column == 0 else None)
            ax.grid(alpha=0.3)
        if others and any(len(members) > 1 for members in groups.values()):  # lines to tell apart
            axes[0, column].legend(fontsize=7)
    best = next((row for row in done if row.get("best")), None)
    title = f"final metrics of {len(done)} sweep jobs"
    if best and objective:
        title += f"; \u2605 best {objective}: {best[objective]} ({Path(best['run_dir']).name}/)"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save(figure, sweep_dir / "summary.png")


def _number(value):
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _short(value: str) -> str:
    """A tick label: numbers to 3 significant digits (an Optuna trial's lr has 17)."""
    number = _number(value)
    return f"{number:.3g}" if number is not None else value


def _sort_key(value: str):
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, value)
