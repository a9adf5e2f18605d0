"""Tests of CIFAR-10/100 loading, the cifar tasks, batched augmentation and the MNIST pad option.

The canonical archives cannot be obtained here, so every test builds small archives in the exact
published format (a tar.gz of protocol-2 pickles with bytes keys, ``b'data'`` an ``(N, 3072)``
uint8 array in channel-major order) and patches their hashes into the dataset table. The only
network used is an HTTP server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import io
import os
import pickle
import pickletools
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bpfree import tasks
from bpfree.data import DATASETS, DataError, cifar, vision
from bpfree.data.cifar import fetch_cifar, load_cifar, read_cifar
from bpfree.data.idx import write_idx
from bpfree.options import OptionError
from bpfree.tasks.vision import Augment, batch_generator, crop_flip

# --------------------------------------------------------------------------- generated archives


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _batch(rng, n, cifar100=False, label="batch"):
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    d = {b"batch_label": label.encode(), b"data": data, b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    if cifar100:
        d[b"fine_labels"] = [int(v) for v in rng.integers(0, 100, n)]
        d[b"coarse_labels"] = [int(v) for v in rng.integers(0, 20, n)]
    else:
        d[b"labels"] = [int(v) for v in rng.integers(0, 10, n)]
    return d


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2 wrote the published batches: every str/bytes a Python 2 ``str``
    (BINSTRING opcodes), numpy's globals under ``numpy.core.multiarray``, protocol 2."""

    def save_py2_str(self, obj):
        b = obj.encode("latin1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(b)]) if len(b) < 256 else pickle.BINSTRING + struct.pack("<i", len(b))
        self.write(head + b)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core.", "numpy.core.")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[str] = dispatch[bytes] = save_py2_str
    dispatch[type] = save_global


def py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


@dataclasses.dataclass
class Archive:
    name: str
    path: Path
    members: dict  # member name -> pickled bytes
    batches: dict  # member name -> dict

    @property
    def bytes(self) -> bytes:
        return self.path.read_bytes()

    def images(self, *members):
        return np.concatenate([self.batches[m][b"data"] for m in members]).reshape(-1, 3, 32, 32)

    def labels(self, *members, key=b"labels"):
        return np.concatenate([self.batches[m][key] for m in members])


def make_archive(directory: Path, name="cifar10", seed=0, n=5, tamper=None) -> Archive:
    """A small archive in the published layout; ``tamper(members)`` may alter the pickles."""
    rng = np.random.default_rng(seed)
    info = cifar.CIFAR[name]
    batches, members = {}, {}
    c100 = name == "cifar100"
    for split, files in info.splits.items():
        for f in files:
            batches[f] = _batch(rng, n + (1 if split == "test" else 0), c100, label=f)
            # the published files come from Python 2; batches written by Python 3 (bytes through
            # _codecs.encode) must load as well: the archive mixes both
            py2 = f in ("data_batch_2", "test")
            members[f] = py2_pickle(batches[f]) if py2 else pickle.dumps(batches[f], protocol=2)
    meta_name = "meta" if c100 else "batches.meta"
    members[meta_name] = pickle.dumps({b"label_names": [b"a", b"b"]}, protocol=2)
    if tamper is not None:
        tamper(members)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / info.archive
    with tarfile.open(path, "w:gz") as tar:
        for f, data in members.items():
            ti = tarfile.TarInfo(f"{info.folder}/{f}")
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return Archive(name, path, members, batches)


def patch_table(monkeypatch, archive: Archive, **changes):
    info = cifar.CIFAR[archive.name]
    fields = dict(sha256=_sha(archive.bytes), md5=_md5(archive.bytes),
                  members_md5={k: _md5(v) for k, v in archive.members.items() if k in info.members_md5})
    new = dataclasses.replace(info, **{**fields, **changes})
    monkeypatch.setitem(cifar.CIFAR, archive.name, new)
    return new


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No real mirror or user cache is touched."""
    for name in cifar.CIFAR:
        monkeypatch.setitem(cifar.CIFAR_MIRRORS, name, [])
    for key in list(os.environ):
        if key.startswith("BPFREE_MIRROR_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("BPFREE_DATA", str(tmp_path / "default-cache"))


@pytest.fixture
def c10(tmp_path, monkeypatch):
    a = make_archive(tmp_path / "src10", "cifar10")
    patch_table(monkeypatch, a)
    return a


@pytest.fixture
def c100(tmp_path, monkeypatch):
    a = make_archive(tmp_path / "src100", "cifar100", seed=1)
    patch_table(monkeypatch, a)
    return a


# --------------------------------------------------------------------------- the published facts


def test_table_holds_the_published_archives():
    c = cifar.CIFAR
    assert c["cifar10"].md5 == "c58f30108f718f92721af3b95e74349a"
    assert c["cifar100"].md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert c["cifar10"].archive == "cifar-10-python.tar.gz" and c["cifar100"].archive == "cifar-100-python.tar.gz"
    assert cifar.CIFAR_MIRRORS is not None
    assert len(c["cifar10"].splits["train"]) == 5 and c["cifar100"].splits == {"train": ("train",), "test": ("test",)}
    assert all(len(h) == 64 for h in (c["cifar10"].sha256, c["cifar100"].sha256))


def test_default_mirror_is_the_canonical_url(monkeypatch):
    monkeypatch.undo()  # the real table
    src = cifar._plan(cifar.CIFAR["cifar10"], "url")[0]
    assert src.inner.url("cifar-10-python.tar.gz") == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


# --------------------------------------------------------------------------- parsing


def test_parse_generated_cifar10_archive(c10):
    data = read_cifar(c10.path, "cifar10")
    x, y = data["train"]
    assert x.dtype == torch.uint8 and x.shape == (25, 3, 32, 32) and y.dtype == torch.int64
    train = [f"data_batch_{i}" for i in range(1, 6)]
    assert np.array_equal(x.numpy(), c10.images(*train))
    assert np.array_equal(y.numpy(), c10.labels(*train))
    # channel-major rows: the first 1024 values are the red plane, row by row
    row = c10.batches["data_batch_1"][b"data"][0]
    assert np.array_equal(x[0, 0].numpy(), row[:1024].reshape(32, 32))
    assert np.array_equal(x[0, 2].numpy(), row[2048:].reshape(32, 32))
    assert int(x[0, 1, 0, 5]) == int(row[1024 + 5])
    xt, yt = data["test"]
    assert xt.shape == (6, 3, 32, 32) and np.array_equal(yt.numpy(), c10.labels("test_batch"))


def test_parse_generated_cifar100_archive_fine_and_coarse(c100):
    x, y = read_cifar(c100.path, "cifar100", splits=("train",))["train"]
    assert x.shape == (5, 3, 32, 32)
    assert np.array_equal(y.numpy(), c100.labels("train", key=b"fine_labels"))
    _, yc = read_cifar(c100.path, "cifar100", splits=("test",), labels="coarse")["test"]
    assert np.array_equal(yc.numpy(), c100.labels("test", key=b"coarse_labels"))
    with pytest.raises(DataError, match="'fine'"):
        read_cifar(c100.path, "cifar10", labels="coarse")


def test_python2_batches_load_exactly():
    rng = np.random.default_rng(3)
    batch = _batch(rng, 4)
    raw = py2_pickle(batch)
    ops = {op.name for op, _, _ in pickletools.genops(raw)}
    globals_ = [arg for op, arg, _ in pickletools.genops(raw) if op.name == "GLOBAL"]
    assert "BINSTRING" in ops and "BINBYTES" not in ops and "numpy.core.multiarray _reconstruct" in globals_
    x, (y,) = cifar.read_cifar_batch(raw, "py2", ("labels",), (10,))
    assert np.array_equal(x.numpy().reshape(4, 3072), batch[b"data"]) and y.tolist() == batch[b"labels"]


def test_batches_written_by_python2_style_pickles_with_str_keys(tmp_path):
    # latin-1 compatible: a batch with str keys (as encoding='latin1' would give) is accepted too
    rng = np.random.default_rng(0)
    raw = pickle.dumps({"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 2]}, protocol=2)
    x, (y,) = cifar.read_cifar_batch(raw, "b", ("labels",), (10,))
    assert x.shape == (2, 3, 32, 32) and y.tolist() == [1, 2]


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("bad,match", [
    (b"not a pickle", "not a valid CIFAR batch"),
    (pickle.dumps([1, 2], protocol=2), "pickled dict"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2), "lacks the key"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, protocol=2), r"\(N, 3072\)"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, protocol=2), "uint8"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, protocol=2), r"0\.\.9"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, protocol=2), "labels for 2 images"),
    (pickle.dumps({b"data": _Evil(), b"labels": [0]}, protocol=2), "refusing global posix.getcwd|refusing global os"),
])
def test_bad_batches_are_rejected_with_a_clear_error(bad, match):
    with pytest.raises(DataError, match=match):
        cifar.read_cifar_batch(bad, "batch", ("labels",), (10,))


CALLED = []


def _record_call():
    CALLED.append(1)


class _Recorder:
    def __reduce__(self):
        return (_record_call, ())


def test_unpickler_never_calls_a_forbidden_global():
    payload = pickle.dumps({b"data": _Recorder()}, protocol=2)
    pickle.loads(payload)  # the unrestricted unpickler would call it
    assert CALLED == [1]
    with pytest.raises(DataError, match="refusing global .*_record_call"):
        cifar.read_cifar_batch(payload, "b", ("labels",), (10,))
    assert CALLED == [1]


# --------------------------------------------------------------------------- fetching and the cache


def test_fetch_from_local_archive_installs_it_verbatim(tmp_path, c10):
    path = fetch_cifar("cifar10", tmp_path / "cache", source=str(c10.path), progress=False)
    assert path == tmp_path / "cache" / "cifar10" / "cifar-10-python.tar.gz"
    assert path.read_bytes() == c10.bytes
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".part")]
    # later loads need no source: the verified archive is in the cache
    x, y = load_cifar("cifar10", "test", tmp_path / "cache", progress=False)
    assert np.array_equal(x.numpy(), c10.images("test_batch"))


def test_fetch_from_a_folder_holding_the_archive_and_from_the_default_dir(tmp_path, c10):
    folder = tmp_path / "torchvision-root" / "CIFAR10" / "raw"
    folder.mkdir(parents=True)
    (folder / c10.path.name).write_bytes(c10.bytes)
    path = fetch_cifar("cifar10", source=tmp_path / "torchvision-root", progress=False)
    assert path == tmp_path / "default-cache" / "cifar10" / c10.path.name


def test_archive_dropped_into_the_cache_is_verified_and_used(tmp_path, c10):
    root = tmp_path / "cache" / "cifar10"
    root.mkdir(parents=True)
    (root / c10.path.name).write_bytes(c10.bytes)
    assert fetch_cifar("cifar10", tmp_path / "cache", progress=False) == root / c10.path.name


def test_extracted_folder_is_read_in_place_and_checked_by_md5(tmp_path, c10):
    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, data in c10.members.items():
        (folder / name).write_bytes(data)
    for src in (folder, folder.parent):
        x, y = load_cifar("cifar10", "train", tmp_path / "cache", source=src, progress=False)
        assert np.array_equal(x.numpy(), c10.images(*[f"data_batch_{i}" for i in range(1, 6)]))
    assert not (tmp_path / "cache" / "cifar10").exists()
    bad = bytearray(c10.members["data_batch_3"])
    bad[-20] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(bad))
    with pytest.raises(DataError, match=r"data_batch_3 is corrupt: md5"):
        load_cifar("cifar10", "train", source=folder, progress=False)


def test_wrong_archive_is_refused_and_nothing_is_cached(tmp_path, c10):
    other = make_archive(tmp_path / "other", "cifar10", seed=7)
    with pytest.raises(DataError, match="has sha256 .* expected"):
        fetch_cifar("cifar10", tmp_path / "cache", source=str(other.path), progress=False)
    assert [p.name for p in (tmp_path / "cache" / "cifar10").iterdir() if not p.name.startswith(".bpfree")] == []


def test_md5_is_checked_on_installation(tmp_path, monkeypatch, c10):
    patch_table(monkeypatch, c10, md5="0" * 32)
    with pytest.raises(DataError, match="md5"):
        fetch_cifar("cifar10", tmp_path / "cache", source=str(c10.path), progress=False)


def rewrite(path: Path, data: bytes) -> None:
    """Write ``data`` over ``path`` with an mtime 5 s later than before: a rewrite within the
    file system's timestamp granularity (a clock tick) could otherwise keep the old mtime."""
    before = path.stat().st_mtime_ns
    path.write_bytes(data)
    os.utime(path, ns=(path.stat().st_atime_ns, before + 5_000_000_000))


def test_cached_archive_corrupted_later_is_detected_deleted_and_refetched(tmp_path, c10, caplog):
    path = fetch_cifar("cifar10", tmp_path / "cache", source=str(c10.path), progress=False)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    rewrite(path, bytes(data))  # new mtime: the stamp no longer vouches for it
    again = fetch_cifar("cifar10", tmp_path / "cache", source=str(c10.path), progress=False)
    assert again.read_bytes() == c10.bytes
    assert "corrupt or truncated" in caplog.text
    rewrite(path, bytes(data))
    with pytest.raises(DataError, match=r"(?s)could not obtain cifar10.*copy cifar-10-python.tar.gz into"):
        fetch_cifar("cifar10", tmp_path / "cache", progress=False)  # no source left


def test_structurally_corrupt_archive_is_reported(tmp_path, monkeypatch, c10):
    truncated = tmp_path / "trunc" / c10.path.name
    truncated.parent.mkdir()
    truncated.write_bytes(c10.bytes[: len(c10.bytes) // 2])
    # its hash is pinned, so it installs; reading it must fail clearly
    monkeypatch.setitem(cifar.CIFAR, "cifar10", dataclasses.replace(
        cifar.CIFAR["cifar10"], sha256=_sha(truncated.read_bytes()), md5=_md5(truncated.read_bytes())))
    with pytest.raises(DataError, match="corrupt or truncated cifar10 archive"):
        load_cifar("cifar10", "train", tmp_path / "cache", source=truncated, progress=False)


def test_archive_missing_a_batch_or_holding_a_bad_one(tmp_path, monkeypatch):
    a = make_archive(tmp_path / "a", "cifar10", tamper=lambda m: m.pop("data_batch_4"))
    patch_table(monkeypatch, a)
    with pytest.raises(DataError, match="lacks data_batch_4"):
        load_cifar("cifar10", "train", tmp_path / "cache", source=a.path, progress=False)

    def bad_labels(m):
        m["test_batch"] = pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [12]}, protocol=2)

    b = make_archive(tmp_path / "b", "cifar10", tamper=bad_labels)
    patch_table(monkeypatch, b)
    with pytest.raises(DataError, match=r"test_batch: 'labels' must lie in 0\.\.9"):
        load_cifar("cifar10", "test", tmp_path / "cache2", source=b.path, progress=False)


def test_unknown_names_sources_and_splits(tmp_path, c10):
    with pytest.raises(DataError, match="unknown CIFAR dataset 'cifar11'"):
        fetch_cifar("cifar11", tmp_path)
    with pytest.raises(DataError, match="unknown source"):
        fetch_cifar("cifar10", tmp_path, source=str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="unknown split 'valid'"):
        read_cifar(c10.path, "cifar10", splits=("valid",))
    with pytest.raises(DataError, match="no download URL configured"):
        fetch_cifar("cifar10", tmp_path, source="url")


# --------------------------------------------------------------------------- download over HTTP


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_dir(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_from_url_mirror(tmp_path, monkeypatch, http_dir, name):
    www, base = http_dir
    a = make_archive(www / "kriz", name)
    patch_table(monkeypatch, a)
    monkeypatch.setitem(cifar.CIFAR_MIRRORS, name, [base + "/missing", base + "/kriz/"])
    data = cifar.load_cifar_splits(name, tmp_path / "cache", progress=True)
    assert (tmp_path / "cache" / name / a.path.name).read_bytes() == a.bytes
    n_train = 5 * len(cifar.CIFAR[name].splits["train"])  # 5 images per generated batch
    assert data["train"][0].shape == (n_train, 3, 32, 32) and data["test"][0].shape == (6, 3, 32, 32)


def test_download_via_env_mirror_and_explicit_url(tmp_path, monkeypatch, http_dir, c10):
    www, base = http_dir
    (www / c10.path.name).write_bytes(c10.bytes)
    monkeypatch.setenv("BPFREE_MIRROR_CIFAR10", f"{base}/nothing-here {base}")
    assert fetch_cifar("cifar10", tmp_path / "c1", progress=False).read_bytes() == c10.bytes
    monkeypatch.delenv("BPFREE_MIRROR_CIFAR10")
    assert fetch_cifar("cifar10", tmp_path / "c2", source=base, progress=False).read_bytes() == c10.bytes


def test_download_of_a_wrong_file_fails_naming_every_source(tmp_path, monkeypatch, http_dir, c10):
    www, base = http_dir
    (www / c10.path.name).write_bytes(c10.bytes[:-10])
    monkeypatch.setitem(cifar.CIFAR_MIRRORS, "cifar10", [base])
    with pytest.raises(DataError) as err:
        fetch_cifar("cifar10", tmp_path / "cache", progress=False)
    text = str(err.value)
    assert f"URL {base}/" in text and "sha256" in text
    assert not list((tmp_path / "cache" / "cifar10").glob("*.part"))


# --------------------------------------------------------------------------- augmentation


def test_crop_flip_matches_per_image_slicing():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    top = torch.tensor([0, 4, 2, 1, 3, 4])
    left = torch.tensor([0, 4, 1, 3, 2, 0])
    flip = torch.tensor([False, False, True, True, False, True])
    out = crop_flip(x, top, left, flip, padding=2)
    assert out.dtype == torch.uint8 and out.shape == x.shape
    for b in range(6):
        ref = F.pad(x[b], (2, 2, 2, 2))[:, top[b]:top[b] + 8, left[b]:left[b] + 8]
        if flip[b]:
            ref = ref.flip(-1)
        assert torch.equal(out[b], ref), b
    # the centred, unflipped crop is the image itself; a corner crop shows the zero border
    centre = crop_flip(x, torch.full((6,), 2), torch.full((6,), 2), torch.zeros(6, dtype=torch.bool), padding=2)
    assert torch.equal(centre, x)
    assert (out[0, :, :2, :] == 0).all() and (out[0, :, :, :2] == 0).all()
    assert (out[1, :, -2:, :] == 0).all() and (out[1, :, :, -2:] == 0).all()


def test_crop_flip_of_a_known_image():
    img = torch.arange(16, dtype=torch.float32).view(1, 1, 4, 4)
    # shift down-right by one pixel (top=left=0 with padding 1) and mirror
    out = crop_flip(img, torch.tensor([0]), torch.tensor([0]), torch.tensor([True]), padding=1)
    expected = torch.tensor([[0, 0, 0, 0], [2, 1, 0, 0], [6, 5, 4, 0], [10, 9, 8, 0]], dtype=torch.float32)
    assert torch.equal(out[0, 0], expected)


def test_augment_draws_cover_the_range_and_are_reproducible():
    aug = Augment(padding=4, flip=True)
    top, left, flip = aug.draw(4000, batch_generator(0, 0, 0))
    assert int(top.min()) == 0 and int(top.max()) == 8 and int(left.min()) == 0 and int(left.max()) == 8
    assert 0.45 < flip.float().mean() < 0.55
    again = aug.draw(4000, batch_generator(0, 0, 0))
    assert all(torch.equal(a, b) for a, b in zip((top, left, flip), again))
    other = aug.draw(4000, batch_generator(0, 0, 1))
    assert not torch.equal(top, other[0])
    assert not Augment(0, False).draw(5, batch_generator(0, 0, 0))[2].any()


def _cifar_task(c10_path, **options):
    return tasks.load("cifar10", {"source": str(c10_path), **options})


def test_cifar_task_shapes_and_normalisation(c10):
    task = _cifar_task(c10.path, augment=False)
    assert task.input_shape == (3, 32, 32) and task.num_classes == 10
    assert task.train_x.dtype == torch.uint8  # kept raw in memory
    x, y = task.train_batch(seed=0, epoch=0, index=0, batch_size=8)
    assert x.dtype == torch.float32 and x.shape == (8, 3, 32, 32)
    idx = task.order(0, 0)[:8]
    raw = torch.from_numpy(c10.images(*[f"data_batch_{i}" for i in range(1, 6)]))[idx].double() / 255
    mean = torch.tensor(cifar.CIFAR["cifar10"].mean, dtype=torch.float64).view(3, 1, 1)
    std = torch.tensor(cifar.CIFAR["cifar10"].std, dtype=torch.float64).view(3, 1, 1)
    torch.testing.assert_close(x.double(), (raw - mean) / std, rtol=0, atol=1e-5)
    assert torch.equal(y, torch.from_numpy(c10.labels(*[f"data_batch_{i}" for i in range(1, 6)]))[idx])
    px, _ = task.probe_batch(3)
    assert px.dtype == torch.float32 and px.shape == (3, 3, 32, 32)


def test_cifar_training_batches_are_a_pure_function_of_seed_epoch_index(c10):
    task = _cifar_task(c10.path)
    a = task.train_batch(5, 2, 1, 8)
    task.train_batch(5, 3, 0, 8)  # something else in between
    b = _cifar_task(c10.path).train_batch(5, 2, 1, 8)  # a fresh task, as after a resume
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = task.train_batch(5, 2, 2, 8)
    assert not torch.equal(a[0][: len(c[0])], c[0][: len(a[0])])


def test_every_augmented_image_is_a_crop_or_mirrored_crop_of_its_source(c10):
    task = _cifar_task(c10.path, normalize=False)
    images = torch.from_numpy(c10.images(*[f"data_batch_{i}" for i in range(1, 6)]))
    flips = 0
    for index in range(3):
        x, _ = task.train_batch(1, 0, index, 8)
        idx = task.order(1, 0)[index * 8:(index + 1) * 8]
        for k, i in enumerate(idx.tolist()):
            padded = F.pad(images[i], (4, 4, 4, 4)).float() / 255
            crops = [(t, l, f) for t in range(9) for l in range(9) for f in (False, True)
                     if torch.equal(x[k], (padded[:, t:t + 32, l:l + 32].flip(-1) if f else padded[:, t:t + 32, l:l + 32]))]
            assert crops, f"batch {index} image {k} is no crop of its source"
            flips += any(f for *_, f in crops) and not any(not f for *_, f in crops)
    assert 0 < flips < 24


def test_evaluation_is_never_augmented(c10):
    task = _cifar_task(c10.path)

    class Spy(torch.nn.Module):
        def forward(self, x):
            self.seen = x
            return torch.zeros(len(x), 10)

    spy = Spy()
    task.evaluate(spy, "test", 100)
    assert torch.equal(spy.seen, task.prepare(task.test_x))


def test_cifar100_task_options(c100):
    fine = tasks.load("cifar100", {"source": str(c100.path)})
    assert fine.num_classes == 100
    coarse = tasks.load("cifar100", {"source": str(c100.path), "labels": "coarse"}, limit_train=3, limit_test=2)
    assert coarse.num_classes == 20 and len(coarse.train_x) == 3 and len(coarse.test_x) == 2
    with pytest.raises(OptionError, match="unknown option.*labels"):
        tasks.load("cifar10", {"labels": "coarse"})


# --------------------------------------------------------------------------- MNIST pad option


def test_pad_option_gives_32x32_mnist(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, 6, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    src = tmp_path / "mnist-files"
    src.mkdir()
    table = {}
    for name, arr in arrays.items():
        write_idx(arr, src / name)
        table[name] = _sha((src / name).read_bytes())
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], files=table))
    monkeypatch.setitem(vision.MIRRORS, "mnist", [])
    monkeypatch.setattr(vision._src, "NPM", "bpfree-test-no-such-npm")
    cache = tmp_path / "cache"
    vision.fetch("mnist", cache, source=str(src), progress=False)
    plain = tasks.load("mnist", {}, data_dir=cache)
    padded = tasks.load("mnist", {"pad": 2}, data_dir=cache)
    assert plain.input_shape == (1, 28, 28) and padded.input_shape == (1, 32, 32)
    assert padded.train_x.shape == (6, 1, 32, 32) and padded.test_x.shape == (4, 1, 32, 32)
    assert torch.equal(padded.train_x[:, :, 2:30, 2:30], plain.train_x)
    info = DATASETS["mnist"]
    border = (0.0 - info.mean) / info.std  # a raw 0 pixel, standardised
    ring = padded.train_x.clone()
    ring[:, :, 2:30, 2:30] = border
    torch.testing.assert_close(ring, torch.full_like(ring, border))
    raw = tasks.load("mnist", {"pad": 2, "normalize": False}, data_dir=cache)
    assert float(raw.train_x[:, :, :2].abs().max()) == 0.0
    with pytest.raises(OptionError, match="pad"):
        tasks.load("mnist", {"pad": -1}, data_dir=cache)
