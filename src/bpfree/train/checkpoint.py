"""Atomic files: a checkpoint or a result is either the old one or the new one, never half."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    _atomic(path, lambda f: torch.save(obj, f))


def save_text(text: str, path: Path) -> None:
    _atomic(path, lambda f: f.write(text.encode()))


def save_json(obj: Any, path: Path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def load_torch(path: Path, map_location=None) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume") from None
    except Exception as err:  # a damaged file: say which
        raise RuntimeError(f"checkpoint {path} cannot be read ({err}); it may be corrupt") from err
