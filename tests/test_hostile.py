"""Hostile inputs: every one gets a clear error, none a bare traceback from deep inside torch, and
nothing on disk is lost.

"Clear" means: ``method.step`` raises ``ValueError`` or ``TypeError`` (``OptionError`` is a
``ValueError``) whose message names the problem; configuration raises ``OptionError``/``ValueError``;
the CLI exits with code 2 and one line ``bpfree: error: ...`` on stderr. Input classes:

* ``method.step`` (every registered method that builds on an MLP): wrong feature count, 1-d and
  0-d ``x``, integer/bool/float64/float16/complex ``x``, ``x`` on another device, lists instead of
  tensors, empty batches, ``y`` of another length, 0-d ``y``, float ``y``, 2-d ``y``, labels out
  of range and negative; then random shapes and dtypes (hypothesis). NaN in ``x`` is a valid
  batch whose loss is NaN: the step returns it and the loop stops (tests below and in
  ``test_resilience.py``).
* configuration: random ``KEY=VALUE`` strings, valid keys with junk values, TOML tables and
  other non-scalar values, non-finite numbers (hypothesis); resolved-but-odd values through a
  real run.
* CLI: random ``--set`` strings, bad flag values, bad ``--resume`` input (extra options, bad
  device, corrupt ``config.toml``, a changed configuration, a truncated checkpoint, a plain file)
  and a fresh ``train`` into an existing run: each fails and leaves the run directory as it was.
* own data and models: random, truncated and oddly shaped ``npz:``, ``images:`` and ``text:`` files
  (hypothesis) train or fail with one line and leave the cache without partial files; junk
  dataset and model names; odd values of the new options (``size``, ``color``, ``test_fraction``,
  ``level``, ``log``, a factory's options, a wrong ``sha256``).
"""

from __future__ import annotations

import itertools
import json
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import conftest  # noqa: F401  (registers blobs-test)
from _cli import assert_one_line_error, run_cli
from bpfree import methods, models
from bpfree.train.config import resolve, section_classes
from bpfree.train.loop import TrainingError, train

HYPO = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLEAR = (ValueError, TypeError)
WORDS = ("shape", "dtype", "sample", "batch", "target", "label", "tensor", "input", "class", "0-d",
         "complex", "device", "empty", "loss", "dimension")



def buildable_methods() -> list[str]:
    """Every registered library method that trains an MLP (others need special models: skipped;
    ``test-*`` methods other test modules register are not library methods)."""
    names = []
    for name in methods.available():
        if name.startswith("test-"):
            continue
        try:
            methods.create(name, models.create("mlp", (16,), 4, widths=[8, 8]))
        except (ValueError, TypeError):
            continue
        names.append(name)
    return names


METHODS = buildable_methods()


def fresh(name: str):
    torch.manual_seed(0)
    return methods.create(name, models.create("mlp", (16,), 4, widths=[8, 8]))


def good_x(n=8):
    return torch.randn(n, 16)


def good_y(n=8):
    return torch.randint(0, 4, (n,))


