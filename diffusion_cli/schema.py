"""Config schemas from the dataclasses of the code they configure: a field's type, and in its
metadata the range check (`check`) that validation applies, so that a key is declared once beside
its code (plus its default and doc line in the group's YAML)."""

import re
import types
import typing
from dataclasses import MISSING as NO_DEFAULT, field, fields, make_dataclass
from importlib.resources import files
from typing import Any, Callable, Optional

from omegaconf import MISSING, OmegaConf


def check(test: Callable[[Any], bool], allowed: str, default=NO_DEFAULT, resumable: bool = False) -> Any:
    """A dataclass field whose value must pass `test`; `allowed` says what passes, in the error.
    `resumable`: the key may change when a run is resumed (how long it runs, where, what it logs)."""
    return field(default=default, metadata={"check": (test, allowed), "resumable": resumable})


def plain(resumable: bool = False) -> Any:
    """A schema field with no range of its own (its type is the check), MISSING until its YAML."""
    return field(default=MISSING, metadata={"resumable": resumable})


def positive(allowed: str = "an integer >= 1", **options) -> Any:
    return check(lambda v: v >= 1, allowed, MISSING, **options)


def non_negative(allowed: str = "an integer >= 0", **options) -> Any:
    return check(lambda v: v >= 0, allowed, MISSING, **options)


def one_of(choices, **options) -> Any:
    choices = tuple(choices)
    return check(lambda v: v in choices, f"one of: {', '.join(map(str, choices))}", MISSING, **options)


def levels(allowed: str = "a list of integers >= 1, e.g. [1,2,2]") -> Any:
    return check(lambda v: len(v) >= 1 and min(v) >= 1, allowed, MISSING)


def _omegaconf_type(hint):
    """`X | None` as Optional[X], which OmegaConf's structured configs take."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        others = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if len(others) == 1:
            return Optional[others[0]]
    return hint


def schema_of(cls: type) -> type:
    """The structured config of a group option built from `cls`: `kind` and each field of cls,
    typed, every value from the option's YAML (so a key the option lacks is an error)."""
    hints = typing.get_type_hints(cls)
    return make_dataclass(f"{cls.__name__}Config", [("kind", str, MISSING)] + [
        (f.name, _omegaconf_type(hints[f.name]), MISSING) for f in fields(cls)])


def resumable_keys(prefix: str, cls: type) -> tuple[str, ...]:
    return tuple(f"{prefix}.{f.name}" for f in fields(cls) if f.metadata.get("resumable"))


def full_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def rules_of(prefix: str, classes) -> list[tuple[str, Callable, str]]:
    """(key, test, allowed) for each checked field of `classes` (each key once); prefix "": the
    command's own top-level keys."""
    rules = {}
    for cls in classes:
        for f in fields(cls):
            if "check" in f.metadata:
                rules.setdefault(full_key(prefix, f.name), f.metadata["check"])
    return [(key, test, allowed) for key, (test, allowed) in rules.items()]


def group_options(group: str) -> str:
    """The options of a config group, as --help lists them: ddpm|ddim|..."""
    folder = files("diffusion_cli.conf").joinpath(group)
    return "|".join(sorted(path.name[:-5] for path in folder.iterdir() if path.name.endswith(".yaml"))
                    if folder.is_dir() else [])


def option_keys(group: str, option: str) -> set[str]:
    """The keys a group option's YAML sets, those of the options it extends included."""
    path = files("diffusion_cli.conf").joinpath(group, f"{option}.yaml")
    if not path.is_file():
        return set()
    node = OmegaConf.create(path.read_text())
    keys = set(node) - {"defaults"}
    for parent in node.get("defaults", []):
        if isinstance(parent, str) and not parent.startswith(("/", "_self_")):
            keys |= option_keys(group, parent)
    return keys


# Keys that moved: old name -> (new name, why); checkpoint.migrated moves them in saved configs.
MOVED = {"data.caption_dropout": ("trainer.cond_drop_prob", "one key for class labels and captions"),
         "model.prediction": ("objective.prediction", "what the network predicts is the objective's: objective=eps|x0|v"),
         "trainer.loss_weighting": ("objective.weighting", "how the loss is weighted is the objective's")}


def other_kinds_key(message: str) -> str | None:
    """For Hydra's error on a key that the chosen option of its group lacks, the one line naming
    the options that have it (None where no option has it)."""
    match = re.search(r"Could not override '(\w+)\.(\w+)'", message)
    if not match or "not in" not in message:
        return None
    group, key = match.groups()
    if f"{group}.{key}" in MOVED:
        new, why = MOVED[f"{group}.{key}"]
        return f"{group}.{key} is now {new} ({why}): use {new}=..."
    have = [option for option in group_options(group).split("|") if key in option_keys(group, option)] \
        if group_options(group) else []
    if not have:
        return None
    return (f"{group}.{key} is a key of {group}={'|'.join(have)}; add {group}={have[0]} (each {group} "
            f"option has its own keys: --cfg job shows this run's)")
