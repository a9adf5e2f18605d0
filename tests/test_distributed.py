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
* a checkpoint written by 2 processes resumes on 1 and ends where an uninterrupted run ends;
* the overlapped reduction (``overlap_reduction=true``) computes the same sums as the reduction
  after the backward pass, so every method ends with the same weights either way, also a method
  that calls backward twice, one that rescales ``.grad`` in place after backward, and one that
  touches ``.grad`` on one rank only (the ranks must agree to reduce again); in one process, with
  a fake all-reduce, the buckets are cut and launched as documented.

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
#: Scenarios run with overlap_reduction=true, each against the scenario named beside it (run without).
OVERLAP = {
    "bp-overlap": ("bp", dict(method="bp")),
    "dfa-overlap": ("dfa", dict(method="dfa")),
    "bp-twice-overlap": ("bp", dict(method="test-twice-bp")),  # backward twice: stale buckets, reduced again
    "bp-touch-overlap": ("bp", dict(method="test-touch-bp")),  # .grad touched on rank 1 only
    "dfa-calibrated": ("dfa-calibrated", dict(method="dfa", calibrate_every=3, calibrate_scale="feedback-norm")),
    "dfa-calibrated-overlap": ("dfa-calibrated", dict(method="dfa", calibrate_every=3,
                                                      calibrate_scale="feedback-norm")),
}
#: Small buckets, so that the 16-16 MLP's gradients travel in several (4).
SMALL_BUCKET = 512


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
    distributed.OVERLAP_BUCKET_BYTES = SMALL_BUCKET  # this worker process only
    for name, (_, over) in OVERLAP.items():
        overlap = name.endswith("-overlap")
        run = Run(make_cfg(**over, overlap_reduction=overlap), root / name, progress=False)
        run.fit()
        stats = dict(run.parallel.overlap.stats) if overlap else None
        torch.save({"model": run.model.state_dict(), "stats": stats}, root / f"{name}.rank{workers.rank}.pt")
    for method in library_methods():  # every method trains under data parallelism, with either reduction
        for overlap in (False, True):
            name = f"all-{method}" + ("-overlap" if overlap else "")
            run = Run(make_cfg(method=method, epochs=1, limit_train=96, log_every=1, overlap_reduction=overlap),
                      root / name, progress=False)
            run.fit()
            torch.save({"model": run.model.state_dict(), "method": distributed.state_checksum(run.method.state_dict()),
                        "stats": dict(run.parallel.overlap.stats) if overlap else None},
                       root / f"{name}.rank{workers.rank}.pt")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    distributed.spawn(WORLD, _worker, str(root), timeout=120)  # ranks out of step fail, not hang
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


@pytest.mark.parametrize("name", [n for n in OVERLAP if n.endswith("-overlap")])
def test_overlapped_reduction_ends_with_the_weights_of_the_reduction_after_backward(ddp_runs, name):
    """Same sums, so the same weights (to float rounding), on every rank, over 14 steps (uneven last batches)."""
    ref = OVERLAP[name][0]
    for rank in range(WORLD):
        got = final(ddp_runs, name, rank)
        assert_same(got["model"], final(ddp_runs, ref, rank)["model"], rtol=0, atol=1e-6)
        stats = got["stats"]
        assert stats["steps"] == 13  # the first step is reduced after backward, once .grad is checked
        if name in ("bp-overlap", "dfa-overlap"):  # every bucket left during backward, none again
            assert stats == {"steps": 13, "buckets": 13 * 4, "early": 13 * 4, "fallbacks": 0}
        elif name == "dfa-calibrated-overlap":  # BP steps 3, 6, ... (state steps 0, 3, ...) rescale .grad in place
            assert stats["fallbacks"] == 4 and stats["early"] == 13 * 4
        else:  # every step: the second backward (or rank 1's touch) came after the buckets had left
            assert stats["fallbacks"] == 13 and stats["early"] == 13 * 4
    assert_same(final(ddp_runs, name, 0)["model"], final(ddp_runs, name, 1)["model"], rtol=0, atol=0)