CASES = {  # input class -> (x, y, words one of which the message must contain)
    "x with 17 features for 16": (torch.randn(8, 17), good_y(), "shape"),
    "x 1-d": (torch.randn(16), good_y(16), "shape"),
    "x 0-d": (torch.tensor(1.0), good_y(1), "0-d"),
    "x int64": (torch.randint(0, 3, (8, 16)), good_y(), ("dtype", "floating")),
    "x bool": (torch.ones(8, 16, dtype=torch.bool), good_y(), ("dtype", "floating")),
    "x float64": (torch.randn(8, 16, dtype=torch.float64), good_y(), "dtype"),
    "x float16": (torch.randn(8, 16).half(), good_y(), "dtype"),
    "x complex": (torch.randn(8, 16, dtype=torch.complex64), good_y(), "complex"),
    "x on the meta device": (torch.empty(8, 16, device="meta"), good_y(), "device"),
    "x a list": ([[0.0] * 16] * 8, good_y(), "tensors"),
    "empty batch": (torch.randn(0, 16), good_y(0), "empty"),
    "y of another length": (good_x(), good_y(7), "samples"),
    "y 0-d": (good_x(), torch.tensor(1), "0-d"),
    "y float": (good_x(), torch.randn(8), ("target", "label")),
    "y 2-d labels": (good_x(), torch.randint(0, 4, (8, 2)), ("target", "label")),
    "labels out of range": (good_x(), torch.full((8,), 7), "[0, 4)"),
    "negative labels": (good_x(), torch.full((8,), -1), "[0, 4)"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name", METHODS)
def test_bad_batches_get_clear_errors(name, case):
    x, y, words = CASES[case]
    method = fresh(name)
    with pytest.raises(CLEAR) as info:
        method.step(x, y, F.cross_entropy)
    msg = str(info.value)
    words = (words,) if isinstance(words, str) else words
    assert any(w in msg for w in words), f"{name}, {case}: {type(info.value).__name__}: {msg}"
    assert "\n" not in msg.strip()


@pytest.mark.parametrize("name", METHODS)
def test_nan_input_gives_a_nan_loss_not_a_crash(name):
    x = good_x()
    x[3] = float("nan")
    result = fresh(name).step(x, good_y(), F.cross_entropy)
    assert torch.isnan(result.loss)


def _tensor(shape, dtype, values):
    if dtype.is_complex:
        return torch.zeros(shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.zeros(shape, dtype=dtype)
    t = torch.full(shape, float(values) if dtype.is_floating_point else int(values), dtype=torch.float64)
    return t.to(dtype)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
          torch.bool, torch.complex64]


@HYPO
@given(name=st.sampled_from(METHODS),
       xshape=st.lists(st.integers(0, 17), min_size=0, max_size=4),
       xdtype=st.sampled_from(DTYPES),
       yshape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
       ydtype=st.sampled_from(DTYPES),
       value=st.sampled_from([0, 1, 3, 4, -1, 100, float("nan"), float("inf")]))
def test_random_shapes_and_dtypes_never_crash_deep_in_torch(name, xshape, xdtype, yshape, ydtype, value):
    x = _tensor(tuple(xshape), xdtype, 0.5 if xdtype.is_floating_point else 1)
    y = _tensor(tuple(yshape), ydtype, value if not (isinstance(value, float) and not ydtype.is_floating_point) else 0)
    try:
        result = fresh(name).step(x, y, F.cross_entropy)
    except CLEAR as err:
        msg = str(err)
        assert any(w in msg.lower() for w in WORDS), f"{type(err).__name__}: {msg}"
        return
    assert result.loss.dim() == 0  # accepted: a batch the model and loss could take


# --------------------------------------------------------------------------- configuration


def all_option_keys(method="grape") -> list[str]:
    import dataclasses

    classes = section_classes(resolve({"run": {"dataset": "blobs-test", "model": "mlp", "method": method}}).run)
    return sorted({f.name for c in classes.values() for f in dataclasses.fields(c)})


KEYS = all_option_keys()
JUNK = st.text(alphabet=string.ascii_letters + string.digits + "=.,-_+ :/\\\"'[]{}\t\x00éπ∞", max_size=24)
VALUES = st.one_of(JUNK, st.sampled_from(["", "nan", "inf", "-inf", "-1", "0", "1e999", "1e-999", "true", "none",
                                          "9" * 30, ",", ",,", "3,", "1.5", "0x10", "[1]"]))


@HYPO
@given(items=st.lists(st.one_of(JUNK, st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES),
                                st.builds(lambda s, k, v: f"{s}.{k}={v}", st.sampled_from(["run", "model", "method",
                                          "data", "grape", "dfa", "nope", ""]), st.sampled_from(KEYS), VALUES)),
                      min_size=1, max_size=3))
def test_junk_set_strings_get_option_errors(items):
    base = {"run": {"dataset": "blobs-test", "model": "mlp", "method": "grape"}}
    try:
        resolve(base, items)
    except ValueError as err:  # OptionError, or an unknown model/method/dataset
        assert str(err).strip()


@pytest.mark.parametrize("value", [{"a": 1}, [{"a": 1}], None, float("nan"), float("inf"), -1, 2**70, "x" * 1000,
                                   [], [1, [2]]])
@pytest.mark.parametrize("key", ["lr", "epochs", "widths", "rule", "seed", "momentum", "device", "amp"])
def test_toml_values_of_every_kind_get_option_errors_or_pass(key, value):
    section = {"widths": "model", "rule": "method"}.get(key, "run")
    base = {"run": {"dataset": "blobs-test", "model": "mlp", "method": "grape"}, "model": {}, "method": {}}
    base[section][key] = value
    try:
        cfg = resolve(base)
    except ValueError as err:
        assert key in str(err) or "section" in str(err), str(err)
        return
    if key in ("lr", "momentum"):
        assert value is None or cfg.run.lr > 0  # nan/inf/negative never get through


ODD = {
    "lr": ["nan", "inf", "-1", "0", "1e30"], "momentum": ["1", "-0.5", "nan"], "weight_decay": ["-1", "inf"],
    "seed": ["-1", str(2**64), "0"], "batch_size": ["0", "-3", "1", "100000"], "eval_batch_size": ["0", "1"],
    "log_every": ["0", "1"], "checkpoint_every": ["-1", "1"], "diagnostics_every": ["-1", "1"],
    "probe_size": ["0", "1", "100000"], "widths": ["0", "", ",", "3,0", "2"], "activation": ["nope", "relu"],
    "device": ["gpu", "cuda:7", "tpu", "cpu:0", ""], "amp": ["fp8", "bf16", "fp16"], "optimizer": ["lbfgs"],
    "samples": ["0", "1"], "eta": ["-1", "nan"], "rule": ["cosine", "x"], "noise": ["nan", "-1", "none"],
}


@pytest.mark.parametrize("key,value", [(k, v) for k, vs in ODD.items() for v in vs])
def test_odd_values_through_a_real_run(tmp_path, key, value):
    """Resolved or not, a run with the value either trains or stops with a clear error."""
    base = {"run": {"dataset": "blobs-test", "model": "mlp", "method": "grape", "epochs": 1, "batch_size": 32,
                    "limit_train": 64, "limit_test": 32}, "model": {"widths": [8]}}
    try:
        cfg = resolve(base, [f"{key}={value}"])
        train(cfg, tmp_path / "run", progress=False)
    except (ValueError, TypeError, TrainingError) as err:
        assert str(err).strip() and "Traceback" not in str(err)


# --------------------------------------------------------------------------- CLI


COMMON = ["--dataset", "blobs-test", "--limit-train", "64", "--limit-test", "32", "--epochs", "1",
          "--batch-size", "32", "--set", "widths=8", "--no-progress"]
counter = itertools.count()


@HYPO
@given(junk=st.one_of(JUNK, st.builds(lambda k, v: f"{k}={v}", st.sampled_from(KEYS), VALUES)))
def test_cli_junk_set_exits_2_with_one_line(tmp_path_factory, junk):
    out = tmp_path_factory.getbasetemp() / f"cli-junk-{next(counter)}"
    rc, _, err = run_cli("train", "--method", "dfa", *COMMON, f"--set={junk}", "--out", out)
    if rc != 0:
        assert_one_line_error(rc, err)


@pytest.mark.parametrize("argv,words", [
    (["train", "--epochs", "abc"], ["--epochs", "invalid int"]),
    (["train", "--method", "nope"], ["unknown method 'nope'"]),
    (["train", "--dataset", "nope"], ["unknown dataset 'nope'"]),
    (["train", "--set", "lr=nan"], ["'lr'"]),
    (["train", "--amp", "fp8"], ["--amp"]),
    (["train", "--nproc", "0"], ["--nproc"]),
    (["train", "--method", "dfa", "--batch-size", "33", "--nproc", "2"], ["divide evenly over the 2"]),
    (["train", "--config", "/nonexistent/x.toml"], ["config file not found"]),
    (["compare", "--methods", ","], ["--methods"]),
    (["compare", "--methods", "bp,bp"], ["twice"]),
    (["train", "--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], ["device"]),
    (["bogus"], ["invalid choice"]),
])
def test_cli_bad_flags_exit_2_with_one_line(tmp_path, argv, words):
    if argv != ["bogus"]:  # the flag under test comes last, after the common ones
        argv = [argv[0], "--out", tmp_path / "o", *COMMON, *argv[1:]]
    rc, _, err = run_cli(*argv)
    assert_one_line_error(rc, err, *words)


def test_cli_fp16_for_a_method_without_loss_scaling_is_refused(tmp_path):
    rc, _, err = run_cli("train", "--method", "test-hostile-no-scaling", "--amp", "fp16", "--out", tmp_path / "o",
                         *COMMON)
    assert_one_line_error(rc, err, "fp16", "supports_loss_scaling")


@methods.register
class _NoScaling(methods.Method):
    """BP under another name, without ``supports_loss_scaling``."""

    name = "test-hostile-no-scaling"

    def step(self, x, y, loss_fn):
        out = self.model(x)
        loss = loss_fn(out, y)
        loss.backward()
        return methods.StepResult(loss.detach(), out.detach())


def test_cli_nan_data_stops_the_run_with_one_line(tmp_path):
    rc, _, err = run_cli("train", "--method", "bp", "--out", tmp_path / "o", *COMMON, "--set", "noise=nan")
    assert_one_line_error(rc, err, "the loss became nan at step 1")


# --------------------------------------------------------------------------- nothing lost


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert run_cli("train", "--method", "grape", "--out", out, *COMMON)[0] == 0
    return out


def snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("argv,words", [
    (["--set", "lr=junk"], ["drop --set"]),
    (["--epochs", "5"], ["drop --epochs"]),
    (["--method", "dfa"], ["drop --method"]),
    (["--device", "bogus"], ["unknown device 'bogus'"]),
    (["--device", "cuda" if not torch.cuda.is_available() else "tpu"], ["device"]),
])
def test_failed_resume_with_bad_input_loses_nothing(run_dir, argv, words):
    before = snapshot(run_dir)
    rc, _, err = run_cli("train", "--resume", run_dir, "--no-progress", *argv)
    assert_one_line_error(rc, err, *words)
    assert snapshot(run_dir) == before


class _Marker:
    """A pickle whose loading would create a marker file: what a hostile checkpoint would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _write_with_hash(obj, path):
    """``torch.save(obj)`` at ``path`` with a matching ``.sha256``: a file whose hash cannot give it away."""
    import hashlib

    torch.save(obj, path)
    (path.parent / (path.name + ".sha256")).write_text(hashlib.sha256(path.read_bytes()).hexdigest() + "\n")


@pytest.mark.parametrize("damage,words", [
    ("config-junk", ["not valid TOML"]),
    ("config-changed", ["different configuration", "run.lr"]),
    ("config-unknown-key", ["unknown option"]),
    ("checkpoint-truncated", ["damaged", "sha256"]),
    ("checkpoint-garbage", ["damaged", "sha256"]),
    ("checkpoint-hash-wrong", ["damaged", "sha256"]),
    ("checkpoint-foreign", ["not written by bpfree", "--trust-checkpoint"]),
    ("checkpoint-foreign-hashed", ["not a bpfree checkpoint"]),
])
def test_resume_of_a_damaged_run_dir_fails_clearly_and_keeps_the_checkpoint(run_dir, tmp_path, damage, words):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    config, ck = out / "config.toml", out / "checkpoint.pt"
    digest = out / "checkpoint.pt.sha256"
    if damage == "config-junk":
        config.write_text("[run\nlr = = 3")
    elif damage == "config-changed":
        config.write_text(config.read_text().replace("lr = 0.001", "lr = 0.5"))
    elif damage == "config-unknown-key":
        config.write_text(config.read_text().replace("[run]", "[run]\nbogus_key = 1"))
    elif damage == "checkpoint-truncated":
        ck.write_bytes(ck.read_bytes()[:1000])
    elif damage == "checkpoint-garbage":
        ck.write_bytes(b"\x00garbage" * 100)
    elif damage == "checkpoint-hash-wrong":
        digest.write_text("0" * 64 + "\n")
    elif damage == "checkpoint-foreign":  # someone else's file, no hash beside it
        torch.save({"weights": torch.ones(3)}, ck)
        digest.unlink()
    else:  # a plain tensor dict with a matching hash: loads safely, but is no run's checkpoint
        _write_with_hash({"weights": torch.ones(3)}, ck)
    before = snapshot(out)
    rc, _, err = run_cli("train", "--resume", out, "--no-progress")
    assert_one_line_error(rc, err, *words)
    assert snapshot(out) == before


@pytest.mark.parametrize("hashed", [False, True])
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_none(run_dir, tmp_path, hashed):
    # The pickle's __reduce__ would create a file when unpickled. Without a hash it is foreign and
    # never unpickled; with a matching hash the safe load refuses to build it. Either way: a clear
    # one-line error that names the way out, and the marker file never appears.
    import shutil

    out, marker = tmp_path / "copy", tmp_path / "pwned"
    shutil.copytree(run_dir, out)
    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    payload["state"]["hostile"] = _Marker(marker)
    if hashed:
        _write_with_hash(payload, out / "checkpoint.pt")
    else:
        torch.save(payload, out / "checkpoint.pt")
        (out / "checkpoint.pt.sha256").unlink()
    before = snapshot(out)
    rc, _, err = run_cli("train", "--resume", out, "--no-progress")
    words = ["refuses", "--trust-checkpoint"] if hashed else ["not written by bpfree", "--trust-checkpoint"]
    assert_one_line_error(rc, err, *words)
    assert not marker.exists()
    assert snapshot(out) == before


def test_trust_checkpoint_resumes_a_checkpoint_without_a_hash(run_dir, tmp_path):
    # A checkpoint from before checkpoints carried a hash: refused by default, resumed with the flag.
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(run_dir, out)
    (out / "checkpoint.pt.sha256").unlink()
    assert_one_line_error(*run_cli("train", "--resume", out, "--no-progress")[::2], "not written by bpfree")
    rc, _, err = run_cli("train", "--resume", out, "--no-progress", "--trust-checkpoint")
    assert rc == 0, err
    assert_one_line_error(*run_cli("train", "--method", "bp", "--trust-checkpoint", *COMMON)[::2],
                          "--trust-checkpoint goes with --resume")


def test_fresh_train_into_an_existing_run_is_refused(run_dir):
    before = snapshot(run_dir)
    rc, _, err = run_cli("train", "--method", "dfa", "--out", run_dir, *COMMON)
    assert_one_line_error(rc, err, "already holds a run", "--resume", "--overwrite")
    assert snapshot(run_dir) == before


def test_resume_of_a_plain_file_or_missing_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(*run_cli("train", "--resume", tmp_path / "file")[::2], "not a bpfree run directory")
    assert_one_line_error(*run_cli("train", "--resume", tmp_path / "nothing")[::2], "not a bpfree run directory")


def test_overwrite_replaces_a_run(tmp_path):
    out = tmp_path / "run"
    assert run_cli("train", "--method", "bp", "--out", out, *COMMON)[0] == 0
    assert run_cli("train", "--method", "dfa", "--out", out, "--overwrite", *COMMON)[0] == 0
    assert json.loads((out / "summary.json").read_text())["method"] == "dfa"


# --------------------------------------------------------------------------- own data and own models

LOCAL = {  # kind -> the flags that train a small model on it
    "npz": ["--model", "mlp", "--set", "widths=4", "--set", "test_fraction=0.25"],
    "images": ["--model", "mlp", "--set", "widths=4"],
    "text": ["--model", "transformer", "--set", "d_model=8", "--set", "heads=1", "--set", "depth=1",
             "--set", "context=4"],
}


def _random_npz(rng, path):
    import numpy as np

    dtype = rng.choice(["float32", "float64", "uint8", "int64", "bool", "complex64", "U1"])
    shape = tuple(int(s) for s in rng.integers(0, 5, rng.integers(1, 5)))
    arrays = {"x": np.zeros(shape, dtype=dtype), "y": rng.integers(-1, 3, rng.integers(0, 6))}
    for key in rng.choice(["x", "y", "x_test", "y_train"], rng.integers(0, 3), replace=False):
        arrays.pop(key, None) if rng.random() < 0.5 else arrays.update({key: np.ones(3, dtype=dtype)})
    np.savez(path, **arrays)


def _local_files(kind, root, rng, raw: bytes, cut: int, shape) -> str:
    """A dataset of ``kind`` in ``root`` that is valid, random, truncated or oddly shaped."""
    import numpy as np
    from PIL import Image

    how = rng.choice(["valid", "random", "truncated", "odd"])
    if kind == "npz":
        path = root / "d.npz"
        x = rng.normal(size=(12, 3)).astype(np.float32)
        np.savez(path, x=x, y=np.arange(12) % 2)
        if how == "random":
            path.write_bytes(raw)
        elif how == "truncated":
            path.write_bytes(path.read_bytes()[:cut])
        elif how == "odd":
            _random_npz(rng, path)
        return f"npz:{path}"
    if kind == "images":
        for c in ("a", "b"):
            (root / "imgs" / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (4, 4), dtype=np.uint8)).save(root / "imgs" / c / f"{i}.png")
        bad = root / "imgs" / "b" / "x.png"
        if how == "random":
            bad.write_bytes(raw)
        elif how == "truncated":
            bad.write_bytes((root / "imgs" / "a" / "0.png").read_bytes()[:cut])
        elif how == "odd":
            Image.fromarray(np.zeros(shape, dtype=np.uint8)).save(bad)
        return f"images:{root / 'imgs'}"
    path = root / "c.txt"
    text = " ".join(rng.choice(["ab", "c", "de"], 200)) + "\n"
    path.write_bytes(raw if how == "random" else text.encode()[:cut] if how == "truncated"
                     else "\u00e9\u00df \u2603 \u0000 \ufeff".encode() * int(rng.integers(0, 40)) if how == "odd"
                     else text.encode())
    return f"text:{path}"


@HYPO
@given(kind=st.sampled_from(list(LOCAL)), seed=st.integers(0, 2**16), raw=st.binary(max_size=200),
       cut=st.integers(0, 300), shape=st.sampled_from([(4, 4), (5, 4), (1, 1), (4, 4, 3), (4, 4, 4)]))
def test_hostile_local_files_train_or_fail_with_one_line_and_leave_the_cache_whole(tmp_path_factory, kind, seed,
                                                                                   raw, cut, shape):
    import numpy as np

    root = tmp_path_factory.mktemp("local")
    name = _local_files(kind, root, np.random.default_rng(seed), raw, cut, shape)
    rc, _, err = run_cli("train", "--method", "dfa", "--dataset", name, *LOCAL[kind], "--epochs", "1",
                         "--batch-size", "4", "--no-progress", "--data-dir", root / "cache", "--out", root / "run")
    if rc != 0:
        assert_one_line_error(rc, err)
    cached = list((root / "cache").rglob("*"))
    assert not [p for p in cached if p.name.startswith(".")], cached  # no temporary file left behind
    for p in cached:
        if p.is_file():
            assert isinstance(torch.load(p, weights_only=True), dict)  # a cache file is whole


@HYPO
@given(prefix=st.sampled_from(["npz:", "images:", "text:", "py:", "csv:", ":", "npz::", "py::"]),
       junk=JUNK, suffix=st.sampled_from(["", ".npz", ".py:build", ":build", ":", "/x.py:f"]))
def test_junk_dataset_and_model_names_get_one_line_errors(tmp_path_factory, prefix, junk, suffix):
    out = tmp_path_factory.getbasetemp() / f"local-junk-{next(counter)}"
    for flag in ("--dataset", "--model"):
        rc, _, err = run_cli("train", flag, prefix + junk + suffix, "--no-progress", "--out", out)
        assert_one_line_error(rc, err)
        assert not out.exists()


@pytest.fixture(scope="module")
def local_sets(tmp_path_factory):
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("local-sets")
    np.savez(root / "d.npz", x=np.zeros((8, 3), np.float32), y=np.arange(8) % 2)
    for c in ("a", "b"):
        (root / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "imgs" / c / "0.png")
    (root / "c.txt").write_text("a b c\n" * 50)
    (root / "net.py").write_text("from torch import nn\n\ndef build(shape, n, width: int = 4, act='tanh'):\n"
                                 "    return nn.Sequential(nn.Flatten(), nn.Linear(shape[-1], width), nn.Tanh(),"
                                 " nn.Linear(width, n))\n")
    return {"npz": f"npz:{root / 'd.npz'}", "images": f"images:{root / 'imgs'}", "text": f"text:{root / 'c.txt'}",
            "model": f"py:{root / 'net.py'}:build"}


LOCAL_ODD = [
    ("images", "size", ["0", "-1", "1,2,3", "x", "4,0"]), ("images", "color", ["blue", ""]),
    ("images", "test_fraction", ["1", "-0.1", "nan", "inf", "x"]), ("npz", "test_fraction", ["1", "-1", "nan"]),
    ("npz", "split_seed", ["-1", str(2**70), "x"]), ("npz", "classes", ["-1", "x", "1.5"]),
    ("npz", "normalize", ["maybe"]), ("text", "level", ["byte", ""]), ("text", "min_count", ["0", "-2"]),
    ("text", "context", ["0", "x"]), ("npz", "sha256", ["0" * 64, "x"]), ("npz", "log", ["", "csv", "jsonl,x"]),
    ("model", "width", ["x", "1.5", ""]), ("model", "sha256", ["0" * 64]),
]


@pytest.mark.parametrize("kind,key,value", [(k, key, v) for k, key, vs in LOCAL_ODD for v in vs])
def test_odd_values_of_the_new_options_get_one_line_errors(local_sets, tmp_path, kind, key, value):
    flags = ["--model", local_sets["model"], "--dataset", local_sets["npz"], "--set", "test_fraction=0.5"] \
        if kind == "model" else ["--dataset", local_sets[kind]]
    rc, _, err = run_cli("train", *flags, "--no-progress", f"--set={kind if kind == 'model' else ''}"
                         f"{'.' if kind == 'model' else ''}{key}={value}", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, key if key != "sha256" else "changed since")
    assert not (tmp_path / "run").exists()
