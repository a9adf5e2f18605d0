"""Tasks from the user's own files: ``npz:PATH``, ``images:FOLDER`` and ``text:FILE``.

These names work wherever a dataset name does (``--dataset``, ``bpfree compare``, ``bpfree bench``,
experiment files). Reading, verification and caching are :mod:`bpfree.data.local`'s; this module
turns what it reads into a :class:`~bpfree.tasks.vision.ClassificationTask` or a
:class:`~bpfree.tasks.language.LanguageModelTask`.

* ``npz:PATH``: arrays ``x_train, y_train, x_test, y_test``, or ``x, y`` split with
  ``test_fraction``. Inputs ``(N, C, H, W)``, ``(N, H, W)`` (one channel) or ``(N, F)`` flat features,
  any real dtype (uint8 is read as pixels ``0..255``); labels integers ``0 .. classes-1``.
* ``images:FOLDER``: ``FOLDER/<class>/*.png|jpg``, or ``FOLDER/train/<class>/...`` and
  ``FOLDER/test/<class>/...``; labels are the class folders in sorted order. Samples are held
  in an order drawn from ``split_seed`` (not class by class), so ``limit_train`` and
  ``limit_test`` take random subsets; so are the two parts of an ``x, y`` archive.
* ``text:FILE``: a UTF-8 text, word or character level; a FILE that is a folder holds
  ``train.txt``, ``valid.txt`` and ``test.txt``, else the text is cut 90/5/5.

Every option set records the data's sha256 (option ``sha256``), computed when the configuration
is resolved: a run resumed on changed data is refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch

from ..data import DataError
from ..options import OptionError, option
from . import TaskSpec, _REGISTRY
from .language import LanguageModelTask
from .vision import ClassificationTask

SHA256_HELP = ("sha256 of the data (of a folder: of its manifest of file hashes), filled in by bpfree; "
               "a run resumed on changed data is refused")
NORMALIZE_HELP = ("standardise inputs with the training split's mean and std: per channel for images, per "
                  "feature for flat features (uint8 pixels are divided by 255 first)")


class _Verified:
    """Options of a local dataset: :meth:`verify` fills ``sha256`` with the data's digest, or checks it."""

    kind: ClassVar[str] = ""
    path: ClassVar[str] = ""  # set on the dataset's own subclass (see _resolve)

    def verify(self) -> None:
        from ..data.local import dataset_digest

        try:
            digest = dataset_digest(self.kind, self.path)
        except DataError as e:
            raise OptionError(str(e)) from None
        if self.sha256 and self.sha256 != digest:
            raise OptionError(
                f"dataset {self.kind}:{self.path} changed since this configuration was made: its sha256 is {digest}, "
                f"the configuration records {self.sha256}; restore the data or start a new run"
            )
        self.sha256 = digest


def _fraction(value: float, key: str) -> None:
    if not (math.isfinite(value) and 0 <= value < 1):
        raise OptionError(f"option {key!r} must lie in [0, 1), got {value}")


def _seed(value: int) -> None:
    if not 0 <= value < 2**63:
        raise OptionError(f"option 'split_seed' must lie in [0, 2**63), got {value}")


@dataclass
class NpzOptions(_Verified):
    test_fraction: float = option(0.0, "with arrays x, y instead of x_train, ..., y_test: the fraction of samples "
                                       "held out for test (drawn with split_seed)")
    split_seed: int = option(0, "seed of the train/test split (test_fraction)")
    normalize: bool = option(True, NORMALIZE_HELP)
    classes: int = option(0, "number of classes (0: the largest label + 1)")
    sha256: str = option("", SHA256_HELP)

    def check(self) -> None:
        _fraction(self.test_fraction, "test_fraction")
        _seed(self.split_seed)
        if self.classes < 0:
            raise OptionError(f"option 'classes' must not be negative, got {self.classes}")
        self.verify()


@dataclass
class ImageOptions(_Verified):
    size: tuple[int, ...] = option((), "resize every image to N x N (size=N) or H x W (size=H,W); empty: keep "
                                       "the images' own size, which must then be the same for all")
    color: str = option("auto", "grey (1 channel), rgb (3; alpha dropped) or auto (grey if every image is)",
                        choices=("auto", "grey", "rgb"))
    test_fraction: float = option(0.2, "without train/ and test/ folders: the fraction of images held out for "
                                       "test (drawn with split_seed)")
    split_seed: int = option(0, "seed of the train/test split and of the order samples are held in (limits "
                                "take the first ones)")
    normalize: bool = option(True, NORMALIZE_HELP)
    sha256: str = option("", SHA256_HELP)

    def check(self) -> None:
        if len(self.size) > 2 or any(s < 1 for s in self.size):
            raise OptionError(f"option 'size' takes N or H,W with positive sizes, got {','.join(map(str, self.size))}")
        _fraction(self.test_fraction, "test_fraction")
        _seed(self.split_seed)
        self.verify()


