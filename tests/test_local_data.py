"""Datasets from local files (bpfree.data.local, bpfree.tasks.local): npz:PATH, images:FOLDER, text:FILE.

Every file is generated here. Expected values are computed in the test from the arrays, pixels and
texts written: standardisation with numpy's float64 mean and std, the seeded split redrawn with
torch.randperm, tokens and vocabularies by the stated rule. Broken files must give one-line errors
naming the file, and leave nothing half-written in the cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _cli import assert_one_line_error, run_cli
from bpfree import tasks
from bpfree.data import local
from bpfree.options import OptionError
from bpfree.train.config import resolve


def load(name, data_dir, limit_train=0, limit_test=0, **options):
    cfg = resolve({"run": {"dataset": name}}, [f"data.{k}={v}" for k, v in options.items()])
    return tasks.load(name, cfg.data, data_dir, limit_train, limit_test)


def cache_files(data_dir: Path) -> list[str]:
    folder = Path(data_dir) / "local"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- npz


def test_npz_features_are_standardised_with_the_training_mean_and_std(tmp_path):
    rng = np.random.default_rng(0)
    xtr, xte = rng.normal(3, 2, (40, 5)), rng.normal(3, 2, (10, 5))
    xtr[:, 4] = 7.0  # a constant feature: std 0 is read as 1
    ytr, yte = rng.integers(0, 3, 40), rng.integers(0, 4, 10)
    path = tmp_path / "f.npz"
    np.savez(path, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    task = load(f"npz:{path}", tmp_path / "cache")
    mean, std = xtr.mean(0), xtr.std(0)
    std[4] = 1.0
    assert task.input_shape == (5,) and task.num_classes == max(ytr.max(), yte.max()) + 1
    torch.testing.assert_close(task.train_x, torch.tensor((xtr - mean) / std, dtype=torch.float32))
    torch.testing.assert_close(task.test_x, torch.tensor((xte - mean) / std, dtype=torch.float32))
    assert task.train_y.tolist() == ytr.tolist() and task.test_y.tolist() == yte.tolist()
    raw = load(f"npz:{path}", tmp_path / "cache", normalize="false")
    torch.testing.assert_close(raw.train_x, torch.tensor(xtr, dtype=torch.float32))
    assert load(f"npz:{path}", tmp_path / "cache", classes=9).num_classes == 9


def test_npz_uint8_images_are_pixels_standardised_per_channel(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 3, 4, 5), dtype=np.uint8)
    y = np.arange(30) % 2
    path = tmp_path / "img.npz"
    np.savez(path, x_train=x[:20], y_train=y[:20], x_test=x[20:], y_test=y[20:])
    task = load(f"npz:{path}", tmp_path / "cache", limit_train=8)
    assert task.input_shape == (3, 4, 5) and task.train_x.dtype == torch.uint8 and len(task.train_x) == 8
    p = x[:20] / 255.0
    mean, std = p.mean(axis=(0, 2, 3)), p.std(axis=(0, 2, 3))  # the whole training split, before the limit
    want = (x[:8] / 255.0 - mean[:, None, None]) / std[:, None, None]
    torch.testing.assert_close(task.prepare(task.train_x), torch.tensor(want, dtype=torch.float32))


def test_npz_grey_images_gain_a_channel(tmp_path):
    x = np.arange(6 * 4 * 4, dtype=np.float32).reshape(6, 4, 4)
    path = tmp_path / "g.npz"
    np.savez(path, x_train=x[:4], y_train=np.array([0, 1, 0, 1]), x_test=x[4:], y_test=np.array([1, 0]))
    task = load(f"npz:{path}", tmp_path / "cache", normalize="false")
    assert task.input_shape == (1, 4, 4)
    torch.testing.assert_close(task.train_x, torch.tensor(x[:4, None]))


def test_npz_x_y_are_split_by_a_seeded_fraction(tmp_path):
    x = np.arange(50, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(50) % 5
    path = tmp_path / "xy.npz"
    np.savez(path, x=x, y=y)
    task = load(f"npz:{path}", tmp_path / "cache", test_fraction=0.3, split_seed=7, normalize="false")
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(7))
    test = perm[:15].tolist()  # round(0.3 * 50) = 15 drawn for test, in the permutation's order
    train = perm[15:].tolist()
    assert task.test_x[:, 0].long().tolist() == test and task.train_x[:, 0].long().tolist() == train
    assert task.train_y.tolist() == [i % 5 for i in train]


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return f"npz:{path}"


def _ok(n=8, f=3):
    return {"x_train": np.zeros((n, f), np.float32), "y_train": np.arange(n) % 2,
            "x_test": np.zeros((4, f), np.float32), "y_test": np.arange(4) % 2}


NPZ_BROKEN = {
    "missing array": (lambda: {k: v for k, v in _ok().items() if k != "y_test"}, ["missing array 'y_test'"]),
    "labels not integers": (lambda: {**_ok(), "y_train": np.full(8, 0.5)}, ["'y_train'", "must be integers"]),
    "labels 2-d": (lambda: {**_ok(), "y_train": np.zeros((8, 2), np.int64)}, ["'y_train'", "one integer label"]),
    "labels of another length": (lambda: {**_ok(), "y_test": np.arange(5) % 2}, ["'y_test'", "expected (4,)"]),
    "negative labels": (lambda: {**_ok(), "y_train": -np.ones(8, np.int64)}, ["negative label"]),
    "text inputs": (lambda: {**_ok(), "x_train": np.array(["a"] * 8)}, ["'x_train'", "real numbers"]),
    "1-d inputs": (lambda: {**_ok(), "x_train": np.zeros(8, np.float32)}, ["'x_train'", "(N, F)"]),
    "5-d inputs": (lambda: {**_ok(), "x_train": np.zeros((8, 1, 1, 1, 1))}, ["'x_train'", "shape"]),
    "nan inputs": (lambda: {**_ok(), "x_test": np.full((4, 3), np.nan)}, ["'x_test'", "non-finite"]),
    "train and test shapes differ": (lambda: {**_ok(), "x_test": np.zeros((4, 2), np.float32)}, ["(3,)", "(2,)"]),
    "x and y without test_fraction": (lambda: {"x": np.zeros((8, 3)), "y": np.arange(8) % 2}, ["test_fraction"]),
    "x without y": (lambda: {"x": np.zeros((8, 3))}, ["missing array 'y'"]),
    "no known array": (lambda: {"features": np.zeros((8, 3))}, ["missing arrays", "features"]),
    "one class": (lambda: {**_ok(), "y_train": np.zeros(8, np.int64), "y_test": np.zeros(4, np.int64)},
                  ["two classes"]),
    "empty training split": (lambda: {**_ok(), "x_train": np.zeros((0, 3)), "y_train": np.zeros(0, np.int64)},
                             ["training split is empty"]),
}


@pytest.mark.parametrize("case", list(NPZ_BROKEN))
def test_broken_npz_files_get_one_line_errors_naming_the_file(tmp_path, case):
    make, words = NPZ_BROKEN[case]
    name = _npz(tmp_path / "bad.npz", **make())
    rc, _, err = run_cli("train", "--dataset", name, "--model", "mlp", "--set", "widths=4", "--no-progress",
                         "--data-dir", tmp_path / "cache", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, str(tmp_path / "bad.npz"), *words)


@pytest.mark.parametrize("content,words", [
    (b"not a zip at all", ["is not a NumPy .npz archive"]),
    (None, ["object arrays"]),
    ("missing", ["does not exist"]),
    ("folder", ["is a folder"]),
])
def test_unreadable_npz_files_get_one_line_errors(tmp_path, content, words):
    path = tmp_path / "bad.npz"
    if content is None:
        np.savez(path, x_train=np.array([np.zeros(2), np.zeros(3)], dtype=object), y_train=np.zeros(2, np.int64))
    elif content == "folder":
        path.mkdir()
    elif content != "missing":
        path.write_bytes(content)
    rc, _, err = run_cli("train", "--dataset", f"npz:{path}", "--no-progress", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, str(path), *words)
    assert not (tmp_path / "run").exists()


def test_a_run_resumed_on_changed_data_is_refused(tmp_path):
    name = _npz(tmp_path / "d.npz", **_ok(16))
    out = tmp_path / "run"
    common = ["--model", "mlp", "--set", "widths=4", "--batch-size", "8", "--no-progress"]
    rc, _, err = run_cli("train", "--dataset", name, *common, "--out", out)
    assert rc == 0, err
    digest = hashlib.sha256((tmp_path / "d.npz").read_bytes()).hexdigest()
    assert f'sha256 = "{digest}"' in (out / "config.toml").read_text()
    _npz(tmp_path / "d.npz", **{**_ok(16), "y_train": np.arange(16) % 3})
    rc, _, err = run_cli("train", "--resume", out, "--no-progress")
    assert_one_line_error(rc, err, "changed since this configuration was made", digest)


# --------------------------------------------------------------------------- image folders


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=4, shape=(6, 5), mode="L", seed=0):
    """``per_class`` PNGs per class; returns {relative path: pixels} in the loader's order (class, file name)."""
    rng = np.random.default_rng(seed)
    written = {}
    for c in classes:
        for i in range(per_class):
            px = rng.integers(0, 256, shape + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
            _png(root / c / f"{i:02d}.png", px)
            written[f"{c}/{i:02d}.png"] = px
    return written


def test_image_folder_pixels_labels_and_seeded_split(tmp_path):
    written = image_folder(tmp_path / "imgs")
    task = load(f"images:{tmp_path / 'imgs'}", tmp_path / "cache", normalize="false", test_fraction=0.25, split_seed=3)
    pixels = np.stack(list(written.values()))[:, None]  # grey: one channel, files in class then name order
    labels = [("cat", "dog", "eel").index(k.split("/")[0]) for k in written]
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(3))
    test, train = perm[:3].tolist(), perm[3:].tolist()
    assert task.input_shape == (1, 6, 5) and task.num_classes == 3
    assert torch.equal(task.train_x, torch.tensor(pixels[train])) and torch.equal(task.test_x, torch.tensor(pixels[test]))
    assert task.train_y.tolist() == [labels[i] for i in train] and task.test_y.tolist() == [labels[i] for i in test]
    std = load(f"images:{tmp_path / 'imgs'}", tmp_path / "cache", test_fraction=0.25, split_seed=3)
    p = pixels[train] / 255.0
    torch.testing.assert_close(std.prepare(std.train_x),
                               torch.tensor((p - p.mean()) / p.std(), dtype=torch.float32))


