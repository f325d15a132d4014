"""Caption files of a folder (data/captions.py): each format, lists and multi-line files, auto's
choice, images without captions, and one-line errors for broken metadata."""

import json

import pytest

from diffusion_cli.data.captions import read_captions
from diffusion_cli.errors import UserError


@pytest.fixture
def folder(tmp_path):
    """Three images, one in a subfolder (captions only name files; the pixels don't matter)."""
    images = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "sub" / "c.png"]
    for image in images:
        image.parent.mkdir(exist_ok=True)
        image.write_bytes(b"")
    return tmp_path, images


def test_jsonl_with_a_list_and_a_nested_metadata_file(folder):
    root, (a, b, c) = folder
    (root / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n\n"
        + json.dumps({"file_name": "b.png", "text": ["blue", " a blue square "]}) + "\n"
        + json.dumps({"file_name": "gone.png", "text": "no such image"}) + "\n")
    (root / "sub" / "metadata.jsonl").write_text(json.dumps({"file_name": "c.png", "text": "green"}) + "\n")
    assert read_captions(root, [a, b, c], "jsonl") == {a: ["a red square"], b: ["blue", "a blue square"],
                                                       c: ["green"]}


def test_csv_with_another_caption_column(folder):
    root, (a, b, c) = folder
    (root / "metadata.csv").write_text('file_name,prompt\na.png,"a red, square"\nsub/c.png,green\n')
    assert read_captions(root, [a, b, c], "csv", column="prompt") == {a: ["a red, square"], c: ["green"]}


def test_sidecar_files_give_a_caption_a_line_and_empty_files_none(folder):
    root, (a, b, c) = folder
    a.with_suffix(".txt").write_text("a red square\n\nred\n")
    c.with_suffix(".txt").write_text("\n")
    assert read_captions(root, [a, b, c], "sidecar") == {a: ["a red square", "red"]}


def test_auto_takes_the_first_format_the_folder_has(folder):
    root, (a, b, c) = folder
    a.with_suffix(".txt").write_text("from the sidecar")
    assert read_captions(root, [a, b, c], "auto") == {a: ["from the sidecar"]}
    (root / "metadata.csv").write_text("file_name,text\nb.png,from the csv\n")
    assert read_captions(root, [a, b, c], "auto") == {b: ["from the csv"]}
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/c.png", "text": "from jsonl"}) + "\n")
    assert read_captions(root, [a, b, c], "auto") == {c: ["from jsonl"]}


@pytest.mark.parametrize("content, named", [
    ('{"file_name": "a.png", "text": "ok"}\n{not json\n', "metadata.jsonl:2 is not a JSON object"),
    ('{"file_name": "a.png", "caption": "x"}\n', "has no 'text' column (it has: file_name, caption)"),
    ('{"file_name": "a.png", "text": 3}\n', "use a string or a list of strings"),
])
def test_broken_metadata_is_one_line_naming_the_file(folder, content, named):
    root, images = folder
    (root / "metadata.jsonl").write_text(content)
    with pytest.raises(UserError, match=r"metadata\.jsonl") as error:
        read_captions(root, images, "jsonl")
    assert named in str(error.value) and "\n" not in str(error.value)


def test_auto_without_captions_says_what_to_add(folder):
    root, images = folder
    with pytest.raises(UserError, match="found no captions .* metadata.jsonl"):
        read_captions(root, images, "auto")