@dataclass
class TextOptions(_Verified):
    level: str = option("word", "tokens: words (whitespace-separated, <eos> after each line) or characters",
                        choices=("word", "char"))
    context: int = option(64, "tokens per sequence (the model's context)")
    min_count: int = option(1, "training tokens seen fewer times become <unk>")
    sha256: str = option("", SHA256_HELP)

    def check(self) -> None:
        if self.context < 1:
            raise OptionError(f"option 'context' must be at least 1, got {self.context}")
        if self.min_count < 1:
            raise OptionError(f"option 'min_count' must be at least 1, got {self.min_count}")
        self.verify()


# --------------------------------------------------------------------------- loading


def _order(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` drawn from ``seed`` (``torch.randperm``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _split(n: int, fraction: float, seed: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, test)`` indices of ``n`` samples: the permutation :func:`_order` ``(n, seed)``, its first
    ``round(fraction n)`` (at least 1) for test and the rest for training, in that random order."""
    if fraction <= 0:
        raise DataError(f"{what}: no test split; give --set test_fraction=F (e.g. 0.2)")
    if n < 2:
        raise DataError(f"{what} holds {n} sample(s): too few to split into train and test")
    n_test = min(max(round(fraction * n), 1), n - 1)
    perm = _order(n, seed)
    return perm[n_test:], perm[:n_test]


def _stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel (images ``(N, C, H, W)``) or per-feature (``(N, F)``) mean and std (0 read as 1), float64."""
    axes = (0, 2, 3) if x.ndim == 4 else (0,)
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    mean = x.mean(axis=axes, dtype=np.float64) / scale
    std = x.std(axis=axes, dtype=np.float64) / scale
    std[std == 0] = 1.0
    return mean.tolist(), std.tolist()


def _inputs(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    """``x`` checked: numbers, one row per sample, ``(N, C, H, W)`` or ``(N, F)`` (``(N, H, W)`` gains a channel)."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: array {key!r} has dtype {x.dtype}: inputs must be real numbers")
    if x.ndim < 2 or x.ndim > 4:
        raise DataError(f"{path}: array {key!r} has shape {x.shape}: inputs are (N, C, H, W) or (N, H, W) images "
                        f"or (N, F) features")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: array {key!r} holds non-finite values (nan or inf)")
    return x[:, None] if x.ndim == 3 else x


def _labels(path: Path, key: str, y: np.ndarray, n: int) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: array {key!r} has dtype {y.dtype}: labels must be integers (0 .. classes-1)")
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{path}: array {key!r} has shape {y.shape}, expected ({n},): one integer label per sample")
    if n and y.min() < 0:
        raise DataError(f"{path}: array {key!r} holds a negative label ({int(y.min())}); labels are 0 .. classes-1")
    return y.astype(np.int64)


def _load_npz(path: str) -> Callable[..., ClassificationTask]:
    def load(o: NpzOptions, data_dir, limit_train: int, limit_test: int) -> ClassificationTask:
        from ..data.local import existing, read_npz

        p = existing(path, "the NumPy archive")
        arrays = read_npz(p, o.sha256)
        split_keys = ("x_train", "y_train", "x_test", "y_test")
        held = ", ".join(arrays) or "no array"
        if any(k in arrays for k in split_keys):
            missing = [k for k in split_keys if k not in arrays]
            if missing:
                raise DataError(f"{p}: missing array {missing[0]!r} (it holds {held}; expected x_train, y_train, "
                                f"x_test, y_test)")
            if o.test_fraction:
                raise DataError(f"{p} holds x_test and y_test already: drop test_fraction")
            xtr, xte = _inputs(p, "x_train", arrays["x_train"]), _inputs(p, "x_test", arrays["x_test"])
            ytr = _labels(p, "y_train", arrays["y_train"], len(xtr))
            yte = _labels(p, "y_test", arrays["y_test"], len(xte))
        elif "x" in arrays or "y" in arrays:
            if "x" not in arrays or "y" not in arrays:
                raise DataError(f"{p}: missing array {'x' if 'x' not in arrays else 'y'!r} (it holds {held})")
            x = _inputs(p, "x", arrays["x"])
            y = _labels(p, "y", arrays["y"], len(x))
            if not o.test_fraction:
                raise DataError(f"{p} holds x and y but no test split: give --set test_fraction=F (e.g. 0.2), "
                                f"or store x_train, y_train, x_test, y_test")
            tr, te = (i.numpy() for i in _split(len(x), o.test_fraction, o.split_seed, str(p)))
            xtr, ytr, xte, yte = x[tr], y[tr], x[te], y[te]
        else:
            raise DataError(f"{p}: missing arrays x_train, y_train, x_test, y_test (or x, y); it holds {held}")
        if xtr.shape[1:] != xte.shape[1:]:
            raise DataError(f"{p}: training samples have shape {xtr.shape[1:]} but test samples {xte.shape[1:]}")
        if len(xtr) == 0:
            raise DataError(f"{p}: the training split is empty")
        top = int(max(ytr.max(initial=0), yte.max(initial=0))) + 1
        classes = o.classes or top
        if top > classes:
            raise DataError(f"{p}: labels go up to {top - 1}, outside [0, {classes}) (option classes)")
        if classes < 2:
            raise DataError(f"{p}: every label is 0; a classification task needs at least two classes")
        if xtr.dtype == np.uint8 and xte.dtype == np.uint8:  # pixels: kept as bytes, standardised per batch
            mean, std = _stats(xtr) if o.normalize else (None, None)
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (xtr, xte)]
        else:
            xtr, xte = xtr.astype(np.float32), xte.astype(np.float32)
            if o.normalize:
                m, s = _stats(xtr)
                shape = (1, -1, 1, 1) if xtr.ndim == 4 else (1, -1)
                m, s = np.asarray(m, np.float32).reshape(shape), np.asarray(s, np.float32).reshape(shape)
                xtr, xte = (xtr - m) / s, (xte - m) / s
            mean = std = None
            tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in (xtr, xte)]
        ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
        xtr_t, xte_t = tensors
        if limit_train:
            xtr_t, ytr_t = xtr_t[:limit_train], ytr_t[:limit_train]
        if limit_test:
            xte_t, yte_t = xte_t[:limit_test], yte_t[:limit_test]
        return ClassificationTask(f"npz:{path}", tuple(xtr.shape[1:]), classes, xtr_t, ytr_t, xte_t, yte_t,
                                  mean=mean, std=std)

    return load


def _load_images(path: str) -> Callable[..., ClassificationTask]:
    def load(o: ImageOptions, data_dir, limit_train: int, limit_test: int) -> ClassificationTask:
        from ..data.local import load_images

        d = load_images(path, o.size, o.color, o.sha256, data_dir)
        if d.split_names == ["all"]:
            tr, te = _split(len(d.labels), o.test_fraction, o.split_seed, f"the image folder {path}")
        else:  # each split in a random order too, so that limits take a random subset
            tr = torch.nonzero(d.split == d.split_names.index("train")).flatten()
            te = torch.nonzero(d.split == d.split_names.index("test")).flatten()
            tr, te = tr[_order(len(tr), o.split_seed)], te[_order(len(te), o.split_seed)]
        mean, std = _stats(d.images[tr].numpy()) if o.normalize else (None, None)
        tr, te = (tr[:limit_train] if limit_train else tr), (te[:limit_test] if limit_test else te)
        return ClassificationTask(f"images:{path}", tuple(d.images.shape[1:]), len(d.classes), d.images[tr],
                                  d.labels[tr], d.images[te], d.labels[te], mean=mean, std=std)

    return load


def _load_text(path: str) -> Callable[..., LanguageModelTask]:
    def load(o: TextOptions, data_dir, limit_train: int, limit_test: int) -> LanguageModelTask:
        from ..data.local import load_corpus

        corpus = load_corpus(path, o.level, o.min_count, o.sha256, data_dir)
        return LanguageModelTask(f"text:{path}", corpus.vocab, corpus.splits, o.context, limit_train, limit_test)

    return load


#: Prefix -> (options, loader factory, summary) of the local dataset families.
FAMILIES: dict[str, tuple[type, Callable[[str], Callable[..., object]], str]] = {
    "npz": (NpzOptions, _load_npz, "arrays x_train, y_train, x_test, y_test (or x, y and test_fraction) of a "
                                   ".npz file: images (N,C,H,W)/(N,H,W) or features (N,F), integer labels"),
    "images": (ImageOptions, _load_images, "a folder with one sub-folder of PNG/JPEG files per class (or train/ "
                                           "and test/ folders of those)"),
    "text": (TextOptions, _load_text, "a UTF-8 text file as a language-modelling corpus, split 90/5/5 (or a "
                                      "folder with train.txt, valid.txt, test.txt); ppl"),
}
_SPECS: dict[str, TaskSpec] = {}


def _resolve(name: object) -> TaskSpec | None:
    """The task spec of ``npz:PATH``, ``images:FOLDER`` or ``text:FILE`` (``None`` for other names)."""
    if not isinstance(name, str):
        return None
    kind, sep, path = name.partition(":")
    if not sep or kind not in FAMILIES:
        return None
    if not path.strip():
        raise OptionError(f"dataset {name!r} names no file: write {kind}:PATH")
    if name not in _SPECS:
        options, loader, summary = FAMILIES[kind]
        own = type(options.__name__, (options,), {"kind": kind, "path": path, "__doc__": f"options of {name}"})
        _SPECS[name] = TaskSpec(name, summary, own, loader(path))
    return _SPECS[name]


_REGISTRY.add_resolver(_resolve, "npz:PATH, images:FOLDER, text:FILE")