def test_image_folder_train_and_test_folders_rgb_and_resize(tmp_path):
    root = tmp_path / "imgs"
    train = image_folder(root / "train", classes=("a", "b"), per_class=3, mode="RGB", shape=(8, 6))
    test = image_folder(root / "test", classes=("b",), per_class=2, mode="RGB", shape=(8, 6), seed=1)
    task = load(f"images:{root}", tmp_path / "cache", normalize="false", size="4,3", split_seed=5)
    resized = lambda px: np.asarray(Image.fromarray(px).resize((3, 4), Image.Resampling.BILINEAR)).transpose(2, 0, 1)
    order = lambda n: torch.randperm(n, generator=torch.Generator().manual_seed(5)).tolist()  # each split's order
    train_px, test_px = [resized(p) for p in train.values()], [resized(p) for p in test.values()]
    assert task.input_shape == (3, 4, 3) and task.num_classes == 2
    assert torch.equal(task.train_x, torch.tensor(np.stack([train_px[i] for i in order(6)])))
    assert torch.equal(task.test_x, torch.tensor(np.stack([test_px[i] for i in order(2)])))
    assert task.train_y.tolist() == [[0, 0, 0, 1, 1, 1][i] for i in order(6)] and task.test_y.tolist() == [1, 1]


def test_image_folder_colour_is_rgb_as_soon_as_one_image_is(tmp_path):
    root = tmp_path / "imgs"
    image_folder(root, classes=("a", "b"), per_class=2)
    rgb = np.zeros((6, 5, 3), np.uint8)
    rgb[..., 0] = 200  # pure red: grey would be 0.299 * 200
    _png(root / "b" / "red.png", rgb)
    task = load(f"images:{root}", tmp_path / "cache", normalize="false", test_fraction=0.2)
    assert task.input_shape == (3, 6, 5)
    grey = load(f"images:{root}", tmp_path / "cache", normalize="false", color="grey", test_fraction=0.2)
    assert grey.input_shape == (1, 6, 5)


