"""Tasks: a dataset in memory with its batching, loss and metrics.

The training loop sees only the :class:`Task` interface; it never asks which dataset it is.
Each module in this package registers its datasets with :func:`register`; a new dataset family
is one new module here.

Batches are a pure function of ``(seed, epoch, index)``, including any random augmentation, so
a run resumed from a checkpoint sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import options as opts
from ..registry import Registry


class Task:
    """Interface of a task (see :class:`bpfree.tasks.vision.ClassificationTask` for one).

    ``input_shape``: one sample's shape; ``num_classes``: size ``o`` of the model output's last
    dimension; ``higher_is_better``/``primary``: the headline metric (``"accuracy"``, ``"ppl"``).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    primary: str = "accuracy"
    higher_is_better: bool = True

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean loss of a batch (what the methods differentiate)."""
        raise NotImplementedError

    def num_batches(self, batch_size: int) -> int:
        raise NotImplementedError

    def train_batch(self, seed: int, epoch: int, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``index`` of epoch ``epoch`` (0-based): a pure function of its arguments."""
        raise NotImplementedError

    def batch_stats(self, output: torch.Tensor, target: torch.Tensor, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        """Sums to accumulate over an epoch (0-d tensors, kept on the device)."""
        raise NotImplementedError

    def summarise(self, sums: dict[str, float]) -> dict[str, float]:
        """Epoch metrics (``loss``, ``accuracy`` or ``ppl``...) from accumulated :meth:`batch_stats`."""
        raise NotImplementedError

    def evaluate(self, model: torch.nn.Module, split: str, batch_size: int) -> dict[str, float]:
        """Metrics of ``model`` on ``split`` (``"test"``, or ``"valid"`` where there is one)."""
        raise NotImplementedError

    def probe_batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A fixed batch of training samples for diagnostics."""
        raise NotImplementedError

    def to(self, device: torch.device) -> "Task":
        raise NotImplementedError


@dataclass(frozen=True)
class TaskSpec:
    name: str
    summary: str
    options: type
    load: Callable[..., Task]


_REGISTRY: Registry[TaskSpec] = Registry("dataset", __name__, __path__)


def register(name: str, summary: str, options: type):
    """Decorator: register a builder under ``name`` with its options dataclass."""

    def deco(fn):
        _REGISTRY.add(name, TaskSpec(name, summary, options, fn))
        return fn

    return deco


def available() -> list[str]:
    return _REGISTRY.available()


def get(name: str) -> TaskSpec:
    return _REGISTRY.get(name)


def load(name: str, options: dict[str, Any] | None = None, data_dir: Path | None = None,
         limit_train: int = 0, limit_test: int = 0) -> Task:
    """Load dataset ``name`` as a task (fetching and verifying its files if needed)."""
    spec = get(name)
    o = opts.build(spec.options, options or {}, what=f"dataset {name!r}")
    return spec.load(o, data_dir, limit_train, limit_test)
