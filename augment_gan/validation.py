"""Config values checked against their dataclass field types, so a wrong type fails when the config is built.

YAML, JSON and keyword arguments carry no types: `conditional: "no"` is a (true) string, `g_channels: 12.5`
a float, `seed: "7"` a string, `--minutes nan` a float that compares false with everything. Each config
dataclass (`TrainConfig`, `SynthConfig`, `VaryConfig`, `EvaluateConfig`) calls `check_types(self)` first in
its `__post_init__`, so such values are a one-line `UserError` naming the field, not a late crash or a run
that silently does something else. No value is converted to another meaning: integers are accepted where
a float is expected (and stored as floats), lists where a tuple is expected (stored as tuples), path
objects where a string is expected (stored as strings).
"""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any

from augment_gan.errors import UserError

_NO = object()  # "does not conform"
_HINTS: dict[type, dict[str, Any]] = {}


def check_types(config: Any) -> None:
    """Check every field of a (frozen) config dataclass against its annotation; normalise it in place.

    Raises `UserError("<field> must be <type>, got <value>")` for the first field that does not conform.
    """
    cls = type(config)
    hints = _HINTS.get(cls)
    if hints is None:
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        hint = hints[f.name]
        conformed = _conform(value, hint)
        if conformed is _NO:
            raise UserError(f"{f.name} must be {_describe(hint)}, got {value!r}")
        if conformed is not value:
            object.__setattr__(config, f.name, conformed)


def _conform(value: Any, hint: Any) -> Any:
    """`value` as a `hint` (possibly normalised), or `_NO`."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        if value is None and type(None) in typing.get_args(hint):
            return None
        for arm in typing.get_args(hint):
            if arm is not type(None):
                conformed = _conform(value, arm)
                if conformed is not _NO:
                    return conformed
        return _NO
    if hint is bool:
        return value if isinstance(value, bool) else _NO
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            return _NO
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return _NO
        return value if type(value) is float else float(value)
    if hint is str:
        if isinstance(value, str):
            return value
        return os.fspath(value) if isinstance(value, os.PathLike) else _NO
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return _NO
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            return _NO
        items = [_conform(v, a) for v, a in zip(value, arms)]
        if any(item is _NO for item in items):
            return _NO
        return value if isinstance(value, tuple) and all(i is v for i, v in zip(items, value)) else tuple(items)
    return value  # Any and other annotations: not checked here


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        arms = [a for a in typing.get_args(hint) if a is not type(None)]
        text = " or ".join(_describe(a) for a in arms)
        return f"{text} or null" if type(None) in typing.get_args(hint) else text
    if origin is tuple:
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(args[0])}"
        if len(set(args)) == 1:
            return f"a list of {len(args)} {_plural(args[0])}"
        return "a list of " + ", ".join(_describe(a) for a in args)
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _plural(hint: Any) -> str:
    return {bool: "booleans", int: "integers", float: "finite numbers", str: "strings"}.get(hint, _describe(hint))
