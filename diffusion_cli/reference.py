"""The config reference (docs/reference/config.md), generated: every option of every group with
each key's default and doc line from its YAML file and what the checks allow (config.RULES, which
the schemas' field metadata feed). `python -m diffusion_cli.reference > docs/reference/config.md`
writes it; a test fails when the file is stale."""

import re
from importlib.resources import files

from .config import RULES

HEADER = """# Config reference

Generated from `conf/` and the schemas by `python -m diffusion_cli.reference`: do not edit. Each
option's keys, their defaults and what they allow; set any of them as `group.key=value`. A key that
the chosen option does not have is an error naming the options that have it.
"""
KEY = re.compile(r"^(\s*)(\w+):\s*(.*?)\s*(?:#\s?(.*))?$")


def allowed() -> dict[str, str]:
    return {key: text for key, _, text in RULES}


def keys_of(yaml: str) -> list[tuple[str, str, str]]:
    """(dotted key, default, doc) of each leaf key of a YAML file, in order; comment lines below a
    key join its doc, a value on the next line (a list) is its value; `defaults` and `hydra` are
    left out."""
    rows, path, skipping = [], [], False
    for line in yaml.splitlines():
        match = KEY.match(line)
        if match and not line.lstrip().startswith("#"):
            indent, key, value, doc = match.groups()
            depth = len(indent) // 2
            path = path[:depth] + [key]
            skipping = path[0] in ("defaults", "hydra")
            if not skipping:
                rows.append([".".join(path), value, doc or "", bool(value)])
        elif rows and not skipping and line.lstrip().startswith("#") and line.startswith(" "):
            rows[-1][2] = (rows[-1][2] + " " + line.strip().lstrip("#").strip()).strip()
        elif rows and not skipping and line.strip() and not rows[-1][3]:
            rows[-1][1], rows[-1][3] = line.split("#")[0].strip(), True
            if "#" in line:
                rows[-1][2] = line.split("#", 1)[1].strip()
    parents = {row[0].rpartition(".")[0] for row in rows}
    return [(key, value, doc) for key, value, doc, _ in rows if key not in parents]


def description(yaml: str) -> str:
    """The comment lines a YAML file opens with."""
    lines = []
    for line in yaml.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line.lstrip("#").strip())
    return " ".join(lines)


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(prefix: str, yaml: str, rules: dict[str, str]) -> list[str]:
    rows = keys_of(yaml)
    if not rows:
        return []
    out = ["| key | default | allowed | what it does |", "| --- | --- | --- | --- |"]
    for key, value, doc in rows:
        full = f"{prefix}{key}"
        out.append(f"| `{full}` | `{cell(value)}` | {cell(rules.get(full, ''))} | {cell(doc)} |")
    return out


def reference() -> str:
    conf, rules = files("diffusion_cli.conf"), allowed()
    out = [HEADER]
    for command, name in (("diffusion-train", "train.yaml"), ("diffusion-sample", "sample.yaml")):
        out += [f"## {command}", "", *table("", conf.joinpath(name).read_text(), rules), ""]
    for group in sorted(path.name for path in conf.iterdir() if path.is_dir() and not path.name.startswith("_")):
        out += [f"## {group}", ""]
        for option in sorted(p.name[:-5] for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml")):
            yaml = conf.joinpath(group, f"{option}.yaml").read_text()
            out += [f"### {group}={option}", "", description(yaml), ""]
            prefix = "" if "@package _global_" in yaml else f"{group}."
            out += [*table(prefix, yaml, rules), ""]
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(reference(), end="")
