"""Tasks: a dataset held in memory as tensors, with its loss and its metric.

The training loop sees only a :class:`Task`: tensors to batch, ``loss_fn(output, target)``, and
``correct(output, target)``; it never asks which dataset it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..options import option


@dataclass
class VisionDataOptions:
    normalize: bool = option(True, "standardise pixels with the dataset's train mean and std")


def dataset_options(name: str) -> type:
    """The options dataclass of dataset ``name``."""
    from ..data import DATASETS

    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(sorted(DATASETS))}")
    return VisionDataOptions


@dataclass
class Task:
    """A classification task in memory.

    ``train_x``: ``(N, *input_shape)`` float32; ``train_y``: ``(N,)`` int64 in ``[0, num_classes)``.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @staticmethod
    def loss_fn(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits ``(batch, o)`` against labels ``(batch,)``."""
        return F.cross_entropy(output, target)

    @staticmethod
    def correct(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Number of correct top-1 predictions (a 0-d tensor)."""
        return (output.argmax(-1) == target).sum()

    def to(self, device) -> "Task":
        for key in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, key, getattr(self, key).to(device))
        return self

    def check_labels(self) -> None:
        for split, y in (("train", self.train_y), ("test", self.test_y)):
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"{self.name} {split} labels lie in [{int(y.min())}, {int(y.max())}], "
                    f"outside [0, {self.num_classes})"
                )


def load_task(name: str, options: dict, data_dir: Path | None = None,
              limit_train: int = 0, limit_test: int = 0) -> Task:
    """Load dataset ``name`` into memory as a :class:`Task` (fetching it if needed)."""
    from ..data import DATASETS, load_vision

    info = DATASETS[name]
    o = VisionDataOptions(**options)
    parts = []
    for split, limit in (("train", limit_train), ("test", limit_test)):
        x, y = load_vision(name, split, data_dir)
        if limit:
            x, y = x[:limit], y[:limit]
        x = x.float().div_(255.0)
        if o.normalize:
            x = x.sub_(info.mean).div_(info.std)
        parts += [x, y.long()]
    task = Task(name, tuple(info.input_shape), info.num_classes, *parts)
    task.check_labels()
    return task
