"""Prompts as text: those of training's grids (from the data's captions or class names), the class
a prompt names, and diffusion-sample's prompt= and prompts_file= (conditions.Captions turns them
into tokens)."""

from pathlib import Path

import torch
from omegaconf import ListConfig

from .data import Split, class_names
from .data.captions import templated
from .errors import UserError


def class_prompts(data_cfg) -> list[str]:
    """data.captions=labels: a prompt per class, from the first caption template."""
    return [templated(data_cfg.caption_templates[0], name) for name in class_names(data_cfg)]


def grid_prompts(data_cfg, evaluation: Split, count: int = 8) -> list[str]:
    """The prompts of training's sample grids: one per class for data.captions=labels, else the
    first captions of the held-out images (up to `count` different ones)."""
    if data_cfg.captions == "labels":
        return class_prompts(data_cfg)
    prompts = []
    for group in evaluation.labels.tolist():
        caption = evaluation.captions[group][0]
        if caption and caption not in prompts:
            prompts.append(caption)
        if len(prompts) == count:
            break
    return prompts or [""]


def prompt_classes(prompts: list[str], data_cfg) -> torch.Tensor | None:
    """For data.captions=labels, the class each prompt names under any caption template (the
    held-out one included); None when a prompt matches none, or the data has no such captions."""
    if data_cfg.get("captions") != "labels":
        return None
    templates = [*data_cfg.caption_templates, data_cfg.held_out_template]
    known = {templated(template, name): k for k, name in enumerate(class_names(data_cfg))
             for template in templates}
    if not all(prompt in known for prompt in prompts):
        return None
    return torch.tensor([known[prompt] for prompt in prompts])


def read_prompts(cfg) -> list[str] | None:
    """diffusion-sample's prompts: prompt= (one, or a list) or prompts_file= (one a line)."""
    if cfg.prompt is not None and cfg.prompts_file is not None:
        raise UserError("prompt= and prompts_file= both given: use one of them")
    if cfg.prompts_file is not None:
        path = Path(cfg.prompts_file).expanduser()
        if not path.is_file():
            raise UserError(f"prompts_file={cfg.prompts_file} does not exist: give a text file with "
                            f"one prompt a line")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"prompts_file={cfg.prompts_file} has no prompts: write one prompt a line")
        return prompts
    if cfg.prompt is None:
        return None
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [cfg.prompt]
    if not prompts:
        raise UserError("prompt=[] has no prompts: give prompt=\"...\" or prompt=[\"...\",\"...\"]")
    return [str(prompt) for prompt in prompts]
