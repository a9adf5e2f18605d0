"""Scale: data parallel training (gloo, 2 processes on the CPU) against single-process references,
and mixed precision (the CPU side of ``amp``).

Expected values come from what data parallelism is meant to compute:

* the gradient of the mean loss over the global batch is the share-weighted sum of the shards'
  mean-loss gradients, so BP and DFA on 2 processes end with the weights of one process on the
  same global batches (to float rounding), also with an uneven last batch (203 samples: 6 + 5);
* GrAPE's ranks average their Jacobian estimates, so after one step ``Jbar`` equals the mean of
  the estimates that single-process GrAPE computes on each shard alone with that rank's tangent
  stream (``worker_rank``), and ``B_l`` is identical on every rank; the ranks' tangent streams
  differ, while the shared generator (``B_l``'s initialisation and noise) agrees bit for bit; with the feedback update off (``eta=0, noise=0``) GrAPE is DFA with a fixed
  ``B_l`` and ends with the single-process weights;
* a checkpoint written by 2 processes resumes on 1 and ends where an uninterrupted run ends.

All scenarios run in one spawn of two processes (one start-up of torch), a few seconds in all.

Mixed precision: ``amp=bf16`` trains BP, DFA and GrAPE under ``torch.autocast`` (the step sees
bf16 activations, the weights stay float32); ``amp=fp16`` scales the loss for methods that declare
``supports_loss_scaling`` (test subclasses of BP, DFA and GrAPE here), logs the true loss, and
checkpoints the scaler, so an fp16 run resumes bit-identically.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

import conftest  # noqa: F401  (registers blobs-test here and in the spawned workers)
from bpfree import distributed
from bpfree.distributed import Workers
from bpfree.methods import register
from bpfree.methods.base import StepResult
from bpfree.methods.bp import BP
from bpfree.methods.dfa import DFA
from bpfree.methods.grape import GrAPE
from bpfree.train.config import resolve
from bpfree.train.loop import Run, TrainingError, resume

WORLD = 2



def make_cfg(**over):
    run = {"dataset": "blobs-test", "model": "mlp", "epochs": 2, "batch_size": 32, "limit_train": 203,
           "limit_test": 64, "lr": 0.01, "log_every": 2}
    sets = [f"{k}={v}" for k, v in over.items()]
    return resolve({"run": run, "model": {"widths": [16, 16]}}, sets)


SCENARIOS = {
    "bp": dict(method="bp"),
    "dfa": dict(method="dfa"),
    "grape-fixed": dict(method="grape", eta=0.0, **{"method.noise": 0.0}),  # B_l never moves: DFA with GrAPE's machinery
    "grape": dict(method="grape", eta=0.05),
    "grape-one-step": dict(method="grape", epochs=1, limit_train=32),
    "bp-part": dict(method="bp", checkpoint_every=3),  # stopped after 5 steps, resumed on 1 process
}
STOP_AFTER = 5


def library_methods() -> list[str]:
    from bpfree import methods

    return [m for m in methods.available() if not m.startswith("test-")]


def _worker(root: str) -> None:
    """Each scenario on this rank; final model and method states saved per rank."""
    workers = Workers.current()
    assert workers.world == WORLD
    root = Path(root)
    for name, over in SCENARIOS.items():
        run = Run(make_cfg(**over), root / name, progress=False)
        if name.endswith("-part"):
            real, calls = run.optimizer.step, [0]

            def step(*a, real=real, calls=calls, **k):
                calls[0] += 1
                if calls[0] > STOP_AFTER:
                    raise KeyboardInterrupt
                return real(*a, **k)

            run.optimizer.step = step
            try:
                run.fit()
            except KeyboardInterrupt:
                pass
        else:
            run.fit()
        probe = torch.randn(8, generator=run.method.tangent_generator(torch.device("cpu"))) \
            if name.startswith("grape") else None  # this rank's tangent stream at its last step
        torch.save({"model": run.model.state_dict(), "method": run.method.state_dict(), "tangents": probe,
                    "worker_rank": run.method.worker_rank}, root / f"{name}.rank{workers.rank}.pt")
    for method in library_methods():  # every method trains under data parallelism
        run = Run(make_cfg(method=method, epochs=1, limit_train=96, log_every=1), root / f"all-{method}",
                  progress=False)
        run.fit()
        torch.save({"model": run.model.state_dict(), "method": distributed.state_checksum(run.method.state_dict())},
                   root / f"all-{method}.rank{workers.rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    distributed.spawn(WORLD, _worker, str(root))
    return root


def final(root: Path, name: str, rank: int) -> dict:
    return torch.load(root / f"{name}.rank{rank}.pt", weights_only=False)


def single(tmp_path, name: str) -> Run:
    run = Run(make_cfg(**SCENARIOS[name]), tmp_path / name, progress=False)
    run.fit()
    return run


def assert_same(a: dict, b: dict, **tol) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], msg=lambda m: f"{k}: {m}", **tol)


@pytest.mark.parametrize("name", ["bp", "dfa", "grape-fixed"])
def test_two_processes_end_with_the_single_process_weights(ddp_runs, tmp_path, name):
    ref = single(tmp_path, name).model.state_dict()
    for rank in range(WORLD):
        assert_same(final(ddp_runs, name, rank)["model"], ref, rtol=0, atol=1e-5)
    summary = json.loads((ddp_runs / name / "summary.json").read_text())
    assert summary["processes"] == WORLD and summary["steps"] == 14  # 7 global batches per epoch


def test_grape_feedback_and_weights_identical_on_every_rank(ddp_runs):
    a, b = final(ddp_runs, "grape", 0), final(ddp_runs, "grape", 1)
    assert_same(a["model"], b["model"], rtol=0, atol=0)
    assert a["method"]["feedback"].keys() == {"3", "6"}
    assert_same(a["method"]["feedback"], b["method"]["feedback"], rtol=0, atol=0)
    assert_same(a["method"]["jacobian"]["mean"], b["method"]["jacobian"]["mean"], rtol=0, atol=0)
    assert torch.equal(a["method"]["generator"], b["method"]["generator"])
    B0 = final(ddp_runs, "grape-fixed", 0)["method"]["feedback"]
    assert any(not torch.allclose(a["method"]["feedback"][k], B0[k]) for k in B0)  # B did move


@pytest.mark.parametrize("method", library_methods())
def test_every_method_trains_with_identical_weights_on_every_rank(ddp_runs, method):
    a, b = final(ddp_runs, f"all-{method}", 0), final(ddp_runs, f"all-{method}", 1)
    assert_same(a["model"], b["model"], rtol=0, atol=0)
    assert torch.equal(a["method"], b["method"])  # method state in step after the final checkpoint
    summary = json.loads((ddp_runs / f"all-{method}" / "summary.json").read_text())
    assert summary["processes"] == WORLD and summary["steps"] == 3


def test_grape_jacobian_estimate_is_the_mean_of_the_shard_estimates(ddp_runs, tmp_path):
    """One step on 32 samples: Jbar on each rank = mean of single-process estimates on each half."""
    cfg = make_cfg(**SCENARIOS["grape-one-step"])
    run = Run(cfg, tmp_path / "ref", progress=False)
    x, y = run.task.train_batch(cfg.run.seed, 0, 0, cfg.run.batch_size)
    estimates = []
    for rank in range(WORLD):  # a fresh single-process GrAPE (same seed, rank's tangents) on the shard alone
        shard = Run(cfg, tmp_path / f"shard{rank}", progress=False)
        shard.method.worker_rank = rank
        lo, hi = Workers(rank, WORLD).shard_range(len(x))
        shard.method.step(x[lo:hi], y[lo:hi], shard.task.loss_fn)
        estimates.append(shard.method.state.jacobian.mean)
    expected = {k: sum(e[k] for e in estimates) / WORLD for k in estimates[0]}
    for rank in range(WORLD):
        got = final(ddp_runs, "grape-one-step", rank)["method"]["jacobian"]["mean"]
        assert_same(got, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(estimates[0]["3"], estimates[1]["3"])  # the shards did differ


def test_ranks_draw_their_own_tangents_but_share_the_feedback_stream(ddp_runs):
    """Per rank: its own tangents (seeded by seed, rank and step); shared: B_l and the generator making it."""
    for name in ("grape", "grape-one-step"):
        a, b = final(ddp_runs, name, 0), final(ddp_runs, name, 1)
        assert (a["worker_rank"], b["worker_rank"]) == (0, 1)
        assert not torch.allclose(a["tangents"], b["tangents"])
        assert torch.equal(a["method"]["generator"], b["method"]["generator"])
        assert_same(a["method"]["feedback"], b["method"]["feedback"], rtol=0, atol=0)
    # the tangents a rank draws are a pure function of (seed, rank, step): what a resumed run redraws
    from bpfree.methods.base import MethodGenerator, rank_seed

    again = torch.randn(8, generator=MethodGenerator(0).for_rank("cpu", 1, 1))
    assert torch.equal(again, final(ddp_runs, "grape-one-step", 1)["tangents"])
    assert torch.equal(again, torch.randn(8, generator=torch.Generator().manual_seed(rank_seed(0, 1, 1))))


def test_the_group_gets_the_timeout_and_the_gpu_of_its_rank(monkeypatch):
    """init_process_group receives dist_timeout and, for NCCL, device_id = cuda:LOCAL_RANK (set current first)."""
    import datetime

    import torch.distributed as dist

    calls, current = [], []
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(kw))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: None)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    for key, value in dict(RANK="1", LOCAL_RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)
    with distributed.from_environment("cpu", timeout=12.5):
        pass
    assert calls[-1] == {"backend": "gloo", "init_method": "env://", "timeout": datetime.timedelta(seconds=12.5)}
    with distributed.from_environment("cpu"):
        pass
    assert calls[-1]["timeout"] == datetime.timedelta(seconds=distributed.TIMEOUT_S)
    # a CUDA run on a (pretended) machine with two GPUs and NCCL
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    with distributed.from_environment("cuda", timeout=30):
        pass
    assert calls[-1] == {"backend": "cpu:gloo,cuda:nccl", "init_method": "env://",
                         "timeout": datetime.timedelta(seconds=30), "device_id": torch.device("cuda", 1)}
    assert current == [torch.device("cuda", 1)]


def test_the_cli_hands_dist_timeout_to_the_group(monkeypatch, tmp_path):
    """``--set dist_timeout=7`` reaches the process group that --nproc spawns, and a resume reads it back."""
    from bpfree import cli

    seen = []
    monkeypatch.setattr(distributed, "spawn", lambda n, fn, *a, device=None, timeout=None: seen.append((n, device, timeout)))
    argv = ["train", "--method", "bp", "--dataset", "blobs-test", "--batch-size", "32", "--device", "cpu",
            "--set", "dist_timeout=7", "--nproc", "2", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 0
    assert seen == [(2, "cpu", 7.0)]
    assert resolve({}, ["dist_timeout=7"]).run.dist_timeout == 7.0
    with pytest.raises(Exception, match="dist_timeout"):
        resolve({}, ["dist_timeout=0"])


def test_checkpoint_of_two_processes_resumes_on_one(ddp_runs, tmp_path):
    part = ddp_runs / "bp-part"
    ck = torch.load(part / "checkpoint.pt", weights_only=False)
    assert ck["state"]["global_step"] == 3 and ck["world_size"] == WORLD and len(ck["rng_ranks"]) == WORLD
    summary = resume(part, progress=False)
    assert summary["steps"] == 14 and summary["processes"] == 1
    ref = single(tmp_path, "bp").model.state_dict()
    resumed = torch.load(part / "checkpoint.pt", weights_only=False)["model"]
    assert_same(resumed, ref, rtol=0, atol=1e-5)
    lines = [json.loads(l) for l in (part / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "step"] == [2, 4, 6, 7, 8, 10, 12, 14]


def test_sharding_rules():
    w = Workers(1, 3)
    assert [Workers(r, 3).shard_range(10) for r in range(3)] == [(0, 4), (4, 7), (7, 10)]
    x, y = torch.arange(10.0).view(10, 1), torch.arange(10)
    xs, ys, weight, even = w.shard(x, y)
    assert xs.view(-1).tolist() == [4, 5, 6] and weight == pytest.approx(0.3) and not even
    with pytest.raises(distributed.DistributedError, match="batch_size 32 .* 3 processes"):
        w.check_batch_size(32)
    with pytest.raises(TrainingError, match="global batch and must divide evenly over the 3"):
        Run(make_cfg(method="bp"), "unused", progress=False, workers=w)
    one = Workers()
    assert one.shard(x, y)[2:] == (1.0, True) and one.average(x) is x and one.on_root(lambda: 7) == 7


@pytest.mark.slow
def test_cli_nproc_spawns_two_processes(tmp_path):
    """``bpfree train --nproc 2`` end to end (two more interpreter start-ups: the slow tier)."""
    import subprocess

    helper = Path(__file__).with_name("_blobs_cli.py")
    out = tmp_path / "run"
    cmd = [sys.executable, str(helper), "train", "--method", "dfa", "--dataset", "blobs-test", "--epochs", "1",
           "--batch-size", "32", "--limit-train", "128", "--limit-test", "64", "--set", "widths=16",
           "--nproc", "2", "--out", str(out), "--no-progress"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "on 2 processes" in proc.stdout and proc.stdout.count("test accuracy") == 1
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    bad = subprocess.run(cmd[:-3] + ["--batch-size", "33", "--out", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "divide evenly over the 2 processes" in bad.stderr
    assert bad.stderr.count("bpfree: error:") == 1


# --------------------------------------------------------------------------- mixed precision (CPU side)

@register
class SeenBP(BP):
    """BP that records the autocast state and the loss value it differentiates."""

    name = "test-amp-bp"
    supports_loss_scaling = True
    seen: list = []

    def step(self, x, y, loss_fn):
        out = self.model(x)
        loss = loss_fn(out, y)
        SeenBP.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), out.dtype, float(loss.detach())))
        loss.backward()
        return StepResult(loss.detach(), out.detach())


@register
class ScaledDFA(DFA):
    name = "test-amp-dfa"
    supports_loss_scaling = True


@register
class ScaledGrAPE(GrAPE):
    name = "test-amp-grape"
    supports_loss_scaling = True


def amp_cfg(method, amp, **over):
    return make_cfg(method=method, amp=amp, limit_train=256, **over)


@pytest.mark.parametrize("method", ["bp", "dfa", "grape"])
def test_bf16_autocast_trains_every_core_method(tmp_path, method):
    plain = Run(amp_cfg(method, "none"), tmp_path / "fp32", progress=False)
    plain.fit()
    run = Run(amp_cfg(method, "bf16"), tmp_path / "bf16", progress=False)
    summary = run.fit()
    assert summary["amp"] == "bf16" and summary["test_accuracy"] > 0.6
    for k, v in run.model.state_dict().items():
        assert v.dtype == torch.float32  # weights, grads and optimizer stay float32
        assert torch.isfinite(v).all()
        # bf16 rounding changed the trajectory (autocast was on), but not by much
        torch.testing.assert_close(v, plain.model.state_dict()[k], rtol=0, atol=0.1)
    assert any(not torch.equal(v, plain.model.state_dict()[k]) for k, v in run.model.state_dict().items())


def test_autocast_wraps_the_step_and_fp16_scales_the_loss(tmp_path):
    SeenBP.seen.clear()
    Run(amp_cfg("test-amp-bp", "bf16", epochs=1), tmp_path / "bf16", progress=False).fit()
    assert SeenBP.seen[0][:3] == (True, torch.bfloat16, torch.bfloat16)
    SeenBP.seen.clear()
    run = Run(amp_cfg("test-amp-bp", "fp16", epochs=1), tmp_path / "fp16", progress=False)
    run.fit()
    enabled, dtype, out_dtype, loss = SeenBP.seen[0]
    assert (enabled, dtype, out_dtype) == (True, torch.float16, torch.float16)
    assert loss > 1000  # the method saw the scaled loss (initial scale 2**16, loss ~1.4)...
    first = json.loads((tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] < 5  # ...the log the true one
    ck = torch.load(tmp_path / "fp16" / "checkpoint.pt", weights_only=False)
    assert ck["scaler"]["scale"] > 0


@pytest.mark.parametrize("method", ["test-amp-bp", "test-amp-dfa", "test-amp-grape"])
def test_fp16_with_gradient_scaling_resumes_bit_identically(tmp_path, method):
    c = amp_cfg(method, "fp16", checkpoint_every=3)
    full = Run(c, tmp_path / "full", progress=False)
    summary = full.fit()
    assert summary["test_accuracy"] > 0.6
    part = Run(c, tmp_path / "part", progress=False)
    real, calls = part.optimizer.step, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] > 10:
            raise KeyboardInterrupt
        return real(*a, **k)

    part.optimizer.step = step
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resume(tmp_path / "part", progress=False)
    got = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    assert_same(got["model"], full.model.state_dict(), rtol=0, atol=0)
    assert got["scaler"] == full.precision.state_dict()
