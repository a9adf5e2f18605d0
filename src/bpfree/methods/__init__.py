"""Learning rules, one module each; all implement :class:`bpfree.methods.base.Method`.

``bpfree.methods.create(name, model, **options)`` builds one by name. Every module in this package
that defines a Method subclass decorated with :func:`register` is found automatically: a new
method is one new module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from torch import nn

from .base import Method, StepResult

_REGISTRY: dict[str, type[Method]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` available to :func:`create` under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"a method named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")
    _loaded = True


def available() -> list[str]:
    """Names of all registered methods."""
    _load_all()
    return sorted(_REGISTRY)


def get(name: str) -> type[Method]:
    """The Method class registered as ``name``."""
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def create(name: str, model: nn.Module, **options: Any) -> Method:
    """Build the method ``name`` for ``model`` with ``options`` (see each method's ``Options``)."""
    return get(name)(model, **options)


__all__ = ["Method", "StepResult", "available", "create", "get", "register"]
