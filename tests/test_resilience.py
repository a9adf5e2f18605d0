"""Runs that are killed, run out of disk, diverge, or meet corrupt data: nothing is lost.

The reference for every resumed run is an uninterrupted run with the same configuration: the
final weights must be bit-identical (batches are a pure function of (seed, epoch, index), and
every piece of state is checkpointed).
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import conftest  # noqa: F401  (registers blobs-test)
from bpfree.train import rundir
from bpfree.train.config import resolve
from bpfree.train.loop import Run, TrainingError, resume, train

HELPER = Path(__file__).with_name("_blobs_cli.py")



def cfg(**over):
    run = {"dataset": "blobs-test", "model": "mlp", "epochs": 2, "batch_size": 32, "limit_train": 256,
           "limit_test": 64, "lr": 0.01, "log_every": 2}
    return resolve({"run": run, "model": {"widths": [16, 16]}}, [f"{k}={v}" for k, v in over.items()])


def weights(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=False)["model"]


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- SIGKILL


KILL_EPOCHS = 6  # 6 x 320 / 16 = 120 steps: room for four kills before the run could end
KILL_STEPS = KILL_EPOCHS * 320 // 16
# Each killed process stops HOLD_STEPS steps after its first checkpoint (tests/_blobs_cli.py), so it
# is alive when the kill comes even if this process is starved for longer than the run would take;
# four such processes still leave steps for the final resume: 4 * (HOLD_STEPS + 1) < KILL_STEPS.
HOLD_STEPS = KILL_STEPS // 4 - 2
KILL_ARGS = ["--method", "grape", "--dataset", "blobs-test", "--epochs", str(KILL_EPOCHS), "--batch-size", "16",
             "--limit-train", "320", "--limit-test", "64", "--lr", "0.01", "--set", "widths=16,16",
             "--set", "checkpoint_every=1", "--set", "log_every=3", "--no-progress"]


def kill_and_resume(tmp_path: Path, kills: int) -> None:
    """``bpfree train`` (a subprocess) killed with SIGKILL at a random moment once checkpoints flow,
    then ``--resume`` killed likewise ``kills - 1`` times, then resumed here to the end: the weights,
    GrAPE's feedback matrices and the metrics equal an uninterrupted run's, bit for bit."""
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path),
               BPFREE_TEST_HOLD_AFTER=str(HOLD_STEPS))
    rng = random.Random(os.getpid() ^ int(time.time()))

    def step_on_disk() -> int:
        try:
            return torch.load(out / "checkpoint.pt", weights_only=False)["state"]["global_step"]
        except Exception:  # not written yet
            return -1

    for i in range(kills):
        cmd = [*KILL_ARGS, "--out", str(out)] if i == 0 else ["--resume", str(out), "--no-progress"]
        wait_for = 2 if i == 0 else step_on_disk() + 2
        proc = subprocess.Popen([sys.executable, str(HELPER), "train", *cmd], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and step_on_disk() < wait_for:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15))  # somewhere in a step, a checkpoint write, a log line...
        alive = proc.poll() is None
        if alive:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert alive, f"run {i} ended (code {proc.returncode}) before it could be killed: {err}"
        assert proc.returncode == -signal.SIGKILL
    assert 0 < step_on_disk() < KILL_STEPS
    summary = resume(out, progress=False)  # in this process, to the end
    assert summary["steps"] == KILL_STEPS
    assert not list(out.glob(".*.tmp"))

    ref = Run(resolve({"run": {"method": "grape", "dataset": "blobs-test", "epochs": KILL_EPOCHS, "batch_size": 16,
                               "limit_train": 320, "limit_test": 64, "lr": 0.01, "log_every": 3},
                       "model": {"widths": [16, 16]}}), tmp_path / "ref", progress=False)
    ref.fit()
    assert_bit_identical(weights(out), weights(tmp_path / "ref"))
    a = torch.load(out / "checkpoint.pt", weights_only=False)["method"]
    b = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["method"]
    assert_bit_identical(a["feedback"], b["feedback"])
    assert torch.equal(a["generator"], b["generator"])
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "train_seconds"}
                       for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(out) == strip(tmp_path / "ref")


def test_sigkill_then_resume_gives_the_uninterrupted_weights(tmp_path):
    kill_and_resume(tmp_path, kills=1)


@pytest.mark.slow
def test_sigkill_again_and_again_during_resume(tmp_path):
    kill_and_resume(tmp_path, kills=4)


# --------------------------------------------------------------------------- disk


def test_too_little_free_space_fails_before_training(tmp_path, monkeypatch):
    real = rundir.shutil.disk_usage
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: real(p)._replace(free=4 * 2**20))
    with pytest.raises(TrainingError, match=r"not enough free space .* only 4\.0 MB"):
        train(cfg(method="bp"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.toml").exists()
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_checkpoint_size_estimate_covers_the_real_checkpoint(tmp_path):
    run = Run(cfg(method="grape", epochs=1), tmp_path, progress=False)
    estimate = run.checkpoint_bytes()
    run.fit()
    assert (tmp_path / "checkpoint.pt").stat().st_size <= estimate


def test_disk_full_mid_run_keeps_the_previous_checkpoint_and_resumes_exactly(tmp_path, monkeypatch):
    c = cfg(method="dfa", checkpoint_every=3)
    full = Run(c, tmp_path / "full", progress=False)
    full.fit()
    real, calls = rundir.save_checkpoint, [0]

    def save(obj, path):
        calls[0] += 1
        if calls[0] == 3:  # the third checkpoint (step 9) meets a full disk
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path)

    monkeypatch.setattr(rundir, "save_checkpoint", save)
    with pytest.raises(TrainingError, match="cannot write the checkpoint .*No space left on device.*previous checkpoint is intact"):
        train(c, tmp_path / "part", progress=False)
    monkeypatch.setattr(rundir, "save_checkpoint", real)
    assert torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)["state"]["global_step"] == 6
    resume(tmp_path / "part", progress=False)
    assert_bit_identical(weights(tmp_path / "part"), weights(tmp_path / "full"))


def test_atomic_writes_leave_no_half_file(tmp_path):
    from bpfree.train.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"a": torch.ones(3)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom while writing")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"a": torch.zeros(3), "b": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["a"], torch.ones(3))  # the old file, whole, and still listed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the usual permissions, not mkstemp's 0600


def test_stale_temporary_files_are_removed_on_resume(tmp_path):
    c = cfg(method="bp", checkpoint_every=3)
    run = Run(c, tmp_path, progress=False)
    real, calls = run.optimizer.step, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] > 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    run.optimizer.step = step
    with pytest.raises(KeyboardInterrupt):
        run.fit()
    (tmp_path / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # as a SIGKILL leaves it
    resume(tmp_path, progress=False)
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------- divergence


def nan_at(run: Run, bad_step: int, value=float("nan")):
    """Make the inputs of global step ``bad_step`` (1-based) non-finite."""
    real, seen = run.task.train_batch, [0]

    def batch(*a, **k):
        x, y = real(*a, **k)
        seen[0] += 1
        if seen[0] == bad_step:
            x = torch.full_like(x, value)
        return x, y

    run.task.train_batch = batch


@pytest.mark.parametrize("value,shown", [(float("nan"), "nan"), (float("inf"), "(nan|inf)")])
def test_nan_input_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, value, shown):
    """log_every=50 (no log line before the NaN): the check before each checkpoint catches it."""
    run = Run(cfg(method="bp", checkpoint_every=2, log_every=50), tmp_path, progress=False)
    nan_at(run, 5, value)
    with pytest.raises(TrainingError, match=rf"the loss became {shown} at step 5 \(epoch 1\); stopping\. "
                                            rf"The last good checkpoint is kept in"):
        run.fit()
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["state"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_nan_before_the_first_checkpoint_says_so(tmp_path):
    run = Run(cfg(method="dfa", log_every=1), tmp_path, progress=False)
    nan_at(run, 2)
    with pytest.raises(TrainingError, match="at step 2 .*No checkpoint had been written"):
        run.fit()


def test_nonfinite_weights_are_never_checkpointed(tmp_path):
    run = Run(cfg(method="bp", checkpoint_every=2, log_every=50), tmp_path, progress=False)
    real, calls = run.optimizer.step, [0]

    def step(*a, **k):
        calls[0] += 1
        out = real(*a, **k)
        if calls[0] == 3:
            with torch.no_grad():
                next(run.model.parameters())[0, 0] = float("inf")
        return out

    run.optimizer.step = step
    with pytest.raises(TrainingError, match="step 4"):
        run.fit()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["global_step"] == 2


# --------------------------------------------------------------------------- corrupt data


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape) + arr.tobytes()


def test_corrupt_cached_dataset_is_detected_refetched_and_trains_the_same(tmp_path, monkeypatch, caplog):
    """MNIST-shaped generated data from a file:// mirror: a flipped byte in the cache is refetched."""
    import hashlib
    import logging

    from bpfree.data import DATASETS, sources

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 64, dtype=np.uint8)
    images = (rng.integers(0, 60, (64, 28, 28)) + labels[:, None, None] * 19).astype(np.uint8)
    raw = {"train-images-idx3-ubyte": _idx(images), "train-labels-idx1-ubyte": _idx(labels),
           "t10k-images-idx3-ubyte": _idx(images[:32]), "t10k-labels-idx1-ubyte": _idx(labels[:32])}
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in raw.items():
        (mirror / f"{name}.gz").write_bytes(gzip.compress(data))
    table = {k: hashlib.sha256(v).hexdigest() for k, v in raw.items()}
    monkeypatch.setitem(DATASETS, "mnist", dataclasses.replace(DATASETS["mnist"], files=table))
    monkeypatch.setattr(sources, "NPM", "bpfree-test-no-such-npm")
    monkeypatch.setenv("BPFREE_MIRROR_MNIST", mirror.as_uri())
    cache = tmp_path / "cache"
    c = resolve({"run": {"method": "bp", "dataset": "mnist", "model": "mlp", "epochs": 1, "batch_size": 16,
                         "lr": 0.01}, "model": {"widths": [8]}})
    train(c, tmp_path / "a", data_dir=cache, progress=False)
    target = cache / "mnist" / "train-images-idx3-ubyte"
    bad = bytearray(target.read_bytes())
    bad[200] ^= 0xFF
    target.write_bytes(bytes(bad))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    with caplog.at_level(logging.WARNING, logger="bpfree.data"):
        train(c, tmp_path / "b", data_dir=cache, progress=False)
    assert any(str(target) in r.getMessage() for r in caplog.records)
    assert target.read_bytes() == raw["train-images-idx3-ubyte"]
    assert_bit_identical(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_failed_checkpoint_writes_never_unlist_the_checkpoint_in_place(tmp_path, monkeypatch):
    # However many saves fail (a full disk, a kill during the write) before one succeeds, the
    # checkpoint still in place keeps its digest in the hash file and loads; the next good save
    # lists its own digest alone.
    import hashlib

    from bpfree import atomic
    from bpfree.train import checkpoint as ck

    path = tmp_path / "checkpoint.pt"
    ck.save_checkpoint({"step": torch.tensor(1)}, path)
    real = atomic.atomic_write

    def failing(target, write, **kwargs):
        if Path(target).name == "checkpoint.pt":
            check = kwargs.get("check")
            real(tmp_path / "scratch", write)  # the bytes are written (and hashed) ...
            if check is not None:
                check()  # ... their digest is listed ...
            raise OSError(errno.ENOSPC, "No space left on device")  # ... and the rename never happens
        return real(target, write, **kwargs)

    monkeypatch.setattr(ck, "atomic_write", failing)
    for step in range(2, 7):
        with pytest.raises(OSError):
            ck.save_checkpoint({"step": torch.tensor(step)}, path)
        assert int(ck.load_checkpoint(path)["step"]) == 1
    monkeypatch.setattr(ck, "atomic_write", real)
    ck.save_checkpoint({"step": torch.tensor(7)}, path)
    assert (tmp_path / "checkpoint.pt.sha256").read_text().split() == [hashlib.sha256(path.read_bytes()).hexdigest()]
    assert int(ck.load_checkpoint(path)["step"]) == 7
