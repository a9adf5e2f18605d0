"""Typed, documented options for models, methods, datasets and the training loop.

Every configurable piece declares its options as a dataclass whose fields carry a default, a
help text and, where it applies, the allowed choices::

    @dataclass
    class Options:
        rule: str = option("rescale", "feedback update rule", choices=("rescale", "cosine"))

:func:`build` turns a mapping of values (Python values, or strings from the command line such as
``"256,256"``) into an instance, and rejects unknown keys and bad values with an error that names
the key and lists what is valid.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any


class OptionError(ValueError):
    """An unknown option, or a value an option cannot take."""


def option(default: Any, help: str, *, choices: tuple | None = None) -> Any:
    """A dataclass field with a help text and optional allowed ``choices``."""
    metadata = {"help": help, "choices": choices}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple for sequence defaults")
    return dataclasses.field(default=default, metadata=metadata)


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """``(name, default, help)`` for each option of the dataclass ``cls``."""
    out = []
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help", "")
        if f.metadata.get("choices"):
            text += f" (one of: {', '.join(map(str, f.metadata['choices']))})"
        out.append((f.name, f.default, text))
    return out


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is tuple:
        item = args[0]
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
        elif isinstance(value, (list, tuple)):
            parts = list(value)
        else:
            parts = [value]
        return tuple(_convert(p, item, key) for p in parts)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise OptionError(f"option {key!r} takes true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise OptionError(f"option {key!r} takes an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        except (TypeError, ValueError, OverflowError):
            raise OptionError(f"option {key!r} takes an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise OptionError(f"option {key!r} takes a number, got {value!r}") from None
    if tp is str:
        return str(value)
    return value


def build(cls: type, values: Mapping[str, Any] | None = None, *, what: str = "") -> Any:
    """An instance of the options dataclass ``cls`` from ``values``, converted and checked."""
    values = dict(values or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        label = f" for {what}" if what else ""
        raise OptionError(
            f"unknown option{'s' if len(unknown) > 1 else ''}{label}: {', '.join(unknown)}; "
            f"valid options: {', '.join(fields) or '(none)'}"
        )
    presets = getattr(cls, "preset_defaults", None)
    if presets is not None:
        # a named preset supplies defaults for the options not given (given ones win)
        values = {**presets(values), **values}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        converted = _convert(value, hints[key], key)
        choices = fields[key].metadata.get("choices")
        if choices is not None:
            seq = converted if isinstance(converted, tuple) else (converted,)
            bad = [v for v in seq if v not in choices]
            if bad:
                raise OptionError(
                    f"option {key!r} cannot be {bad[0]!r}; choose one of: {', '.join(map(str, choices))}"
                )
        kwargs[key] = converted
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def as_dict(obj: Any) -> dict[str, Any]:
    """The options of a dataclass instance as a plain dict (tuples become lists)."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()
    }
