"""The learning-rate curve: a linear warm-up, then constant or a cosine decay to 0 at max_steps,
and how a resume that changes max_steps moves onto the new curve without a jump."""

import math

from omegaconf import DictConfig, OmegaConf


def learning_rate(step: int, tc, rewarm: tuple[int, float] | None = None) -> float:
    """Linear warm-up to trainer.lr, then constant or a cosine decay to 0 at max_steps. After a
    resume that moved the curve (a new max_steps), `rewarm` = (the resume step, the rate there):
    over the next lr_warmup_steps the rate moves linearly from there to the new curve, so it
    never jumps."""
    if step <= tc.lr_warmup_steps:
        planned = tc.lr * step / tc.lr_warmup_steps
    elif tc.lr_schedule == "constant":
        planned = tc.lr
    else:
        progress = (step - tc.lr_warmup_steps) / max(1, tc.max_steps - tc.lr_warmup_steps)
        planned = tc.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if rewarm is None or step >= rewarm[0] + tc.lr_warmup_steps:
        return planned
    start, start_lr = rewarm
    return start_lr + (planned - start_lr) * (step - start) / tc.lr_warmup_steps


def rewarm_after_resume(state: dict, tc: DictConfig) -> tuple[int, float] | None:
    """Where the learning rate re-warms from after this resume: the checkpoint's own re-warm, or,
    when the new trainer.max_steps moves the curve at the resume step, (that step, the rate the
    run had there)."""
    step, rewarm = state["step"], state.get("lr_rewarm")
    before = learning_rate(step, OmegaConf.create(state["config"]).trainer, rewarm)
    if before != learning_rate(step, tc, rewarm):
        return step, before
    return None if rewarm is None else tuple(rewarm)