def test_decoded_images_are_cached_atomically_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    image_folder(root, classes=("a", "b"), per_class=2)
    first = load(f"images:{root}", cache)
    assert len(cache_files(cache)) == 1 and cache_files(cache)[0].startswith("images-")
    monkeypatch.setattr(local, "_decode", lambda *a: pytest.fail("decoded again despite the cache"))
    assert torch.equal(load(f"images:{root}", cache).train_x, first.train_x)
    monkeypatch.undo()
    _png(root / "a" / "00.png", np.zeros((6, 5), np.uint8))
    load(f"images:{root}", cache)
    assert len(cache_files(cache)) == 2  # another digest, another cache file

    def full_disk(blob, f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local.torch, "save", full_disk)
    _png(root / "a" / "01.png", np.zeros((6, 5), np.uint8))
    assert load(f"images:{root}", cache).num_classes == 2  # loads; the cache file is not written
    assert len(cache_files(cache)) == 2  # and no partial or temporary file is left


IMAGE_BROKEN = {
    "ragged images": (lambda r: _png(r / "a" / "big.png", np.zeros((9, 9), np.uint8)), ["ragged images", "size="]),
    "truncated PNG": (lambda r: (r / "a" / "00.png").write_bytes((r / "a" / "00.png").read_bytes()[:60]),
                      ["00.png"]),
    "not an image": (lambda r: (r / "b" / "junk.png").write_bytes(b"\x89PNG but not really"), ["junk.png"]),
    "empty class folder": (lambda r: (r / "c").mkdir(), ["holds no PNG or JPEG file"]),
    "one class": (lambda r: [p.unlink() for p in (r / "b").iterdir()] and (r / "b").rmdir(), ["at least two"]),
}


