"""CIFAR-10 and CIFAR-100 from the canonical "python version" archives.

The archives (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html):

* ``cifar-10-python.tar.gz`` (170,498,071 bytes, md5 ``c58f30108f718f92721af3b95e74349a``): folder
  ``cifar-10-batches-py/`` holding ``data_batch_1`` .. ``data_batch_5`` (10000 images each),
  ``test_batch`` (10000) and ``batches.meta``;
* ``cifar-100-python.tar.gz`` (169,001,437 bytes, md5 ``eb9058c3a382ffc7106e4002c42a8d85``): folder
  ``cifar-100-python/`` holding ``train`` (50000), ``test`` (10000) and ``meta``.

Every batch is a pickled dict (Python 2, protocol 2) with bytes keys: ``b'data'``, a uint8 array of
shape ``(N, 3072)`` whose rows are one image in channel-major order (1024 red, 1024 green,
1024 blue values, each plane row by row: ``reshape(N, 3, 32, 32)``), and ``b'labels'`` (CIFAR-10)
or ``b'fine_labels'`` and ``b'coarse_labels'`` (CIFAR-100), lists of N ints.

Cache layout: ``<data_dir>/<name>/<archive>`` (``name`` is ``cifar10`` or ``cifar100``), the archive
itself, byte for byte, verified by its sha256 (and, on installation, also by the md5 the dataset's
page publishes); the usual stamp (:class:`bpfree.data.sources.VerifiedCache`) spares re-hashing it
at every load. Batches are read straight from the archive (one pass, nothing extracted to disk).

Sources (``source=`` of :func:`fetch_cifar` / :func:`load_cifar`, the ``source`` data option of the
``cifar10`` / ``cifar100`` tasks):

* ``"auto"`` (default) / ``"url"``: the cache, else the canonical URL (``CIFAR_MIRRORS``, or the base
  URLs in ``$BPFREE_MIRROR_CIFAR10`` / ``$BPFREE_MIRROR_CIFAR100``, spaces or commas between several);
* a base URL (``http://host/path``, the archive is ``<base>/<archive name>``);
* a local path: the archive (any file name), a directory holding it (also in ``cifar10/``,
  ``CIFAR10/raw/``... as torchvision and others leave it), or an *extracted* batches folder
  (``cifar-10-batches-py`` or its parent). An extracted folder is read in place, each batch checked
  against its published md5; the archive routes copy the archive into the cache.

The machines of this project cannot reach these URLs: there, copy the archive into
``<data_dir>/cifar10/`` (it is verified on first use) or pass its path as the source.

Pickles are loaded with a restricted unpickler that resolves only what a CIFAR batch needs
(numpy's array reconstruction, ``numpy.ndarray``, ``numpy.dtype``, and latin-1 ``_codecs.encode``,
which protocol 2 uses for bytes written by Python 3); any other global is refused with a
:class:`~bpfree.data.DataError`, so a tampered batch cannot run code.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import os
import pickle
import re
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from . import sources as _src
from .idx import DataError
from .vision import default_data_dir

__all__ = [
    "CIFAR",
    "CIFAR_MIRRORS",
    "CifarInfo",
    "cifar_mirrors",
    "fetch_cifar",
    "get_cifar_info",
    "load_cifar",
    "load_cifar_splits",
    "read_cifar",
    "read_cifar_batch",
]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class CifarInfo:
    """Description of one CIFAR dataset and its canonical archive.

    Attributes:
        name: key in :data:`CIFAR` and name of the cache sub-directory.
        num_classes: number of (fine) classes ``o``.
        coarse_classes: number of coarse classes (CIFAR-100: 20), or 0.
        archive: file name of the canonical archive.
        sha256, md5: hashes of the archive (sha256 is what the cache checks).
        folder: the folder inside the archive that holds the batches.
        splits: split -> batch file names, concatenated in this order.
        label_key: key of the (fine) labels in a batch dict.
        members_md5: batch file name -> md5 (checks an extracted folder read in place).
        mean, std: per-channel mean and population std of ``pixel / 255`` over the 50000 training
            images (R, G, B), for ``(x / 255 - mean) / std``.
        input_shape: ``(3, 32, 32)``.
    """

    name: str
    num_classes: int
    coarse_classes: int
    archive: str
    sha256: str
    md5: str
    folder: str
    splits: Mapping[str, tuple[str, ...]]
    label_key: str
    members_md5: Mapping[str, str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_shape: tuple[int, int, int] = (3, 32, 32)
    local_subdirs: tuple[str, ...] = field(default=())

    @property
    def files(self) -> dict[str, str]:
        """What the cache holds: the archive name -> its sha256."""
        return {self.archive: self.sha256}


CIFAR: dict[str, CifarInfo] = {
    "cifar10": CifarInfo(
        name="cifar10",
        num_classes=10,
        coarse_classes=0,
        archive="cifar-10-python.tar.gz",
        sha256="6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        splits={
            "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
            "test": ("test_batch",),
        },
        label_key="labels",
        members_md5={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
        mean=(0.4913996757, 0.4821584, 0.446530929),
        std=(0.2470322324, 0.2434851280, 0.2615878417),
        local_subdirs=("cifar10", "cifar-10", "CIFAR10", "CIFAR10/raw", "cifar10/raw", "raw"),
    ),
    "cifar100": CifarInfo(
        name="cifar100",
        num_classes=100,
        coarse_classes=20,
        archive="cifar-100-python.tar.gz",
        sha256="85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        splits={"train": ("train",), "test": ("test",)},
        label_key="fine_labels",
        members_md5={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
        },
        mean=(0.5070751592, 0.4865488733, 0.4409178434),
        std=(0.2673342859, 0.2564384629, 0.2761504713),
        local_subdirs=("cifar100", "cifar-100", "CIFAR100", "CIFAR100/raw", "cifar100/raw", "raw"),
    ),
}

#: Canonical download locations: dataset -> base URLs; the archive is ``<base>/<archive>``.
CIFAR_MIRRORS: dict[str, list[str]] = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz"],
}


def get_cifar_info(name: str) -> CifarInfo:
    """The :class:`CifarInfo` of ``name`` (``cifar10`` or ``cifar100``)."""
    try:
        return CIFAR[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown CIFAR dataset {name!r}; known: {', '.join(sorted(CIFAR))}") from None


def cifar_mirrors(name: str) -> list[str]:
    """Base URLs for ``name``: ``$BPFREE_MIRROR_<NAME>`` if set, else :data:`CIFAR_MIRRORS`
    (:func:`sources.mirror_urls`)."""
    return _src.mirror_urls(name, CIFAR_MIRRORS)


# --------------------------------------------------------------------------- installing the archive


def install_archive(stream: BinaryIO, dest: Path, sha256: str, md5: Optional[str], origin: str) -> None:
    """Copy ``stream`` byte for byte to ``dest``, atomically, if its sha256 (and md5) match.

    Unlike :func:`bpfree.data.sources.install_stream` nothing is decompressed: the cache keeps the
    archive as published. The bytes go to a temporary file next to ``dest`` and replace it only
    when both hashes match; otherwise nothing is left behind.

    Raises:
        DataError: a read error or a hash mismatch (naming ``origin``, the file, expected and actual).
    """
    h256, h5 = hashlib.sha256(), hashlib.md5()

    def verify(size: int) -> None:
        if h256.hexdigest() != sha256:
            raise DataError(
                f"{origin}: {dest.name} has sha256 {h256.hexdigest()} ({size} bytes), expected {sha256} "
                "(corrupt or truncated download, or not the canonical archive)"
            )
        if md5 is not None and h5.hexdigest() != md5:
            raise DataError(f"{origin}: {dest.name} has md5 {h5.hexdigest()}, expected {md5}")

    _src.write_verified(stream, dest, origin, [h256, h5], verify)


class ArchiveSource(_src.Source):
    """Wraps a :class:`~bpfree.data.sources.Source` so that files are installed undecompressed."""

    def __init__(self, inner: _src.Source, md5: Mapping[str, str]):
        self.inner = inner
        self.md5 = dict(md5)
        self.label = inner.label

    def unavailable(self) -> Optional[str]:
        return self.inner.unavailable()

    def session(self, progress: bool):
        return self.inner.session(progress)

    def install(self, stream: BinaryIO, dest: Path, sha256: str) -> None:
        install_archive(stream, dest, sha256, self.md5.get(dest.name), origin=self.label)


class FileSource(_src.Source):
    """One local file that supplies the archive, whatever the file is called."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.label = f"file {self.path}"

    def unavailable(self) -> Optional[str]:
        return None if self.path.is_file() else f"{self.path} does not exist"

    @contextlib.contextmanager
    def session(self, progress: bool):
        yield lambda name, progress: open(self.path, "rb")


