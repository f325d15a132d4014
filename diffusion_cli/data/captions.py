"""Captions (data.captions): a folder's own, or made from a labelled set's class names (labels).

A folder's captions are read in the project (no `datasets` dependency):

- jsonl: the Hugging Face imagefolder convention, a metadata.jsonl beside the images, one JSON
  object a line with `file_name` (relative to the metadata file's folder) and a text column;
- csv: the same as metadata.csv;
- sidecar: <image stem>.txt beside each image, one caption a line;
- auto: the first of these that the folder has.

A caption value may be a list (jsonl) or several lines (sidecar): training draws one at random.
With data.captions=labels every class gets a caption per template of data.caption_templates
("a handwritten {word}": "a handwritten seven"); data.held_out_template is kept out of training,
to try a phrasing the model has not seen.

A split carries its captions as groups: `Split.labels` holds each image's group (its class for
labels, the image itself for a folder) and `Split.captions` each group's captions, so that the
data paths move small indices, and CaptionTable turns them into the tokens of one caption drawn
at random, on the device.
"""

import csv
import json
import logging
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

FORMATS = ("jsonl", "csv", "sidecar")
METADATA = {"jsonl": "metadata.jsonl", "csv": "metadata.csv"}


def read_captions(root: Path, images: list[Path], kind: str, column: str = "text") -> dict[Path, list[str]]:
    """{image: its captions} for the images of `images` (files under root) that have any."""
    if kind == "auto":
        kind = found_format(root, images)
    if kind == "sidecar":
        captions = {image: lines(image.with_suffix(".txt")) for image in images
                    if image.with_suffix(".txt").is_file()}
    elif kind in METADATA:
        captions = {}
        for metadata in sorted(root.rglob(METADATA[kind])):
            for number, row in enumerate(read_rows(metadata, kind), start=1):
                captions[(metadata.parent / row_value(row, "file_name", metadata, number)).resolve()] = \
                    texts(row_value(row, column, metadata, number), metadata, number)
        wanted = {image.resolve(): image for image in images}
        captions = {wanted[path]: text for path, text in captions.items() if path in wanted}
    else:
        raise UserError(f"data.captions={kind} is not a caption format: use none, auto, "
                        f"{', '.join(FORMATS)} or labels")
    return {image: text for image, text in captions.items() if text}


def found_format(root: Path, images: list[Path]) -> str:
    """data.captions=auto: jsonl, csv or sidecar, the first the folder has."""
    for kind, name in METADATA.items():
        if next(root.rglob(name), None) is not None:
            return kind
    if any(image.with_suffix(".txt").is_file() for image in images):
        return "sidecar"
    raise UserError(f"data.captions=auto found no captions under {root}: add a metadata.jsonl or "
                    f"metadata.csv (file_name and text columns) or a <image>.txt beside each image")


def read_rows(metadata: Path, kind: str) -> list[dict]:
    if kind == "csv":
        with open(metadata, newline="", encoding="utf-8") as file:
            return list(csv.DictReader(file))
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as error:
            raise UserError(f"{metadata}:{number} is not a JSON object ({error}): write one "
                            f'object a line, e.g. {{"file_name": "0001.png", "text": "a red square"}}')
    return rows


def row_value(row: dict, key: str, metadata: Path, number: int):
    if not isinstance(row, dict) or key not in row:
        columns = ", ".join(row) if isinstance(row, dict) else "none"
        raise UserError(f"{metadata}: row {number} has no {key!r} column (it has: {columns}); set "
                        f"data.caption_column= to the column that holds the captions")
    return row[key]


def texts(value, metadata: Path, number: int) -> list[str]:
    """A caption cell as a list of non-empty captions (a list means one drawn at random)."""
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, str) for v in values):
        raise UserError(f"{metadata}: row {number}'s caption is {value!r}: use a string or a list "
                        f"of strings")
    return [v.strip() for v in values if v.strip()]


def lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def templated(template: str, name: str) -> str:
    """A caption from a template: {name} is the class name ("7", "cat"), {word} the name spelled
    out ("seven"; other names stay as they are)."""
    word = NUMBER_WORDS[int(name)] if name.isdigit() and int(name) < len(NUMBER_WORDS) else name
    return template.format(name=name, word=word)


def label_captions(data_cfg, classes: list[str]) -> list[list[str]]:
    """data.captions=labels: every class's captions, one per training template."""
    try:
        return [[templated(template, name) for template in data_cfg.caption_templates] for name in classes]
    except (KeyError, IndexError, ValueError) as error:
        raise UserError(f"data.caption_templates: {error!r} is not a placeholder; write templates "
                        f"with {{name}} (the class name) and {{word}} (it spelled out)") from None


class CaptionTable:
    """The captions of a split's groups, tokenized once and kept on the device: draw() picks one
    caption of each image's group at random (from the training stream, without a host sync);
    first() takes each group's first, as evaluation does."""

    def __init__(self, groups: list[list[str]], tokenize, device):
        distinct = sorted({caption for group in groups for caption in group})
        index = {caption: i for i, caption in enumerate(distinct)}
        width = max(len(group) for group in groups)
        self.tokens = tokenize(distinct).to(device)
        self.options = torch.tensor([[index[c] for c in group] + [0] * (width - len(group))
                                     for group in groups], device=device)
        self.counts = torch.tensor([len(group) for group in groups], device=device)

    def draw(self, groups: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        pick = torch.rand(groups.shape, generator=generator, device=groups.device) * self.counts[groups]
        return self.tokens[self.options[groups, pick.long()]]

    def first(self, groups: torch.Tensor) -> torch.Tensor:
        return self.tokens[self.options[groups.to(self.options.device), 0]]


def with_captions(data_cfg, train, evaluation, read_captions, classes) -> tuple:
    """The splits with their caption groups, where data.captions asks for them: made from the
    `classes()` names, or each image's as the data set's `read_captions(data_cfg)` gives them.
    Images without a caption are reported in one line, then trained with the empty caption or left
    out (data.missing_captions). conditions.check_config made sure the data has such captions."""
    kind = data_cfg.get("captions", "none")
    if kind == "none":
        return train, evaluation
    if kind == "labels":
        groups = label_captions(data_cfg, classes())
        return train._replace(captions=groups), evaluation._replace(captions=groups)
    groups = read_captions(data_cfg)
    missing = sum(not group for group in groups)
    if missing == len(groups):
        raise UserError(f"data.captions={kind}: none of the {len(groups)} images of {data_cfg.path} "
                        f"has a caption; check the file names in the metadata, or use data.captions=none")
    if missing:
        if data_cfg.missing_captions == "skip":
            what = "left out (data.missing_captions=skip)"
        else:
            what = "trained with the empty caption (data.missing_captions=skip leaves them out)"
        log.warning(f"{missing} of {len(groups)} images have no caption: {what}")
    if data_cfg.missing_captions == "skip":
        captioned = torch.tensor([bool(group) for group in groups])
        train, evaluation = train.keep(captioned[train.labels]), evaluation.keep(captioned[evaluation.labels])
        if not len(train.labels) or not len(evaluation.labels):
            raise UserError(f"data.missing_captions=skip leaves no {'training' if not len(train.labels) else 'held-out'} "
                            f"images: use data.missing_captions=empty, or caption more images")
    groups = [group or [""] for group in groups]
    return train._replace(captions=groups), evaluation._replace(captions=groups)
