"""A name -> entry registry filled by the modules of one package, imported on first use.

Models, tasks and methods each keep one: adding a model, dataset or method is adding a module
to its package, with no list to edit. A module may also add a *resolver*, which builds the entry
of a name no module registered (``npz:PATH`` datasets, ``py:FILE.py:FACTORY`` models).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of kind ``kind`` registered by the modules of package ``package``."""

    def __init__(self, kind: str, package: str, path: Iterable[str], skip: tuple[str, ...] = ()) -> None:
        self.kind, self.package, self.path, self.skip = kind, package, list(path), skip
        self.entries: dict[str, T] = {}
        self.resolvers: list[tuple[Callable[[str], T | None], str]] = []
        self._loaded = False

    def add(self, name: str, entry: T) -> None:
        self.entries[name] = entry

    def add_resolver(self, resolve: Callable[[str], T | None], hint: str) -> None:
        """``resolve(name)`` builds the entry of an unregistered name it understands (else ``None``);
        ``hint`` (e.g. ``"npz:PATH"``) is listed in the unknown-name error."""
        self.resolvers.append((resolve, hint))

    def load_all(self) -> None:
        if not self._loaded:
            self._loaded = True
            for info in pkgutil.iter_modules(self.path):
                if info.name not in self.skip:
                    importlib.import_module(f"{self.package}.{info.name}")

    def available(self) -> list[str]:
        self.load_all()
        return sorted(self.entries)

    def get(self, name: str) -> T:
        self.load_all()
        if name in self.entries:
            return self.entries[name]
        for resolve, _ in self.resolvers:
            entry = resolve(name)
            if entry is not None:
                return entry
        hints = "".join(f", {hint}" for _, hint in self.resolvers)
        raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(sorted(self.entries))}{hints}")