@pytest.mark.parametrize("method", library_methods())
def test_every_method_ends_with_the_same_weights_with_the_overlapped_reduction(ddp_runs, method):
    for rank in range(WORLD):
        got, ref = final(ddp_runs, f"all-{method}-overlap", rank), final(ddp_runs, f"all-{method}", rank)
        assert_same(got["model"], ref["model"], rtol=0, atol=1e-6)
        assert got["stats"]["steps"] == 2
    a, b = final(ddp_runs, f"all-{method}-overlap", 0), final(ddp_runs, f"all-{method}-overlap", 1)
    assert_same(a["model"], b["model"], rtol=0, atol=0)
    if method == "fg-weight":  # .grad assigned, no backward: every bucket leaves in finish()
        assert a["stats"]["early"] == 0 and a["stats"]["buckets"] == 2 * 4


class FakeReduce:
    """A stand-in for ``dist.all_reduce`` on a world of two whose other rank sends the same tensor:
    the sum doubles it, applied only at ``wait()`` for an async call (as a real one may be)."""

    def __init__(self):
        self.calls = []  # (async, a copy of what was sent)

    def __call__(self, t, async_op=False):
        self.calls.append((async_op, t.clone()))
        if not async_op:
            t.mul_(2)
            return None

        class Work:
            def wait(self):
                t.mul_(2)

        return Work()


def _tiny():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x, y = torch.randn(6, 16), torch.randint(0, 4, (6,))
    return model, lambda: torch.nn.functional.cross_entropy(model(x), y)


def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_overlapped_reduction_buckets_and_sums_with_a_fake_all_reduce():
    model, loss = _tiny()
    loss().backward()
    g = _grads(model)  # w1 (8, 16), b1 (8,), w2 (4, 8), b2 (4,)
    w = 0.25
    fake = FakeReduce()
    model.zero_grad(set_to_none=True)
    with distributed.OverlappedReduction(model, bucket_bytes=160, all_reduce=fake) as ov:
        # reverse registration order, a new bucket past 160 bytes: b2 + w2 = 16 + 128, then b1 (32), then w1 (512)
        assert [[tuple(p.shape) for p in b] for b in ov.buckets] == [[(4,), (4, 8)], [(8,)], [(8, 16)]]
        ov.begin(w)
        loss().backward()
        assert [a for a, _ in fake.calls] == [True] * 3  # all three left during backward...
        torch.testing.assert_close(fake.calls[0][1], w * torch.cat([g[3], g[2].reshape(-1)]), rtol=0, atol=0)
        torch.testing.assert_close(fake.calls[2][1], w * g[0].reshape(-1), rtol=0, atol=0)
        assert torch.equal(model[0].weight.grad, g[0])  # ...and .grad is untouched until finish()
        ov.finish()
        for p, gp in zip(model.parameters(), g):
            torch.testing.assert_close(p.grad, 2 * w * gp, rtol=0, atol=0)  # sum over the two "ranks"
        assert fake.calls[3][0] is False and fake.calls[3][1].tolist() == [0.0]  # the agreement flag: not stale
        assert len(fake.calls) == 4 and ov.stats == {"steps": 1, "buckets": 3, "early": 3, "fallbacks": 0}
        # outside begin ... finish the hooks do nothing (diagnostics' backward on rank 0 alone)
        model.zero_grad(set_to_none=True)
        loss().backward()
        assert len(fake.calls) == 4
    model.zero_grad(set_to_none=True)
    ov.begin(w)  # after close(): no hooks, so finish() sends every bucket itself
    loss().backward()
    assert len(fake.calls) == 4
    ov.finish()
    assert ov.stats["early"] == 3 and ov.stats["buckets"] == 6
    torch.testing.assert_close(model[2].bias.grad, 2 * w * g[3], rtol=0, atol=0)


