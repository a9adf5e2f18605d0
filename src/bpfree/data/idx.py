"""Reading and writing the IDX format (the container of MNIST and Fashion-MNIST).

Layout of an IDX file (all integers big-endian)::

    byte 0, 1   0x00 0x00                 magic: two zero bytes
    byte 2      dtype code                0x08 uint8, 0x09 int8, 0x0B int16,
                                          0x0C int32, 0x0D float32, 0x0E float64
    byte 3      ndim                      number of dimensions (>= 1)
    4 * ndim    int32 dims                size of each dimension
    rest        the values, C order, big-endian, prod(dims) * itemsize bytes

``read_idx`` also accepts gzip-compressed IDX (detected by the gzip magic ``1f 8b``).

This module is the lowest layer of :mod:`bpfree.data`, so the data layer's base error,
:class:`DataError`, lives here.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np

from ..atomic import atomic_write

__all__ = ["DataError", "IdxFormatError", "read_idx", "write_idx"]


class DataError(RuntimeError):
    """Base class of every error raised by :mod:`bpfree.data` (missing, corrupt or unreadable data)."""


class IdxFormatError(DataError, ValueError):
    """The bytes are not a well-formed IDX file (bad magic, unknown dtype, truncated, trailing bytes)."""


# dtype code -> dtype as stored in the file (big-endian).
_STORED: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
# (kind, itemsize) of an in-memory dtype -> code, for writing.
_CODE_OF: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in _STORED.items()
}

_GZIP_MAGIC = b"\x1f\x8b"

PathOrBytes = Union[str, os.PathLike, bytes, bytearray, memoryview]


def _load_buffer(source: PathOrBytes) -> tuple[bytearray, str]:
    """Return the (decompressed) bytes of ``source`` as a writable buffer, and a name for messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        name = "<bytes>"
        raw = bytes(source)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = str(path)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                got = f.readinto(buf)
        except FileNotFoundError:
            raise DataError(f"IDX file not found: {path}") from None
        except OSError as e:
            raise DataError(f"cannot read IDX file {path}: {e}") from e
        if got != size:
            del buf[got:]
        if not buf.startswith(_GZIP_MAGIC):
            return buf, name
        raw = bytes(buf)
    else:
        raise TypeError(
            f"read_idx expects a path or bytes, got {type(source).__name__}"
        )
    if raw.startswith(_GZIP_MAGIC):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise IdxFormatError(f"{name}: corrupt or truncated gzip stream: {e}") from e
    return bytearray(raw), name


def read_idx(source: PathOrBytes) -> np.ndarray:
    """Parse an IDX file (plain or gzip-compressed) into a numpy array.

    Args:
        source: a path (``str`` / ``os.PathLike``) or the file's bytes.

    Returns:
        A writable, C-contiguous, native-endian array of shape ``dims`` (e.g. ``(N, 28, 28)``
        uint8 for MNIST images, ``(N,)`` uint8 for labels) and the dtype named by the header.

    Raises:
        IdxFormatError: bad magic, unknown dtype code, zero dimensions, a file shorter than
            its header says (truncated) or longer (trailing bytes).
        DataError: the file cannot be read.
    """
    buf, name = _load_buffer(source)
    n = len(buf)
    if n < 4:
        raise IdxFormatError(f"{name}: truncated IDX file: {n} bytes, shorter than the 4-byte header")
    if buf[0] != 0 or buf[1] != 0:
        raise IdxFormatError(
            f"{name}: bad IDX magic {bytes(buf[:4]).hex()}: the first two bytes must be zero "
            "(is this an IDX file?)"
        )
    code, ndim = buf[2], buf[3]
    if code not in _STORED:
        known = ", ".join(f"0x{c:02X}" for c in _STORED)
        raise IdxFormatError(f"{name}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise IdxFormatError(f"{name}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if n < header:
        raise IdxFormatError(
            f"{name}: truncated IDX file: {n} bytes, shorter than its {header}-byte header"
        )
    dims = struct.unpack(f">{ndim}i", bytes(buf[4:header]))
    if any(d < 0 for d in dims):
        raise IdxFormatError(f"{name}: negative dimension in IDX header: {dims}")
    stored = _STORED[code]
    count = int(np.prod(dims, dtype=np.int64))
    expected = header + count * stored.itemsize
    if n < expected:
        raise IdxFormatError(
            f"{name}: truncated IDX file: header says shape {tuple(dims)} of {stored.name} "
            f"({expected} bytes in all), but it has only {n} bytes"
        )
    if n > expected:
        raise IdxFormatError(
            f"{name}: {n - expected} trailing bytes after the data of shape {tuple(dims)} "
            f"(expected {expected} bytes in all, got {n})"
        )
    arr = np.frombuffer(buf, dtype=stored, count=count, offset=header).reshape(dims)
    if stored.byteorder == ">":
        arr = arr.astype(stored.newbyteorder("="))
    return arr


def write_idx(array, path: Union[str, os.PathLike]) -> Path:
    """Write ``array`` as an IDX file at ``path`` (gzip-compressed when the name ends in ``.gz``).

    Args:
        array: anything ``np.asarray`` accepts, with 1 to 255 dimensions and a dtype among
            uint8, int8, int16, int32, float32, float64.
        path: destination; written atomically (:func:`bpfree.atomic.atomic_write`).

    Returns:
        The path written.
    """
    arr = np.asarray(array)
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if key not in _CODE_OF:
        raise IdxFormatError(
            f"cannot write dtype {arr.dtype} to IDX: supported are uint8, int8, int16, int32, "
            "float32, float64"
        )
    if not 1 <= arr.ndim <= 255:
        raise IdxFormatError(f"IDX needs 1 to 255 dimensions, got an array of shape {arr.shape}")
    if any(d >= 2**31 for d in arr.shape):
        raise IdxFormatError(f"IDX dimensions must fit in int32, got shape {arr.shape}")
    code = _CODE_OF[key]
    payload = (
        struct.pack(">BBBB", 0, 0, code, arr.ndim)
        + struct.pack(f">{arr.ndim}i", *arr.shape)
        + np.ascontiguousarray(arr, dtype=_STORED[code]).tobytes()
    )
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)
    atomic_write(path, lambda f: f.write(payload), suffix=".part")
    return path
