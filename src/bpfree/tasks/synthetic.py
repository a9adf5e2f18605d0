"""``synthetic``: generated data of a real dataset's shapes, for benchmarks and device checks.

Nothing is downloaded: ``--dataset synthetic --set like=cifar10`` gives batches of exactly the
shapes, dtypes and preprocessing path of CIFAR-10 (uint8 pixels standardised per channel,
random crop and flip), so a step costs what it costs on the real data; ``bpfree gpu-check``
and ``bpfree bench`` use it on a machine that holds nothing but this repository.

The data are learnable, so a loss that falls shows the training works:

* images (``like`` = mnist, fashion-mnist, cifar10, cifar100): ``classes`` fixed templates, each
  a smooth random image (a ``4 x 4`` grid of ``N(0, 1)`` values per channel, bilinearly
  enlarged), and ``x = template[y] + 0.5 n``, ``n ~ N(0, 1)`` per pixel, ``y`` uniform. MNIST-like
  sets are float32 ``(1, 28, 28)`` (already standardised, as the real tasks store them);
  CIFAR-like ones uint8 ``(3, 32, 32)`` pixels ``clamp(128 + 48 x)`` with the real datasets'
  mean and std, augmented like them (``augment``).
* text (``like`` = ptb, wikitext2, wikitext103): a token stream of the dataset's vocabulary size
  (``classes`` overrides it) from a fixed random successor table: after token ``t`` comes
  ``succ[t]`` with probability 0.8, else a uniform token; cut into sequences of ``context``.

Everything is drawn from generators seeded by ``seed``: the same data on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..options import OptionError, option
from . import register
from .language import LanguageModelTask
from .vision import Augment, ClassificationTask

#: ``like`` -> (input shape, classes or vocabulary size, kind).
SHAPES: dict[str, tuple[tuple[int, ...], int, str]] = {
    "mnist": ((1, 28, 28), 10, "float"),
    "fashion-mnist": ((1, 28, 28), 10, "float"),
    "cifar10": ((3, 32, 32), 10, "uint8"),
    "cifar100": ((3, 32, 32), 100, "uint8"),
    "ptb": ((), 10000, "text"),
    "wikitext2": ((), 33278, "text"),
    "wikitext103": ((), 267735, "text"),
}
_CIFAR_MEAN_STD = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
                   "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}


@dataclass
class SyntheticOptions:
    like: str = option("mnist", "the dataset whose shapes, dtype and preprocessing the data copy", choices=tuple(SHAPES))
    size: int = option(2048, "training samples (text: sequences)")
    test_size: int = option(512, "test samples (text: sequences of the valid and test splits)")
    classes: int = option(0, "classes (text: vocabulary size); 0: the dataset's")
    context: int = option(64, "text: tokens per sequence")
    augment: bool = option(True, "CIFAR-like: random crop (padding 4) and flip, as cifar10/cifar100 do")
    seed: int = option(0, "seed of the generated data")

    def check(self) -> None:
        for key in ("size", "test_size", "context"):
            if getattr(self, key) < 1:
                raise OptionError(f"option {key!r} must be at least 1, got {getattr(self, key)}")
        if self.classes < 0 or self.classes == 1:
            raise OptionError(f"option 'classes' must be 0 (the dataset's) or at least 2, got {self.classes}")


def images(like: str, n: int, classes: int, generator: torch.Generator, templates: torch.Tensor):
    """``n`` images ``template[y] + 0.5 noise`` (float32, or uint8 pixels for CIFAR-like) and labels ``y``."""
    y = torch.randint(0, classes, (n,), generator=generator)
    x = templates[y] + 0.5 * torch.randn((n,) + templates.shape[1:], generator=generator)
    if SHAPES[like][2] == "uint8":
        x = (128 + 48 * x).round_().clamp_(0, 255).to(torch.uint8)
    return x, y


def token_stream(n: int, vocab: int, generator: torch.Generator, successor: torch.Tensor) -> torch.Tensor:
    """``n`` int64 token ids: ``succ[t]`` after ``t`` with probability 0.8, else a uniform id.

    No Python step per token: a run of followed tokens is ``succ`` applied again and again to the
    run's first (uniform) token, computed for all runs at once (runs are short, ``P(> k) = 0.8^k``).
    """
    follow = torch.rand(n, generator=generator) < 0.8
    follow[0] = False
    random = torch.randint(0, vocab, (n,), generator=generator)
    ids = random.clone()
    # position of each token within its run of followed tokens (0 at a uniform token)
    run_start = torch.cummax(torch.where(follow, 0, torch.arange(n)), 0).values
    depth = torch.arange(n) - run_start
    current = random[run_start]
    for k in range(1, int(depth.max()) + 1):
        current = torch.where(depth >= k, successor[current], current)
    ids = torch.where(depth > 0, current, ids)
    return ids


@register("synthetic", "generated, learnable data of a real dataset's shapes (like=mnist, cifar10, ptb, ...): "
                       "benchmarks and device checks without a download", SyntheticOptions)
def load_synthetic(o: SyntheticOptions, data_dir: Path | None, limit_train: int, limit_test: int):
    shape, classes, kind = SHAPES[o.like]
    classes = o.classes or classes
    n_train, n_test = limit_train or o.size, limit_test or o.test_size
    g = torch.Generator().manual_seed(o.seed)
    if kind == "text":
        successor = torch.randint(0, classes, (classes,), generator=g)
        lengths = {"train": n_train * o.context + 1, "valid": n_test * o.context + 1, "test": n_test * o.context + 1}
        streams = {split: token_stream(n, classes, g, successor) for split, n in lengths.items()}
        vocab = [f"w{i}" for i in range(classes)]
        return LanguageModelTask(f"synthetic-{o.like}", vocab, streams, o.context)
    c, h, w = shape
    templates = F.interpolate(torch.randn(classes, c, 4, 4, generator=g), size=(h, w), mode="bilinear",
                              align_corners=False)
    xtr, ytr = images(o.like, n_train, classes, g, templates)
    xte, yte = images(o.like, n_test, classes, g, templates)
    if kind == "uint8":
        mean, std = _CIFAR_MEAN_STD[o.like]
        augment = Augment(4, True) if o.augment else None
        return ClassificationTask(f"synthetic-{o.like}", shape, classes, xtr, ytr, xte, yte, mean=mean, std=std,
                                  augment=augment)
    return ClassificationTask(f"synthetic-{o.like}", shape, classes, xtr, ytr, xte, yte)
