"""What a denoiser is conditioned on: nothing, a class label, or a caption. One condition per run,
built from the model (`condition_of`); everything else asks it, never which kind it is:

- training: `batch(labels, generator)` turns a batch's stored labels into the model's condition
  (caption groups are drawn into tokens), `null` and `drop_prob` are what guidance's dropout trains;
- guidance: `pair(cond, negative)` gives the conditional and the unconditional input side by side;
- drawing: `rows(count)` (a grid row per class or prompt) and `each(count)` (in turn) for training's
  grids and quality metrics, `requested(cfg)` for diffusion-sample's label=, prompt=, prompts_file=
  and negative_prompt=; `held_out(split)` the held-out split as the model reads it.
"""

import json
import logging
from pathlib import Path
from typing import NamedTuple

import torch
from omegaconf import OmegaConf
from torch import nn

from .atomic import atomic_write
from .data import DATASETS, Split, class_names
from .data.captions import CaptionTable
from .errors import UserError
from .metrics import clip_score
from .models import TEXT_MODELS, pretrained
from .models.text_encoder import build_text_encoder, padded, tokenize
from .prompts import grid_prompts, prompt_classes, read_prompts

log = logging.getLogger(__name__)


class Drawn(NamedTuple):
    """What to draw: the conditions (or None), the class each image shows (or None), images per
    grid row, row titles, the negative prompt's tokens (or None), each image's prompt (or None)."""
    conditions: torch.Tensor | None = None
    classes: torch.Tensor | None = None
    nrow: int = 0
    titles: list[str] | None = None
    negative: torch.Tensor | None = None
    prompts: list[str] | None = None


class Unconditional:
    labelled, null, drop_prob, prompts = False, None, 0.0, None
    eval_hint = ""  # what eval=true could measure with more (none: there is nothing more)

    def aligns(self, prompts: list[str] | None = None) -> bool:
        """Whether samples are scored on how well they follow their condition (prompts: None, the
        grid's): only prompts are, by CLIP."""
        return False

    def alignment(self, images: torch.Tensor, prompts: list[str] | None) -> dict:
        """How well images in [0, 1] follow their conditions: {} where nothing measures it."""
        return {}

    def describe(self, prompts: list[str] | None) -> str:
        """What a diffusion-sample log line adds about the prompts drawn."""
        return ""

    def write_prompts(self, path: Path, prompts: list[str] | None, seeds: list[int], cfg) -> str:
        """prompts.jsonl beside save_images' PNGs, where there are prompts; what the log adds."""
        return ""

    def batch(self, labels, generator: torch.Generator):
        return None

    def held_out(self, split: Split) -> Split:
        return split

    def rows(self, count: int) -> Drawn:
        return Drawn()

    each = rows

    def requested(self, cfg) -> Drawn:
        if read_prompts(cfg) is not None or cfg.negative_prompt is not None:
            raise UserError(f"prompt= needs a model trained on captions (data.captions=...), but {cfg.ckpt} is "
                            f"conditioned on nothing: drop prompt=")
        if cfg.label is not None:
            raise UserError(f"label={cfg.label} needs a class-conditional model, but {cfg.ckpt} has "
                            f"model.num_classes=0: drop label=, or train with model.num_classes=10")
        if cfg.guidance_scale != 1.0 and cfg.guidance == "cfg":
            raise UserError(f"guidance_scale={cfg.guidance_scale} needs a label (add label=K or label=all), "
                            f"or autoguidance: guidance=auto")
        return Drawn(nrow=cfg.nrow)


