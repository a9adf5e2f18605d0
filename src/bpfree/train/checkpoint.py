"""Atomic files: a checkpoint or a result is either the old one or the new one, never half.

Each file is written to a temporary file in the same folder (``.NAME.XXXX.tmp``), flushed and
``fsync``-ed, renamed over ``NAME`` with ``os.replace`` (atomic on POSIX and Windows), and then the
folder itself is ``fsync``-ed so that the rename survives a power cut. A process killed at any
moment leaves either the old file or the new one (and perhaps a stale temporary file, which the
training loop removes when the run resumes).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

_UMASK = os.umask(0o022)  # read the process umask (and put it back) once, at import
os.umask(_UMASK)


def _atomic(path: Path, write) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600 files; give them the usual permissions
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """``fsync`` a folder so a rename inside it is durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


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
    except IsADirectoryError:
        raise RuntimeError(f"checkpoint {path} is a folder, not a file") from None
    except Exception as err:  # a damaged file: say which
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeError(f"checkpoint {path} cannot be read ({first}); it may be corrupt or truncated") from err