@pytest.mark.parametrize("case", ["twice", "in-place", "assigned", "unused", "frozen", "order"])
def test_overlapped_reduction_falls_back_or_waits_when_it_must(case):
    model, loss = _tiny()
    loss().backward()
    g = _grads(model)
    model.zero_grad(set_to_none=True)
    fake, w = FakeReduce(), 0.5
    ov = distributed.OverlappedReduction(model, bucket_bytes=160, all_reduce=fake)
    expected = [2 * w * gp for gp in g]
    ov.begin(w)
    if case == "twice":  # the second call adds to buckets already on their way
        (0.5 * loss()).backward()
        (0.5 * loss()).backward()
        expected = [2 * w * (0.5 * gp + 0.5 * gp) for gp in g]
    elif case == "in-place":  # rescaled after backward (DFA's calibration): same tensor, new version
        loss().backward()
        model[2].bias.grad.mul_(3)
        expected[3] = 3 * expected[3]
    elif case == "assigned":  # no backward: every bucket leaves in finish()
        for p, gp in zip(model.parameters(), g):
            p.grad = gp.clone()
    elif case == "unused":  # a parameter without .grad this step is left out and keeps None
        model[2].register_parameter("spare", torch.nn.Parameter(torch.zeros(3)))  # registered last: bucket 0
        ov.close()
        ov = distributed.OverlappedReduction(model, bucket_bytes=160, all_reduce=fake)
        assert [len(b) for b in ov.buckets] == [3, 1, 1]  # [spare, b2, w2] (12 + 16 + 128 bytes), [b1], [w1]
        ov.begin(w)
        loss().backward()
        assert fake.calls == []  # bucket 0 never completes, and the others wait for it
        expected.append(None)
    elif case == "frozen":  # a parameter that does not require grad has no hook and no .grad
        model[0].bias.requires_grad_(False)
        ov.close()
        ov = distributed.OverlappedReduction(model, bucket_bytes=160, all_reduce=fake)
        ov.begin(w)
        loss().backward()
        expected[1] = None
    elif case == "order":  # gradients in registration order: bucket [w1] is complete first, yet leaves last
        sent = []
        ov.close()
        ov = distributed.OverlappedReduction(model, bucket_bytes=160,
                                             all_reduce=lambda t, async_op=False: sent.append(t.numel()) or fake(t, async_op))
        ov.begin(w)
        for i, p in enumerate(model.parameters()):  # w1, b1, w2, b2, one backward call each
            (p * g[i]).sum().backward()
            assert sent == ([] if i < 3 else [4 + 32, 8, 128])  # in bucket order: [b2, w2], [b1], [w1]
    ov.finish()
    stale = case in ("twice", "in-place")
    assert ov.stats["fallbacks"] == int(stale)
    assert fake.calls[[a for a, _ in fake.calls].index(False)][1].tolist() == [float(stale)]
    for p, e in zip(model.parameters(), expected):
        if e is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-7)
    if case in ("assigned", "unused"):  # every bucket left in finish(), then the flag
        assert ov.stats["early"] == 0 and [a for a, _ in fake.calls] == [True] * 3 + [False]
    ov.close()


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
class TwiceBP(BP):
    """BP in two backward calls of half the loss each (the gradient of the loss, in two parts)."""

    name = "test-twice-bp"

    def step(self, x, y, loss_fn):
        out = self.model(x)
        loss = loss_fn(out, y)
        (0.5 * loss).backward(retain_graph=True)
        (0.5 * loss).backward()
        return StepResult(loss.detach(), out.detach())


@register
class TouchBP(BP):
    """BP that, on rank 1 only, touches every ``.grad`` in place after backward (values unchanged)."""

    name = "test-touch-bp"

    def step(self, x, y, loss_fn):
        result = super().step(x, y, loss_fn)
        if self.worker_rank == 1:
            for p in self.model.parameters():
                p.grad.mul_(1.0)
        return result


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
