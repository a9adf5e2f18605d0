"""Datasets from the user's own files: a NumPy archive, a folder of images, a plain-text corpus.

Public API::

    file_digest(path) -> str                       sha256 of a file's bytes
    folder_digest(folder, files) -> str            sha256 of a manifest of files (their sha256 and paths)
    read_npz(path, sha256=None) -> dict[str, np.ndarray]
    image_files(folder) -> ImageFiles              classes and (file, class) pairs per split folder
    load_images(folder, size, color, sha256, data_dir) -> LoadedImages
    text_files(path) -> dict[split, Path]          one file, or a folder's train/valid/test.txt
    load_corpus(path, level, min_count, sha256, data_dir) -> Corpus

Verification: a dataset's digest (:func:`dataset_digest`) is the sha256 of the file, or, for a
folder, of its manifest: one line ``"<sha256>  <relative path>\\n"`` per file, sorted by path. The
digest goes into the run's configuration (data option ``sha256``), so a run resumed, or an
experiment row rerun, on changed data is refused (or redone) rather than silently mixed. Bytes are
hashed as they are read for decoding, so what is decoded is what was verified. Digests are
remembered per process for a file's ``(size, mtime)``.

Cache: decoding images and tokenising text is done once, into
``<data_dir>/local/<kind>-<key>.pt`` (``key``: the digest and the decoding options), written
atomically (:mod:`bpfree.atomic`): a cache file is absent or whole, never half-written. A NumPy
archive needs no decoding and is read in place.

Every problem with a file is a one-line :class:`DataError` naming the file and what is wrong.
"""

from __future__ import annotations

import array
import hashlib
import io
import json
import logging
import os
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from ..atomic import atomic_write
from .idx import DataError
from .text import EOS, SPLITS, UNK, Corpus

logger = logging.getLogger("bpfree.data")

#: Format of the cache files; a cache file of another format is rebuilt.
CACHE_FORMAT = 1
#: File endings taken as images in an image folder (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: Pillow modes that are greyscale (``color = "auto"`` keeps one channel when every image has one).
GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
#: Fractions of a single text file's characters that go to train and valid (test: the rest).
TEXT_SPLIT = (0.90, 0.05)

PathLike = Union[str, os.PathLike]

_DIGESTS: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------- digests


