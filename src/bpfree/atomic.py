"""Atomic files: a checkpoint, a result or a dataset file is either the old one or the new one, never half.

Each file is written to a temporary file in the same folder (``.NAME.XXXX.tmp``, or another
suffix), flushed and ``fsync``-ed, renamed over ``NAME`` with ``os.replace`` (atomic on POSIX and
Windows), and then the folder itself is ``fsync``-ed so that the rename survives a power cut. A
process killed at any moment leaves either the old file or the new one (and perhaps a stale
temporary file, which whoever owns the folder removes: the training loop when a run resumes).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

_UMASK = os.umask(0o022)  # read the process umask (and put it back) once, at import
os.umask(_UMASK)
#: ``mkstemp`` makes 0600 files; written files get the usual 0666 minus the process umask.
FILE_MODE = 0o666 & ~_UMASK


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object], *, suffix: str = ".tmp",
                 check: Callable[[], object] | None = None) -> None:
    """Write ``path`` atomically: ``write(f)`` fills a temporary binary file that then replaces ``path``.

    ``check()``, if given, runs once the bytes are on disk and before the rename; an exception
    there (as in ``write``) removes the temporary file and leaves ``path`` as it was.
    ``suffix``: the temporary file's ending (its name is ``.NAME.XXXX`` plus ``suffix``).
    """
    path = Path(path)
    prefix = f"{path.name}." if path.name.startswith(".") else f".{path.name}."
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, FILE_MODE)
        if check is not None:
            check()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: str | os.PathLike) -> None:
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