@pytest.mark.parametrize("case", list(IMAGE_BROKEN))
def test_broken_image_folders_get_one_line_errors_and_leave_no_cache(tmp_path, case):
    root, cache = tmp_path / "imgs", tmp_path / "cache"
    image_folder(root, classes=("a", "b"), per_class=2)
    damage, words = IMAGE_BROKEN[case]
    damage(root)
    rc, _, err = run_cli("train", "--dataset", f"images:{root}", "--no-progress", "--data-dir", cache,
                         "--out", tmp_path / "run")
    assert_one_line_error(rc, err, str(root), *words)
    assert cache_files(cache) == []


def test_image_folder_errors_for_paths(tmp_path):
    (tmp_path / "file.png").write_bytes(b"x")
    root = tmp_path / "split"
    image_folder(root / "train", classes=("a", "b"), per_class=1)
    image_folder(root / "test", classes=("z",), per_class=1)
    for name, words in [(tmp_path / "nowhere", ["does not exist"]), (tmp_path / "file.png", ["is not a folder"]),
                        (root, ["is not a class of", "a, b"])]:
        with pytest.raises(OptionError) as info:
            resolve({"run": {"dataset": f"images:{name}"}})
        assert all(w in str(info.value) for w in words), str(info.value)


# --------------------------------------------------------------------------- text corpora


def words_then_eos(text: str) -> list[str]:
    return [t for line in text.splitlines() for t in line.split() + ["<eos>"]]


