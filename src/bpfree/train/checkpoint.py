"""Run files written atomically (:mod:`bpfree.atomic`): a checkpoint or a result is either the old
one or the new one, never half; and checkpoints read back safely, with errors that say what is wrong.

Loading a checkpoint runs no code. :func:`save_checkpoint` writes ``checkpoint.pt`` together with
``checkpoint.pt.sha256``, the sha256 of its bytes; :func:`load_checkpoint` checks those bytes
against it before anything is unpickled (a mismatch: the file is damaged; no hash file: it was not
written by bpfree) and then unpickles with ``torch.load(weights_only=True)``, which builds only
tensors, numbers, strings, lists, tuples and dicts and refuses any other object. Only
``trust=True`` (``bpfree train --resume DIR --trust-checkpoint``) skips both checks, for a
checkpoint whose origin the user vouches for.
"""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write, fsync_dir

__all__ = ["CheckpointError", "fsync_dir", "hash_path", "load_checkpoint", "save_checkpoint", "save_json",
           "save_text"]

#: How to get past the safety checks, named in their errors.
TRUST_HINT = "if you trust where it came from, resume with --trust-checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, damaged, foreign or holds objects a safe load refuses."""


def save_text(text: str, path: Path) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_json(obj: Any, path: Path) -> None:
    save_text(json.dumps(obj, indent=2, sort_keys=False) + "\n", path)


def hash_path(path: Path) -> Path:
    """``checkpoint.pt.sha256`` beside ``checkpoint.pt``."""
    return path.with_name(path.name + ".sha256")


def _hashes(path: Path) -> list[str]:
    """The sha256 digests ``path``'s hash file lists (newest first; empty if there is none)."""
    try:
        return [line.split()[0] for line in hash_path(path).read_text().splitlines() if line.strip()]
    except (FileNotFoundError, IsADirectoryError, UnicodeDecodeError):
        return []


class _Hashing:
    """A binary file wrapper that feeds every byte written through it to a sha256."""

    def __init__(self, f) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(obj: Any, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with its sha256 in :func:`hash_path`.

    The bytes are hashed as they are written to the temporary file; before that file replaces the
    checkpoint, the hash file lists the new digest and every digest it held (so also the one of
    the checkpoint still in place, however many saves failed before); once replaced, the list is
    cut to the new digest. A process killed at any moment leaves a checkpoint whose digest is listed.
    """
    hashing: list[_Hashing] = []

    def write(f) -> None:
        hashing.append(_Hashing(f))
        torch.save(obj, hashing[0])

    def list_digest() -> None:  # runs once the bytes are on disk, before the rename
        digest = hashing[0].sha.hexdigest()
        listed = [digest] + [h for h in _hashes(path) if h != digest]
        atomic_write(hash_path(path), lambda f: f.write(("\n".join(listed) + "\n").encode()))

    atomic_write(path, write, check=list_digest)
    atomic_write(hash_path(path), lambda f: f.write((hashing[0].sha.hexdigest() + "\n").encode()))


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def load_checkpoint(path: Path, map_location=None, *, trust: bool = False) -> Any:
    """The checkpoint at ``path``, checked against its sha256 and unpickled without running code.

    ``trust``: skip the hash check and unpickle anything (only for a checkpoint from a trusted
    source, e.g. one written before checkpoints carried a hash).
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: nothing to resume")
    if not trust:
        listed = _hashes(path)
        if not listed:
            raise CheckpointError(f"checkpoint {path} was not written by bpfree (it has no "
                                  f"{hash_path(path).name}); {TRUST_HINT}")
        if _file_sha256(path) not in listed:
            raise CheckpointError(f"checkpoint {path} is damaged: its sha256 does not match "
                                  f"{hash_path(path).name} (truncated or changed since it was written)")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trust)
    except pickle.UnpicklingError as err:
        if trust:
            raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(err)}); it may be corrupt") from err
        raise CheckpointError(f"checkpoint {path} holds objects that a safe load refuses to build "
                              f"({_first_line(err, 160)}); {TRUST_HINT}") from None
    except Exception as err:  # a damaged file: say which
        raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(err)}); it may be corrupt "
                              f"or truncated") from err


def _first_line(err: Exception, limit: int = 300) -> str:
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."
