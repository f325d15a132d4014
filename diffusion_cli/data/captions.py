"""Captions of a folder's images (data.captions), read in the project (no `datasets` dependency):

- jsonl: the Hugging Face imagefolder convention, a metadata.jsonl beside the images, one JSON
  object a line with `file_name` (relative to the metadata file's folder) and a text column;
- csv: the same as metadata.csv;
- sidecar: <image stem>.txt beside each image, one caption a line;
- auto: the first of these that the folder has.

A caption value may be a list (jsonl) or several lines (sidecar): training draws one at random.
This is the first step of prompt conditioning (issue 16); the training path does not read it yet.
"""

import csv
import json
from pathlib import Path

from ..errors import UserError

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