def test_text_folder_word_level_vocabulary_and_unknown_words(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    texts = {"train": "the cat sat\nthe dog\n\nsat cat cat\n", "valid": "the bird sat\n", "test": "dog dog\n"}
    for s, t in texts.items():
        (root / f"{s}.txt").write_text(t)
    task = load(f"text:{root}", tmp_path / "cache", context=3)
    vocab = ["<unk>", "the", "cat", "sat", "<eos>", "dog"]  # <unk>, then first occurrences in train
    assert task.vocab == vocab and task.num_classes == 6
    for s, t in texts.items():
        assert task.streams[s].tolist() == [vocab.index(w) if w in vocab else 0 for w in words_then_eos(t)]
    rare = load(f"text:{root}", tmp_path / "cache", context=3, min_count=2)
    assert rare.vocab == ["<unk>", "the", "cat", "sat", "<eos>"]  # dog appears once in train


def test_text_file_is_cut_90_5_5_at_whitespace_and_char_level_keeps_every_character(tmp_path):
    rng = np.random.default_rng(0)
    text = "\n".join(" ".join(rng.choice(["ab", "cde", "f", "ghij"], 7)) for _ in range(40)) + "\n"
    path = tmp_path / "c.txt"
    path.write_text(text)
    n = len(text)

    def cut(frac):  # the first whitespace at or after round(frac * n)
        c = round(frac * n)
        while c < n and not text[c].isspace():
            c += 1
        return c

    a, b = cut(0.9), cut(0.95)
    parts = {"train": text[:a], "valid": text[a:b], "test": text[b:]}
    task = load(f"text:{path}", tmp_path / "cache", context=4)
    for s, part in parts.items():
        assert [task.vocab[i] for i in task.streams[s].tolist()] == words_then_eos(part), s
    chars = load(f"text:{path}", tmp_path / "cache", context=4, level="char")
    a, b = round(0.9 * n), round(0.95 * n)
    assert "".join(chars.vocab[i] for i in chars.streams["train"].tolist()) == text[:a]
    assert "".join(chars.vocab[i] for i in chars.streams["test"].tolist()) == text[b:]
    assert chars.vocab[0] == "<unk>" and set(chars.vocab[1:]) == set(text[:a])


TEXT_BROKEN = {
    "empty file": (b"", ["empty corpus"]),
    "only whitespace": (b" \n\n \t\n", ["empty corpus", "no word"]),
    "undecodable bytes": (b"fine words\nthen \xff\xfe broken\n", ["not UTF-8", "0xff", "offset 16", "line 2"]),
    "too short to split": (b"one two three\n", ["too short", "valid part"]),
}


@pytest.mark.parametrize("case", list(TEXT_BROKEN))
def test_broken_text_files_get_one_line_errors_and_leave_no_cache(tmp_path, case):
    content, words = TEXT_BROKEN[case]
    path, cache = tmp_path / "c.txt", tmp_path / "cache"
    path.write_bytes(content)
    rc, _, err = run_cli("train", "--dataset", f"text:{path}", "--model", "transformer", "--no-progress",
                         "--data-dir", cache, "--out", tmp_path / "run")
    assert_one_line_error(rc, err, str(path), *words)
    assert cache_files(cache) == []


def test_text_folder_without_its_three_files_is_refused(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.txt").write_text("a b\n")
    with pytest.raises(OptionError, match="lacks valid.txt, test.txt"):
        resolve({"run": {"dataset": f"text:{tmp_path / 'c'}"}})


def test_digest_of_a_folder_is_the_sha256_of_its_manifest(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for s in ("train", "valid", "test"):
        (root / f"{s}.txt").write_text(f"{s} words\n")
    manifest = "".join(f"{hashlib.sha256((root / f'{s}.txt').read_bytes()).hexdigest()}  {s}.txt\n"
                       for s in sorted(("train", "valid", "test")))
    assert local.dataset_digest("text", root) == hashlib.sha256(manifest.encode()).hexdigest()
    cfg = resolve({"run": {"dataset": f"text:{root}"}})
    assert cfg.data["sha256"] == hashlib.sha256(manifest.encode()).hexdigest()


def test_unknown_prefix_and_empty_path(tmp_path):
    with pytest.raises(ValueError, match="npz:PATH, images:FOLDER, text:FILE"):
        tasks.get("csv:x.csv")
    with pytest.raises(OptionError, match="names no file"):
        tasks.get("images:")


# --------------------------------------------------------------------------- bpfree compare end to end


def test_compare_bp_dfa_grape_on_a_generated_text_and_image_folder(tmp_path):
    import runpy

    repo = Path(__file__).resolve().parents[1]
    runpy.run_path(str(repo / "experiments" / "examples" / "make_shapes.py"))["write"](tmp_path / "shapes", 8, 3, 0)
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sees", "a", "dog", "today", "."]
    (tmp_path / "corpus.txt").write_text("\n".join(" ".join(rng.choice(words, 6)) for _ in range(200)) + "\n")
    runs = {
        "text": ["--dataset", f"text:{tmp_path / 'corpus.txt'}", "--model", "transformer", "--set", "context=8",
                 "--set", "d_model=16", "--set", "heads=2", "--set", "depth=1", "--limit-train", "48"],
        "images": ["--dataset", f"images:{tmp_path / 'shapes'}", "--model", "cnn", "--set", "channels=4,8",
                   "--set", "hidden=16", "--limit-train", "16"],
    }
    for kind, args in runs.items():
        out = tmp_path / f"cmp-{kind}"
        rc, text, err = run_cli("compare", "--methods", "bp,dfa,grape", *args, "--epochs", "1", "--batch-size", "8",
                                "--no-progress", "--data-dir", tmp_path / "cache", "--out", out)
        assert rc == 0, err
        table = (out / "compare.md").read_text()
        assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == \
               ["bp", "dfa", "grape"]
        assert ("test ppl" if kind == "text" else "test accuracy") in table and table in text
