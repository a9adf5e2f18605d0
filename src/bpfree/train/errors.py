"""The error the training loop stops with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from ..distributed import DistributedError


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a run directory that cannot be used."""


@contextlib.contextmanager
def as_training_error() -> Iterator[None]:
    """A data-parallel set-up that cannot work, reported as a :class:`TrainingError` (same message)."""
    try:
        yield
    except DistributedError as err:
        raise TrainingError(str(err)) from None
