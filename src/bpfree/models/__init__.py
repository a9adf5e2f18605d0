"""The model zoo. Each model places its own feedback points and knows nothing of methods.

``bpfree.models.create(name, input_shape, num_classes, **options)`` builds one; each model module
registers a builder with an ``Options`` dataclass, so options are validated and documented.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .. import options as opts
from ..registry import Registry


@dataclass(frozen=True)
class ModelSpec:
    name: str
    summary: str
    options: type
    build: Callable[..., nn.Module]


_REGISTRY: Registry[ModelSpec] = Registry("model", __name__, __path__)


def register(name: str, summary: str, options: type):
    """Decorator: register a builder under ``name`` with its options dataclass."""

    def deco(fn):
        _REGISTRY.add(name, ModelSpec(name, summary, options, fn))
        return fn

    return deco


def available() -> list[str]:
    return _REGISTRY.available()


def get(name: str) -> ModelSpec:
    return _REGISTRY.get(name)


def create(name: str, input_shape: tuple[int, ...], num_classes: int, **options: Any) -> nn.Module:
    """Build model ``name`` for inputs of ``input_shape`` (without batch) and ``num_classes`` outputs."""
    spec = get(name)
    o = opts.build(spec.options, options, what=f"model {name!r}")
    return spec.build(tuple(input_shape), int(num_classes), o)
