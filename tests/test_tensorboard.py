"""TensorBoard scalars of a run (run option log = jsonl,tensorboard), read back with TensorBoard's own reader.

The expected scalars come from metrics.jsonl, the source of truth: every number of every line
(step, epoch and diagnostics lines) as the tag KIND/KEY at the line's step, rounded to float32 as
TensorBoard stores it, each step once, also after an interrupted run is resumed or a run replaced.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

import conftest  # noqa: F401  (registers blobs-test)
from _cli import assert_one_line_error, run_cli
from bpfree.options import OptionError
from bpfree.train import loop
from bpfree.train.config import resolve

COMMON = ["--dataset", "blobs-test", "--limit-train", "64", "--limit-test", "32", "--batch-size", "16",
          "--set", "widths=8", "--no-progress"]


def board(folder) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` of every scalar in the event files of ``folder``."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def from_jsonl(path) -> dict[str, list[tuple[int, float]]]:
    """What the board must hold, from the metrics lines: each number but the step, as float32."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                out.setdefault(f"{record['kind']}/{key}", []).append((record["step"], float(np.float32(value))))
    return out


def test_event_file_holds_every_metrics_line(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    args = ["train", "--method", "grape", *COMMON, "--epochs", "2", "--set", "log=jsonl,tensorboard",
            "--set", "log_every=1", "--set", "diagnostics_every=3", "--set", "probe_size=16", "--out", out]
    rc, _, err = run_cli(*args)
    assert rc == 0, err
    want = from_jsonl(out / "metrics.jsonl")
    kinds = {tag.split("/")[0] for tag in want}
    assert kinds == {"step", "epoch", "diagnostics"} and "diagnostics/b_jacobian_cos/3" in want
    assert len(want["step/loss"]) == 8 and len(want["epoch/test_accuracy"]) == 2
    assert board(out / "tensorboard") == want
    # a run replaced in the same folder leaves only its own scalars
    rc, _, err = run_cli(*[a if a != "grape" else "dfa" for a in args], "--overwrite")
    assert rc == 0, err
    assert board(out / "tensorboard") == from_jsonl(out / "metrics.jsonl")


def test_a_resumed_run_shows_each_step_once(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    cfg = resolve({"run": {"dataset": "blobs-test", "method": "dfa", "epochs": 2, "batch_size": 16,
                           "limit_train": 64, "limit_test": 32, "log_every": 1}, "model": {"widths": [8]}},
                  ["log=tensorboard"])
    real, calls = loop.Run._step, []

    def crash_at_step_6(self, x, y):
        calls.append(1)
        if len(calls) == 6:  # epoch 2: step 5 is logged after the epoch-1 checkpoint (step 4), then the crash
            raise KeyboardInterrupt
        return real(self, x, y)

    monkeypatch.setattr(loop.Run, "_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        loop.train(cfg, tmp_path / "run", progress=False)
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1] == 5
    monkeypatch.setattr(loop.Run, "_step", real)
    loop.resume(tmp_path / "run", progress=False)
    want = from_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [s for s, _ in want["step/loss"]] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert board(tmp_path / "run" / "tensorboard") == want


def test_tensorboard_missing_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now fails
    with pytest.raises(OptionError, match=r"pip install 'bpfree\[tensorboard\]'"):
        resolve({"run": {"dataset": "blobs-test"}}, ["log=jsonl,tensorboard"])
    rc, _, err = run_cli("train", *COMMON, "--set", "log=tensorboard", "--out", tmp_path / "run")
    assert_one_line_error(rc, err, "tensorboard package")
    assert not (tmp_path / "run").exists()
    assert resolve({"run": {"dataset": "blobs-test"}}).run.log == ("jsonl",)  # the default needs nothing
    with pytest.raises(OptionError, match="'log' cannot be 'csv'"):
        resolve({"run": {"dataset": "blobs-test"}}, ["log=jsonl,csv"])
