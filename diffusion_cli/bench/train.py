"""The train table: diffusion-train's TrainStep against a bare loop."""

import torch
from torch.nn import functional as F

from ..data import Split, to_model_range
from ..runtime import autocast
from .timing import BATCH, interleaved, spread, table, train_config


def bench_train(device: torch.device, repeats: int, steps: int, models: list[str], precision: str) -> str:
    """images/s of diffusion-train's TrainStep (data drawn by index, label-free MNIST shape, EMA,
    loss and skip statistics on the device) against a bare loop over the same model and batch
    size: q_sample, forward, MSE, backward, AdamW step, nothing else."""
    from ..train import TrainStep

    rows = []
    for kind in models:
        cfg = train_config(kind, device, [f"trainer.precision={precision}"])
        images = torch.rand(4096, 1, 28, 28)  # stored as floats in [0, 1]
        step = TrainStep(cfg, device, Split(images, torch.zeros(4096, dtype=torch.long)))
        model, schedule = step.model, step.task.schedule
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.trainer.lr, fused=True)
        generator = torch.Generator(device).manual_seed(1)
        x0 = to_model_range(step.batches.images[:BATCH])
        counter = iter(range(1, 10 ** 9))

        def bare():
            for _ in range(steps):
                t = torch.randint(0, schedule.T, (BATCH,), generator=generator, device=device)
                noise = torch.randn(x0.shape, generator=generator, device=device)
                with autocast(device, precision):
                    loss = F.mse_loss(model(schedule.q_sample(x0, t, noise), t), noise)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

        def project():
            for _ in range(steps):
                step(next(counter))

        def project_with_sync():  # what a per-step host sync (loss.item()) would add
            for _ in range(steps):
                step(next(counter))
                step.stats[0].item()

        seconds = interleaved({"project": project, "bare": bare, "sync": project_with_sync}, repeats, device)
        per_s = {name: [steps * BATCH / s for s in values] for name, values in seconds.items()}
        ratio = [p / b for p, b in zip(per_s["project"], per_s["bare"])]
        sync = [s / p for s, p in zip(per_s["sync"], per_s["project"])]
        rows.append([kind, spread(per_s["bare"]), spread(per_s["project"]), spread(ratio, 3),
                     spread(sync, 3)])
    return table(["model", "bare loop img/s", "diffusion-train step img/s", "step / bare (target >= 0.95)",
                  "with a host sync per step / without"], rows)
