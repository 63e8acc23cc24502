"""Option dataclasses as the one source of the command line.

A field made with `option(...)` carries its flag's help, argument group, argparse keywords and checks. The flags
are built from the fields (`add_options`), read back into the dataclass (`options_from_args`), and checked by one
set of rules (`check_fields`) that names the flag, so a library call and the command line are refused alike.
"""

from __future__ import annotations

import argparse
import math
import types
import typing
from dataclasses import MISSING, Field, field, fields
from typing import Any, Callable

from .errors import MLAConvertError


def option(
    default: Any = MISSING,
    *,
    help: str | None = None,
    group: str | None = None,
    positive: bool = False,
    at_least: float | None = None,
    at_most: float | None = None,
    zero_means: str | None = None,
    parse: Callable[[str], Any] | None = None,
    **argparse_keywords,
) -> Field:
    """A dataclass field with its command-line flag `--field-name`.

    `help`: the flag's help (`None` leaves the field off the command line); `group`: the key of the argument group
    it is listed under (`None`: the command's own options); `argparse_keywords`: `choices`, `metavar`, `type`,
    `required`... (`type` defaults to the field's annotation). Checks: `choices`, `positive`, `at_least`,
    `at_most` (`zero_means` says what 0 does where `at_least=0`), and a value of `None` is accepted where the
    default is `None` (unset). `parse` turns the command line's string into the field's value (after argparse).
    """
    metadata = {
        "help": help,
        "group": group,
        "argparse": argparse_keywords,
        "checks": {"positive": positive, "at_least": at_least, "at_most": at_most, "zero_means": zero_means},
        "parse": parse,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def on_command_line(f: Field) -> bool:
    return f.metadata.get("help") is not None


def _argparse_type(options_class: type, f: Field) -> type:
    """The field's annotation where it is one plain type (`int`, `int | None`, ...), else `str`."""
    hint = typing.get_type_hints(options_class)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        candidates = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        hint = candidates[0] if len(candidates) == 1 else str
    return hint if hint in (int, float, str) else str


def add_options(
    parser: argparse.ArgumentParser, options_class: type, groups: dict[str, Any] | None = None
) -> None:
    """One flag per documented field of `options_class`, in field order, each in the container (`parser`, an
    argument group or a mutually exclusive group) that `groups` gives for its `group` key."""
    groups = groups or {}
    for f in fields(options_class):
        if not on_command_line(f):
            continue
        container = parser if f.metadata["group"] is None else groups[f.metadata["group"]]
        keywords = {"help": f.metadata["help"].replace("%", "%%"), **f.metadata["argparse"]}
        if isinstance(f.default, bool):
            keywords["action"] = "store_true"
        else:
            keywords.setdefault("type", _argparse_type(options_class, f))
            keywords["default"] = None if keywords.get("required") else f.default
        container.add_argument(flag(f.name), **keywords)


def options_from_args(options_class: type, args: argparse.Namespace, **overrides):
    """The dataclass from parsed arguments: every field that has a flag, through its `parse`, then `overrides`."""
    values = {}
    for f in fields(options_class):
        if on_command_line(f) and hasattr(args, f.name):
            value = getattr(args, f.name)
            parse = f.metadata["parse"]
            values[f.name] = parse(value) if parse is not None and isinstance(value, str) else value
    return options_class(**{**values, **overrides})


def check_fields(options) -> None:
    """Refuses a value outside its field's `choices`, `positive`, `at_least` or `at_most`, naming the flag (or,
    for a field without one, the field) and the valid values."""
    for f in fields(options):
        if "checks" not in f.metadata:
            continue
        value = getattr(options, f.name)
        if value is None and f.default is None:
            continue
        name = flag(f.name) if on_command_line(f) else f.name
        choices = f.metadata["argparse"].get("choices")
        if choices and value not in choices:
            raise MLAConvertError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        problem = _range_problem(value, **f.metadata["checks"])
        if problem:
            raise MLAConvertError(f"{name} must be {problem}, got {value}")


def _range_problem(value, positive: bool, at_least, at_most, zero_means) -> str | None:
    """What `value` must be, if it is not; None if it is fine."""
    if not (positive or at_least is not None or at_most is not None):
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        return "a number"
    if isinstance(value, float) and math.isinf(value):
        return "a finite number"
    if positive and not value > 0:
        return "positive"
    if at_least is not None and at_most is not None and not at_least <= value <= at_most:
        return f"in [{at_least}, {at_most}]"
    if at_least is not None and value < at_least:
        if at_least == 0:
            return f"0 ({zero_means}) or positive" if zero_means else "0 or positive"
        return f"at least {at_least}"
    if at_most is not None and value > at_most:
        return f"at most {at_most}"
    return None
