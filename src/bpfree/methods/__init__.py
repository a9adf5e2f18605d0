"""Learning rules, one module each; all implement :class:`bpfree.methods.base.Method`.

``bpfree.methods.create(name, model, **options)`` builds one by name. Every module in this package
that defines a Method subclass decorated with :func:`register` is found automatically: a new
method is one new module here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from .base import Method, StepResult

_REGISTRY: Registry[type[Method]] = Registry("method", __name__, __path__, skip=("base",))


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to :func:`create` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    known = _REGISTRY.entries.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({known.__name__})")
    _REGISTRY.add(cls.name, cls)
    return cls


def available() -> list[str]:
    """Names of all registered methods."""
    return _REGISTRY.available()


def get(name: str) -> type[Method]:
    """The Method class registered as ``name``."""
    return _REGISTRY.get(name)


def create(name: str, model: nn.Module, **options: Any) -> Method:
    """Build the method ``name`` for ``model`` with ``options`` (see each method's ``Options``)."""
    return get(name)(model, **options)


__all__ = ["Method", "StepResult", "available", "create", "get", "register"]