class ClassLabels(Unconditional):
    """Class indices 0 ... n-1; n is the null label."""
    labelled = True

    def __init__(self, num_classes: int, names: list[str], drop_prob: float = 0.0, device="cpu"):
        self.n, self.names, self.drop_prob = num_classes, names, drop_prob
        self.null = torch.tensor(num_classes, device=device)
        self.titles = [names[k] if k < len(names) else str(k) for k in range(num_classes)]

    def batch(self, labels, generator: torch.Generator):
        return labels

    def pair(self, cond: torch.Tensor, negative=None) -> tuple[torch.Tensor, torch.Tensor]:
        return cond, torch.full_like(cond, self.n)

    def rows(self, count: int) -> Drawn:
        per_row = -(-count // self.n)
        which = torch.arange(self.n).repeat_interleave(per_row)
        return Drawn(which, which, per_row, self.titles)

    def each(self, count: int) -> Drawn:
        which = torch.arange(count) % self.n
        return Drawn(which, which, -(-count // self.n), self.titles)

    def requested(self, cfg) -> Drawn:
        """none, num_samples of one class (by name or index), or for `all` one titled row per class
        of ceil(num_samples / num_classes) images."""
        if read_prompts(cfg) is not None or cfg.negative_prompt is not None:
            raise UserError(f"prompt= needs a model trained on captions (data.captions=...), but {cfg.ckpt} is "
                            f"conditioned on class labels: use label=K")
        if cfg.label is None:
            return Unconditional.requested(self, cfg)
        if cfg.label == "all":
            return self.rows(self.n * -(-cfg.num_samples // self.n))
        label = str(cfg.label)
        if label in self.names:
            index = self.names.index(label)
        elif label.isdigit() and int(label) < self.n:
            index = int(label)
        else:
            names = f" or a name: {', '.join(self.names)}" if self.names else ""
            raise UserError(f"label={cfg.label} is not a class of this model: use 0 to {self.n - 1}{names}, or all")
        labels = torch.full((cfg.num_samples,), index)
        return Drawn(labels, labels, cfg.nrow)


class Captions(Unconditional):
    """Caption tokens (B, L) of the model's text encoder, padded with PAD; the empty caption is the
    null condition. A training split carries caption groups (one per image): each batch draws one
    caption of each image's group."""
    labelled = True

    def __init__(self, text: nn.Module, data_cfg, captions: list[list[str]] | None = None, device="cpu",
                 drop_prob: float = 0.0):
        self.text, self.data_cfg, self.drop_prob = text, data_cfg, drop_prob
        self.table = CaptionTable(captions, self.tokens, device) if captions is not None else None
        self.null = text.null(1, self.table.tokens.shape[1]) if captions is not None else None

    def tokens(self, prompts: list[str], what: str = "captions") -> torch.Tensor:
        return tokenize(self.text.encoder, prompts, what)

    eval_hint = "; CLIP score needs prompt=\"...\" and a whole CLIP model as the text encoder"

    def aligns(self, prompts: list[str] | None = None) -> bool:
        """With prompts and a text encoder that is a whole CLIP model (its image tower too)."""
        path = getattr(self.text.encoder, "path", None)  # CLIP's; the tiny encoder has none
        return bool(prompts or self.prompts) and path is not None and pretrained.is_full_clip(path)

    def alignment(self, images: torch.Tensor, prompts: list[str] | None) -> dict:
        """CLIP score of each image against its prompt."""
        return {"clip_score": clip_score(images, prompts, self.text.encoder.path)} if prompts and self.aligns(prompts) else {}

    def batch(self, labels, generator: torch.Generator):
        return self.table.draw(labels, generator)

    def held_out(self, split: Split) -> Split:
        """Held-out images are evaluated with their first caption; grids draw the data's prompts."""
        self.prompts = grid_prompts(self.data_cfg, split)
        return split._replace(labels=self.table.first(split.labels).cpu())

    def pair(self, cond: torch.Tensor, negative=None) -> tuple[torch.Tensor, torch.Tensor]:
        """A prompt's tokens and the negative prompt's (default: the empty caption's), as wide."""
        unconditional = negative if negative is not None else self.text.null(len(cond), cond.shape[1]).to(cond.device)
        width = max(cond.shape[1], unconditional.shape[1])
        return padded(cond, width), padded(unconditional, width)

    def drawn(self, prompts: list[str], count: int, grid: bool) -> Drawn:
        n = len(prompts)
        per_row = -(-count // n)
        which = torch.arange(n).repeat_interleave(per_row) if grid else torch.arange(count) % n
        classes = prompt_classes(prompts, self.data_cfg)
        shows = None if classes is None else classes[which]
        return Drawn(self.tokens(prompts, "prompts")[which], shows, per_row, list(prompts),
                     prompts=[prompts[i] for i in which])

    def rows(self, count: int) -> Drawn:
        return self.drawn(self.prompts, count, grid=True) if self.prompts else Drawn()

    def each(self, count: int) -> Drawn:
        return self.drawn(self.prompts, count, grid=False) if self.prompts else Drawn()

    def describe(self, prompts: list[str] | None) -> str:
        return f", {len(set(prompts))} prompt(s)" if prompts else ""

    def write_prompts(self, path: Path, prompts: list[str] | None, seeds: list[int], cfg) -> str:
        """prompts.jsonl: for each PNG of images/, its prompt and the seed of its initial noise."""
        if not prompts:
            return ""
        with atomic_write(path) as file:
            for index, (prompt, seed) in enumerate(zip(prompts, seeds)):
                file.write(json.dumps({"file_name": f"images/{index:06d}.png", "prompt": prompt,
                                       "negative_prompt": cfg.negative_prompt, "seed": seed,
                                       "guidance_scale": cfg.guidance_scale}) + "\n")
        return " and prompts.jsonl"

    def requested(self, cfg) -> Drawn:
        if cfg.label is not None:
            raise UserError(f"label={cfg.label} is for class-conditional models; {cfg.ckpt} was trained on "
                            f"captions: use prompt=\"...\" (or prompts_file=)")
        prompts = read_prompts(cfg)
        if prompts is None:
            if (cfg.guidance_scale != 1.0 and cfg.guidance == "cfg") or cfg.negative_prompt is not None:
                raise UserError("guidance_scale and negative_prompt need a prompt: add prompt=\"...\"")
            return Drawn(nrow=cfg.nrow)
        drawn = self.drawn(prompts, cfg.num_samples, grid=True)
        if cfg.eval and drawn.classes is None and self.data_cfg.get("captions") == "labels":
            log.info("label_accuracy: some prompts follow none of the data's caption templates, so "
                     "the digit each should show is unknown; left out")
        if len(prompts) == 1:  # one prompt: a square grid, like unconditional samples
            drawn = drawn._replace(nrow=cfg.nrow, titles=None)
        count = len(drawn.conditions)
        negative = None
        if cfg.negative_prompt is not None:
            negative = self.tokens([cfg.negative_prompt], "negative prompts").expand(count, -1)
        return drawn._replace(negative=negative)


def condition_of(model: nn.Module, data_cfg=None, captions: list[list[str]] | None = None, device="cpu",
                 drop_prob: float = 0.0) -> Unconditional:
    """The condition `model` takes (its text encoder, or its classes), for data of `data_cfg`;
    `captions`: the training split's caption groups, tokenized once onto `device` for training."""
    text = getattr(model, "text", None)
    if text is not None:
        return Captions(text, data_cfg, captions, device, drop_prob)
    if model.num_classes:
        names = list((data_cfg or {}).get("classes") or [])
        return ClassLabels(model.num_classes, names, drop_prob, device)
    return Unconditional()


def check_config(cfg) -> None:
    """Before a run: a class-conditional model needs as many classes as the data's labels have; a
    model is conditioned on class labels or on captions, not both; captions need a model with
    cross-attention and data that has them. The text encoder is built now (CLIP's weights loaded
    once per process), so that a bad one stops the run here."""
    model, data = cfg.model, cfg.data
    if model.num_classes:
        available = len(data.classes) if data.get("classes") else len(class_names(data))
        if model.num_classes != available:
            fix = (f"use model.num_classes={available} (class-conditional) or 0" if available
                   else "use model.num_classes=0, or labelled data (data=mnist, data.labels=subfolders)")
            raise UserError(f"model.num_classes={model.num_classes} but data={data.kind} has "
                            f"{available or 'no'} classes: {fix}")
    kind = data.get("captions", "none")
    if kind == "none":
        return
    if kind == "labels" and not class_names(data):
        raise UserError(f"data.captions=labels makes captions from class names, but data={data.kind} has no "
                        f"labels: use data.labels=subfolders, a labelled set (data=mnist), or a caption "
                        f"format (auto, jsonl, csv, sidecar)")
    if kind != "labels" and DATASETS[data.kind].captions is None:
        raise UserError(f"data.captions={kind} reads a folder's caption files: use data=folder, or "
                        f"data.captions=labels for captions made from data={data.kind}'s class names")
    if model.num_classes:
        raise UserError(f"data.captions={kind} conditions the model on captions, and model.num_classes="
                        f"{model.num_classes} on class labels: choose one (model.num_classes=0, or data.captions=none)")
    if model.kind not in TEXT_MODELS:
        raise UserError(f"data.captions={kind} needs a model that attends to text: use model=resunet (or "
                        f"resunet32, resunet64) or model=dit, not model={model.kind}")
    try:
        build_text_encoder(text_config(cfg))
    except ValueError as error:
        raise UserError(str(error)) from None


def moved_text_encoder(state: dict, path: str | None) -> dict:
    """A checkpoint whose CLIP loads from `path` (a run moved to another machine); its fingerprint
    still refuses other weights."""
    if path is None:
        return state
    config = state["config"]
    if text_config(OmegaConf.create(config)) is None or config["text_encoder"]["kind"] != "clip":
        raise UserError(f"text_encoder.path={path}: this model reads no pretrained text encoder (it was not "
                        f"trained with text_encoder=clip on captions); leave it out")
    config["text_encoder"]["path"] = path
    return state


def text_config(cfg) -> dict | None:
    """The run's text_encoder config when its data has captions, else None."""
    if cfg.data.get("captions", "none") == "none":
        return None
    return OmegaConf.to_container(cfg.text_encoder, resolve=True)
