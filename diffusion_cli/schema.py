"""Config schemas from the dataclasses of the code they configure: a field's type, and in its
metadata the range check (`check`) that validation applies, so that a key is declared once beside
its code (plus its default and doc line in the group's YAML)."""

import types
import typing
from dataclasses import MISSING as NO_DEFAULT, field, fields, make_dataclass
from typing import Any, Callable, Optional

from omegaconf import MISSING


def check(test: Callable[[Any], bool], allowed: str, default=NO_DEFAULT) -> Any:
    """A dataclass field whose value must pass `test`; `allowed` says what passes, in the error."""
    return field(default=default, metadata={"check": (test, allowed)})


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


def rules_of(prefix: str, classes) -> list[tuple[str, Callable, str]]:
    """(key, test, allowed) for each checked field of `classes` (each key once)."""
    rules = {}
    for cls in classes:
        for f in fields(cls):
            if "check" in f.metadata:
                rules.setdefault(f"{prefix}.{f.name}", f.metadata["check"])
    return [(key, test, allowed) for key, (test, allowed) in rules.items()]
