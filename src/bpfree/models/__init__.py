"""The model zoo. Each model places its own feedback points and knows nothing of methods.

``bpfree.models.create(name, input_shape, num_classes, **options)`` builds one; each model module
registers a builder with an ``Options`` dataclass, so options are validated and documented.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import options as opts


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    options: type
    build: Callable[..., nn.Module]


_REGISTRY: dict[str, ModelSpec] = {}
_loaded = False


def register(name: str, summary: str, options: type):
    """Decorator for ``build(input_shape, num_classes, opts) -> nn.Module``."""

    def deco(fn):
        _REGISTRY[name] = ModelSpec(name, summary, options, fn)
        return fn

    return deco


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _loaded = True


def available() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> ModelSpec:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def create(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (without batch) and ``num_classes`` outputs."""
    spec = get(name)
    o = opts.build(spec.options, options, what=f"model {name!r}")
    return spec.build(tuple(input_shape), int(num_classes), o)
