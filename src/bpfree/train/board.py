"""TensorBoard scalars of a run's metrics (run option ``log = ["jsonl", "tensorboard"]``).

Every line the loop writes to ``metrics.jsonl`` is also written, in the same order, to an event
file in ``RUN/tensorboard/``: each number of the line as the scalar ``KIND/KEY`` (``step/loss``,
``epoch/test_accuracy``, ``diagnostics/signal_cos/3``...) at the line's ``step``. ``metrics.jsonl``
stays the source of truth: the event file is a view of it, for ``tensorboard --logdir runs``.

A resumed run cuts ``metrics.jsonl`` back to its checkpoint; its new event file starts with
``purge_step`` one past the checkpoint's step, so TensorBoard drops what the interrupted run
logged after it and shows each step once. A fresh run in a directory (``--overwrite``) removes
the event files of the run it replaces.

Needs the ``tensorboard`` package (``pip install 'bpfree[tensorboard]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..options import OptionError

FOLDER = "tensorboard"


def require_tensorboard() -> None:
    """Raise an :class:`OptionError` saying how to install TensorBoard if it is not importable."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise OptionError("log=tensorboard needs the tensorboard package: pip install 'bpfree[tensorboard]' "
                          "(or pip install tensorboard)") from None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """``KIND/KEY -> value`` for every number of a metrics line but its ``step`` (booleans as 0/1)."""
    kind = record.get("kind", "metrics")
    return {f"{kind}/{k}": float(v) for k, v in record.items()
            if k not in ("kind", "step") and isinstance(v, (int, float))}


class Board:
    """Writes metrics lines as scalars to an event file in ``folder`` (rank 0 only).

    ``resume_step``: the checkpoint's step when the run resumes (later events of an earlier
    writer are purged); ``None`` for a fresh run (earlier event files are removed).
    """

    def __init__(self, folder: Path, resume_step: int | None = None) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        folder = Path(folder)
        if resume_step is None and folder.is_dir():
            for old in folder.glob("events.out.tfevents.*"):
                old.unlink()
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge, flush_secs=3600)

    def add(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