def _stat_key(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns


def file_digest(path: PathLike) -> str:
    """Hex sha256 of the bytes of ``path`` (remembered for its size and mtime in this process)."""
    path = Path(path)
    try:
        key = _stat_key(path)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if key not in _DIGESTS:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        except OSError as e:
            raise DataError(f"cannot read {path}: {e.strerror or e}") from None
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def manifest_digest(entries: list[tuple[str, str]]) -> str:
    """sha256 of the manifest ``"<sha256>  <relative path>\\n"`` of ``(relative path, sha256)`` entries."""
    text = "".join(f"{sha}  {rel}\n" for rel, sha in sorted(entries))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def folder_digest(folder: Path, files: list[Path]) -> str:
    """The digest of ``files`` (inside ``folder``): :func:`manifest_digest` of their paths and sha256."""
    return manifest_digest([(f.relative_to(folder).as_posix(), file_digest(f)) for f in files])


def existing(path: PathLike, what: str) -> Path:
    """``path`` (``~`` expanded, made absolute) if it exists, else a :class:`DataError` naming ``what``."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{what} {p} does not exist")
    return p.absolute()


def dataset_digest(kind: str, path: PathLike) -> str:
    """The digest of the ``npz``, ``images`` or ``text`` dataset at ``path`` (see the module docstring)."""
    if kind == "npz":
        p = existing(path, "the NumPy archive")
        if p.is_dir():
            raise DataError(f"{p} is a folder; npz:PATH takes a .npz file (np.savez)")
        return file_digest(p)
    if kind == "images":
        files = image_files(path)
        return folder_digest(files.root, [f for pairs in files.splits.values() for f, _ in pairs])
    if kind == "text":
        p = existing(path, "the text corpus")
        parts = text_files(p)
        return folder_digest(p, list(parts.values())) if p.is_dir() else file_digest(p)
    raise ValueError(f"unknown local dataset kind {kind!r}")


def read_verified(path: Path, sha256: Optional[str]) -> bytes:
    """The bytes of ``path``, checked against ``sha256`` when given."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise DataError(f"{path} changed while it was being read (sha256 {actual}, expected {sha256})")
    return data


# --------------------------------------------------------------------------- cache


def cache_file(data_dir: Optional[PathLike], kind: str, digest: str, options: dict[str, Any]) -> Path:
    """``<data_dir>/local/<kind>-<key>.pt``: ``key`` hashes the format, ``digest`` and decoding ``options``."""
    from .vision import default_data_dir

    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    key = hashlib.sha256(json.dumps([CACHE_FORMAT, kind, digest, options], sort_keys=True).encode()).hexdigest()
    return root / "local" / f"{kind}-{key[:32]}.pt"


def read_cache(path: Path) -> Optional[dict[str, Any]]:
    """The blob cached at ``path``, or ``None`` when there is none or it cannot be read (then rebuilt)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # damaged, or from another version: rebuild it
        logger.warning("%s cannot be read (%s); decoding the data again", path, e)
        return None
    if not isinstance(blob, dict) or blob.get("format") != CACHE_FORMAT or blob.get("file") != path.name:
        return None
    return blob


def write_cache(path: Path, blob: dict[str, Any]) -> None:
    """Write ``blob`` atomically to ``path``; a cache that cannot be written is warned of, not fatal."""
    blob = {"format": CACHE_FORMAT, "file": path.name, **blob}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: torch.save(blob, f), suffix=".part")
    except OSError as e:
        logger.warning("cannot write the cache file %s (%s); the data is decoded again next time", path,
                       e.strerror or e)


# --------------------------------------------------------------------------- NumPy archives


def read_npz(path: PathLike, sha256: Optional[str] = None) -> dict[str, np.ndarray]:
    """The arrays of the ``.npz`` archive at ``path`` (plain numeric arrays only: no pickles).

    Raises :class:`DataError` for a file that is not an ``.npz`` archive, or that holds object
    arrays (which only unpickling could read, and unpickling can run code).
    """
    p = existing(path, "the NumPy archive")
    data = read_verified(p, sha256)
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise DataError(f"{p} is not a NumPy .npz archive (np.savez writes one)")
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DataError(f"{p} holds object arrays (ragged or mixed data): store every array as one "
                            f"numeric block (np.stack the samples)") from None
        raise DataError(f"{p} cannot be read as a NumPy archive: {e}") from None
    except (OSError, zipfile.BadZipFile, EOFError, KeyError) as e:
        raise DataError(f"{p} cannot be read as a NumPy archive: {e}") from None


# --------------------------------------------------------------------------- image folders


@dataclass
class ImageFiles:
    """An image folder: ``classes`` (sorted folder names, index = label) and, per split folder
    (``"all"``, or ``"train"`` and ``"test"``), the ``(file, label)`` pairs, sorted."""

    root: Path
    classes: list[str]
    splits: dict[str, list[tuple[Path, int]]]


def _class_folders(folder: Path) -> dict[str, list[Path]]:
    """Class name -> its image files (sorted), for the sub-folders of ``folder`` (hidden ones skipped)."""
    out = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        out[sub.name] = sorted(f for f in sub.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
                               and not any(part.startswith(".") for part in f.relative_to(sub).parts))
    return out


def image_files(folder: PathLike) -> ImageFiles:
    """The classes and files of an image folder: ``FOLDER/<class>/*.png|jpg``, or
    ``FOLDER/train/<class>/...`` and ``FOLDER/test/<class>/...`` (other files are ignored)."""
    root = existing(folder, "the image folder")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder; images:FOLDER takes a folder with one sub-folder per class")
    split_mode = (root / "train").is_dir() and (root / "test").is_dir()
    parts = {"train": _class_folders(root / "train"), "test": _class_folders(root / "test")} if split_mode \
        else {"all": _class_folders(root)}
    first = "train" if split_mode else "all"
    classes = sorted(parts[first])
    where = root / "train" if split_mode else root
    if len(classes) < 2:
        raise DataError(f"{where} holds {len(classes)} class folder(s); an image folder needs one sub-folder "
                        f"per class, at least two")
    for split, folders in parts.items():
        for name, files in folders.items():
            base = root / split if split_mode else root
            if name not in classes:
                raise DataError(f"{base / name} is not a class of {where} (classes: {', '.join(classes)})")
            if not files and split == first:
                raise DataError(f"{base / name} holds no PNG or JPEG file")
    splits = {split: [(f, classes.index(name)) for name in sorted(folders) for f in folders[name]]
              for split, folders in parts.items()}
    if split_mode and not splits["test"]:
        raise DataError(f"{root / 'test'} holds no PNG or JPEG file in a class folder")
    return ImageFiles(root, classes, splits)


@dataclass
class LoadedImages:
    """Decoded images: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``, ``split`` int8
    ``(N,)`` (index into ``split_names``), ``classes`` (index = label)."""

    images: torch.Tensor
    labels: torch.Tensor
    split: torch.Tensor
    split_names: list[str]
    classes: list[str]


def _header(path: Path) -> tuple[str, tuple[int, int]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.mode, im.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} is not a readable PNG or JPEG image: {str(e).splitlines()[0]}") from None


def _decode(path: Path, data: bytes, mode: str, size: Optional[tuple[int, int]]) -> np.ndarray:
    """``(H, W)`` (mode ``L``) or ``(H, W, 3)`` (``RGB``) uint8 pixels of the image bytes ``data``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path} cannot be decoded as an image: {str(e).splitlines()[0]}") from None


def load_images(folder: PathLike, size: tuple[int, ...], color: str, sha256: str,
                data_dir: Optional[PathLike] = None, progress: bool = False) -> LoadedImages:
    """Every image of the folder, decoded (Pillow), converted and resized; cached (see the module docstring).

    ``size``: ``()`` keeps the images' own size (they must all have one size), ``(S,)`` resizes to
    ``S x S`` and ``(H, W)`` to ``H x W`` (bilinear, aspect ratio not kept). ``color``: ``"grey"``
    (one channel), ``"rgb"`` (three; alpha dropped) or ``"auto"`` (grey if every image is).
    ``sha256``: the folder's digest (:func:`dataset_digest`); the files read must match it.
    """
    files = image_files(folder)
    cache = cache_file(data_dir, "images", sha256, {"size": list(size), "color": color})
    blob = read_cache(cache)
    if blob is not None:
        return LoadedImages(blob["images"], blob["labels"], blob["split"], list(blob["split_names"]),
                            list(blob["classes"]))
    pairs = [(f, label, i) for i, pairs in enumerate(files.splits.values()) for f, label in pairs]
    headers = [_header(f) for f, _, _ in pairs]
    if color == "auto":
        color = "grey" if all(m in GREY_MODES for m, _ in headers) else "rgb"
    target: Optional[tuple[int, int]] = None
    if size:
        target = (size[0], size[-1])
    else:
        sizes = {s for _, s in headers}
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = headers[0][1], next(s for _, s in headers if s != headers[0][1])
            other = next(f for (f, _, _), (_, s) in zip(pairs, headers) if s == (w1, h1))
            raise DataError(
                f"ragged images: {pairs[0][0]} is {h0}x{w0} (height x width) but {other} is {h1}x{w1}; "
                f"resize them all with --set size=N (N x N) or size=H,W"
            )
    mode = "L" if color == "grey" else "RGB"
    entries, arrays = [], []
    for f, _, _ in pairs:
        data = read_verified(f, None)
        entries.append((f.relative_to(files.root).as_posix(), hashlib.sha256(data).hexdigest()))
        arrays.append(_decode(f, data, mode, target))
    if manifest_digest(entries) != sha256:
        raise DataError(f"the images in {files.root} changed while they were being read; run again")
    x = np.stack(arrays)
    x = x[:, None] if x.ndim == 3 else x.transpose(0, 3, 1, 2)
    loaded = LoadedImages(
        images=torch.from_numpy(np.ascontiguousarray(x)),
        labels=torch.tensor([label for _, label, _ in pairs], dtype=torch.int64),
        split=torch.tensor([i for _, _, i in pairs], dtype=torch.int8),
        split_names=list(files.splits), classes=files.classes,
    )
    write_cache(cache, {"images": loaded.images, "labels": loaded.labels, "split": loaded.split,
                        "split_names": loaded.split_names, "classes": loaded.classes})
    return loaded


# --------------------------------------------------------------------------- text corpora


def text_files(path: PathLike) -> dict[str, Path]:
    """``{"all": FILE}`` for a text file, or ``{"train", "valid", "test"}`` for a folder holding the three."""
    p = existing(path, "the text corpus")
    if not p.is_dir():
        return {"all": p}
    missing = [f"{s}.txt" for s in SPLITS if not (p / f"{s}.txt").is_file()]
    if missing:
        raise DataError(f"the folder {p} lacks {', '.join(missing)}: text:FOLDER needs train.txt, valid.txt "
                        f"and test.txt (or give text:FILE for one file, split 90/5/5)")
    return {s: p / f"{s}.txt" for s in SPLITS}


def decode_text(path: Path, data: bytes) -> str:
    """``data`` as UTF-8 text (a leading byte-order mark dropped, ``\\r\\n`` and ``\\r`` read as ``\\n``)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} (line {line}) "
                        f"cannot be decoded ({e.reason})") from None
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


def split_text(text: str, level: str) -> dict[str, str]:
    """One text cut into contiguous train, valid, test parts at 90% and 95% of its characters;
    at word level each cut moves forward to the next whitespace, so no word is split."""
    n = len(text)
    cuts = []
    for frac in (TEXT_SPLIT[0], TEXT_SPLIT[0] + TEXT_SPLIT[1]):
        c = max(round(frac * n), cuts[-1] if cuts else 0)
        if level == "word":
            while c < n and not text[c].isspace():
                c += 1
        cuts.append(c)
    return {"train": text[: cuts[0]], "valid": text[cuts[0] : cuts[1]], "test": text[cuts[1] :]}


def tokens(text: str, level: str) -> list[str]:
    """Word level: every line's whitespace-separated words, then ``<eos>`` (an empty line gives
    ``<eos>`` alone; as for Penn Treebank). Character level: every character, ``\\n`` included."""
    if level == "char":
        return list(text)
    out: list[str] = []
    for line in text.splitlines():
        out += line.split()
        out.append(EOS)
    return out


def build_corpus(name: str, parts: dict[str, str], level: str, min_count: int = 1) -> Corpus:
    """Token ids of the three ``parts``: vocabulary ``[<unk>]`` then the training tokens seen at least
    ``min_count`` times, in order of first occurrence; any other token is ``<unk>``."""
    streams = {s: tokens(parts[s], level) for s in SPLITS}
    counts = Counter(streams["train"])
    vocab = [UNK] + [t for t in dict.fromkeys(streams["train"]) if t != UNK and counts[t] >= min_count]
    index = {t: i for i, t in enumerate(vocab)}
    ids = {}
    for s in SPLITS:
        a = array.array("q", [index.get(t, 0) for t in streams[s]])
        ids[s] = torch.frombuffer(a, dtype=torch.int64).clone() if len(a) else torch.zeros(0, dtype=torch.int64)
    return Corpus(name, vocab, ids)


def load_corpus(path: PathLike, level: str, min_count: int, sha256: str,
                data_dir: Optional[PathLike] = None) -> Corpus:
    """The corpus at ``path`` (a UTF-8 file, or a folder of train/valid/test.txt), tokenised and cached.

    Raises :class:`DataError` for undecodable bytes, an empty corpus (no word or character), or a
    split with fewer than two tokens (nothing to predict).
    """
    files = text_files(path)
    root = existing(path, "the text corpus")
    cache = cache_file(data_dir, "text", sha256, {"level": level, "min_count": min_count})
    blob = read_cache(cache)
    if blob is not None:
        return Corpus(str(root), list(blob["vocab"]), {s: blob["splits"][s] for s in SPLITS})
    data = {s: read_verified(f, None) for s, f in files.items()}
    digest = (manifest_digest([(f.name, hashlib.sha256(data[s]).hexdigest()) for s, f in files.items()])
              if root.is_dir() else hashlib.sha256(data["all"]).hexdigest())
    if digest != sha256:
        raise DataError(f"{root} changed while it was being read (sha256 {digest}, expected {sha256})")
    texts = {s: decode_text(files[s], data[s]) for s in files}
    if "all" in texts:
        whole = texts["all"]
        if not (whole.strip() if level == "word" else whole):
            raise DataError(f"{root} is an empty corpus: it holds no {'word' if level == 'word' else 'character'}")
        texts = split_text(whole, level)
    elif not (texts["train"].strip() if level == "word" else texts["train"]):
        raise DataError(f"{files['train']} is an empty corpus: it holds no {'word' if level == 'word' else 'character'}")
    corpus = build_corpus(str(root), texts, level, min_count)
    share = {"train": "the first 90%", "valid": "the next 5%", "test": "the last 5%"}
    for s in SPLITS:
        n = corpus.splits[s].numel()
        if n < 2:
            what = f"its {s} part ({share[s]} of the text)" if "all" in files else files[s].name
            raise DataError(f"{root} is too short: {what} holds {n} token(s); every split needs at least 2 (one to predict "
                            f"from, one to predict): give a longer text")
    write_cache(cache, {"vocab": corpus.vocab, "splits": corpus.splits})
    return corpus
