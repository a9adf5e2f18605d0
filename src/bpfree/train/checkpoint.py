"""Run files written atomically (:mod:`bpfree.atomic`): a checkpoint or a result is either the old
one or the new one, never half; and checkpoints read back with errors that say what is wrong.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, fsync_dir

__all__ = ["fsync_dir", "load_torch", "save_json", "save_text", "save_torch"]


def save_torch(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_json(obj: Any, path: Path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def load_torch(path: Path, map_location=None) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint at {path}: nothing to resume") from None
    except IsADirectoryError:
        raise RuntimeError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as err:  # a damaged file: say which
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"checkpoint {path} cannot be read ({first}); it may be corrupt or truncated") from err