# --------------------------------------------------------------------------- reading batches


def _reconstruct_fn():
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray
    return multiarray._reconstruct, multiarray.scalar


def _latin1_encode(text, encoding="utf-8"):
    """``_codecs.encode`` as protocol-2 pickles of bytes use it: latin-1 only."""
    if str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(text, "latin1")


_RECONSTRUCT, _SCALAR = _reconstruct_fn()
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _BatchUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR batch needs (see the module docstring)."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing global {module}.{name}: a CIFAR batch holds only numpy arrays, lists and strings"
            ) from None


def _text(key) -> str:
    return key.decode("latin1") if isinstance(key, bytes) else str(key)


def read_cifar_batch(data: bytes, what: str, label_keys: Sequence[str], num_classes: Sequence[int]):
    """Parse one pickled batch: ``(images uint8 (N, 3, 32, 32), [labels int64 (N,) per key])``.

    ``label_keys`` (e.g. ``("fine_labels", "coarse_labels")``) name the label lists wanted, each
    checked to lie in ``[0, num_classes[i])``. ``what`` names the batch in error messages.

    Raises:
        DataError: not a pickle, a forbidden global, missing keys, wrong shapes or label ranges.
    """
    try:
        obj = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise DataError(f"{what}: not a valid CIFAR batch: {e}") from e
    except Exception as e:  # truncated or garbage pickles raise EOFError, ValueError, ...
        raise DataError(f"{what}: not a valid CIFAR batch ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict):
        raise DataError(f"{what}: a CIFAR batch is a pickled dict, got {type(obj).__name__}")
    batch = {_text(k): v for k, v in obj.items()}
    missing = [k for k in ("data", *label_keys) if k not in batch]
    if missing:
        raise DataError(f"{what}: the batch lacks the key(s) {', '.join(missing)} (has {', '.join(sorted(batch))})")
    x = batch["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        desc = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{what}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    n = x.shape[0]
    labels = []
    for key, k in zip(label_keys, num_classes):
        try:
            y = np.asarray(batch[key], dtype=np.int64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{what}: {key!r} must be a list of integers ({e})") from e
        if y.shape != (n,):
            raise DataError(f"{what}: {key!r} holds {y.shape} labels for {n} images")
        if n and (int(y.min()) < 0 or int(y.max()) >= k):
            raise DataError(f"{what}: {key!r} must lie in 0..{k - 1}, got range {int(y.min())}..{int(y.max())}")
        labels.append(torch.from_numpy(y))
    images = torch.from_numpy(np.ascontiguousarray(x).reshape(n, 3, 32, 32))
    return images, labels


def _extracted_dir(path: Path, info: CifarInfo) -> Optional[Path]:
    """The folder holding the extracted batches, if ``path`` is (or contains) one."""
    first = info.splits["train"][0]
    for candidate in (path, path / info.folder):
        if (candidate / first).is_file():
            return candidate
    return None


def _md5_file(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _batch_reader(path: Path, info: CifarInfo, wanted: Sequence[str]) -> Iterator[dict[str, bytes]]:
    """The raw bytes of the ``wanted`` batch files, from the archive or an extracted folder."""
    if path.is_dir():
        out = {}
        for name in wanted:
            f = path / name
            if not f.is_file():
                raise DataError(f"{path}: the extracted {info.name} folder lacks {name}")
            actual, expected = _md5_file(f), info.members_md5.get(name)
            if expected is not None and actual != expected:
                raise DataError(f"{f} is corrupt: md5 {actual}, expected {expected}")
            out[name] = f.read_bytes()
        yield out
        return
    out = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:  # one sequential pass over the (compressed) archive
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in out:
                    f = tar.extractfile(member)
                    out[base] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: corrupt or truncated {info.name} archive: {e}") from e
    missing = [n for n in wanted if n not in out]
    if missing:
        raise DataError(f"{path}: the archive lacks {', '.join(missing)} (is it {info.archive}?)")
    yield out


def read_cifar(path: Union[str, os.PathLike], name: str, splits: Sequence[str] = ("train", "test"),
               labels: str = "fine") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read ``splits`` of CIFAR dataset ``name`` from an archive or an extracted batches folder.

    Args:
        path: the ``.tar.gz`` archive, or the folder holding the batch files.
        name: ``"cifar10"`` or ``"cifar100"``.
        splits: any of ``"train"`` (50000 images), ``"test"`` (10000).
        labels: ``"fine"``; for CIFAR-100 also ``"coarse"`` (the 20 superclasses).

    Returns:
        split -> ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` (raw pixels, channels R, G, B) and
        int64 ``(N,)``.
    """
    info = get_cifar_info(name)
    if labels not in ("fine", "coarse") or (labels == "coarse" and not info.coarse_classes):
        raise DataError(f"{name} has labels 'fine'" + (" and 'coarse'" if info.coarse_classes else "")
                        + f", not {labels!r}")
    key, k = ("coarse_labels", info.coarse_classes) if labels == "coarse" else (info.label_key, info.num_classes)
    for s in splits:
        if s not in info.splits:
            raise DataError(f"unknown split {s!r} for {name}; known splits: {', '.join(info.splits)}")
    path = Path(path)
    wanted = [b for s in splits for b in info.splits[s]]
    result = {}
    with _batch_reader(path, info, wanted) as raw:
        for s in splits:
            xs, ys = [], []
            for b in info.splits[s]:
                x, (y,) = read_cifar_batch(raw.pop(b), f"{path}: {b}", (key,), (k,))
                xs.append(x)
                ys.append(y)
            result[s] = (torch.cat(xs), torch.cat(ys))
    return result


# --------------------------------------------------------------------------- fetch and load


def _plan(info: CifarInfo, source: Union[str, os.PathLike]) -> Union[list[_src.Source], Path]:
    """The sources to try, or the extracted folder to read in place."""
    md5 = {info.archive: info.md5}

    def urls(bases):
        return [ArchiveSource(_src.UrlSource(b, suffix=""), md5) for b in bases]

    if isinstance(source, str) and source in ("auto", "url"):
        bases = cifar_mirrors(info.name)
        if not bases and source == "url":
            raise DataError(f"no download URL configured for {info.name} (CIFAR_MIRRORS is empty)")
        return urls(bases)
    if isinstance(source, str) and re.match(r"^(https?|file|ftp)://", source):
        return urls([source])
    if not isinstance(source, (str, os.PathLike)) or not str(source):
        raise DataError(f"source must be 'auto', 'url', a base URL or a path, got {source!r}")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"unknown source {str(source)!r}: expected 'auto', 'url', a base URL (http://...), or an existing "
            f"path ({info.archive}, a folder holding it, or the extracted {info.folder} folder)"
        )
    if path.is_file():
        return [ArchiveSource(FileSource(path), md5)]
    folder = _extracted_dir(path, info)
    if folder is not None:
        return folder
    return [ArchiveSource(_src.DirSource(path, info.local_subdirs), md5)]


def fetch_cifar(name: str, data_dir: Optional[Union[str, os.PathLike]] = None,
                source: Union[str, os.PathLike] = "auto", progress: bool = True, *, rehash: bool = False) -> Path:
    """Make ``<data_dir>/<name>/<archive>`` hold the verified canonical archive; return its path.

    When ``source`` is an extracted batches folder, that folder is returned instead (its batches
    are checked against their md5 when read). A cached archive is trusted when its stamp shows it
    was verified at its current size and mtime (``rehash=True`` hashes it again); a corrupt one is
    reported, deleted and fetched again.

    Raises:
        DataError: unknown name or source, or an archive that no source could supply (the message
            lists each source tried and why it failed, and how to supply the archive offline).
    """
    info = get_cifar_info(name)
    plan = _plan(info, source)
    if isinstance(plan, Path):
        return plan
    root = (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / info.name
    try:
        _src.ensure_files(root, info.files, plan, what=info.name, progress=progress, rehash=rehash)
    except DataError as e:
        lines = [l for l in str(e).splitlines() if not l.startswith("Pass source=")]  # the IDX advice
        lines.append(f"Pass source=<path> ({info.archive}, a folder holding it, or the extracted {info.folder} "
                     f"folder) or source=<base URL> of a mirror; without internet, copy {info.archive} into {root}/.")
        raise DataError("\n".join(lines)) from None
    return root / info.archive


def load_cifar_splits(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, *,
                      source: Union[str, os.PathLike] = "auto", progress: bool = True,
                      splits: Sequence[str] = ("train", "test"), labels: str = "fine",
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Fetch (if needed) and read ``splits``: split -> (uint8 ``(N, 3, 32, 32)``, int64 ``(N,)``)."""
    return read_cifar(fetch_cifar(name, data_dir, source, progress), name, splits, labels)


def load_cifar(name: str, split: str, data_dir: Optional[Union[str, os.PathLike]] = None, *,
               source: Union[str, os.PathLike] = "auto", progress: bool = True, labels: str = "fine",
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of CIFAR-10/100: images uint8 ``(N, 3, 32, 32)`` (0..255, RGB) and labels int64 ``(N,)``.

    ``split`` is ``"train"`` (N = 50000) or ``"test"`` (N = 10000); ``labels`` ``"fine"`` or, for
    CIFAR-100, ``"coarse"``. ``data_dir``, ``source``, ``progress`` as for :func:`fetch_cifar`.
    """
    return load_cifar_splits(name, data_dir, source=source, progress=progress, splits=(split,), labels=labels)[split]
