"""Pipeline parallelism: the split, the micro-batches, and 2- and 3-stage pipelines (gloo) against one process.

Expected values come from what the pipeline is meant to compute:

* the split balances multiply-accumulates: for an MLP 784-64-48-32-24-10 the per-sample cost of a
  ``Linear(a, b)`` is ``a*b`` plus ``b`` for each element-wise layer after it, so the stage costs are
  those sums over the children of each stage, and the chosen cuts minimise the largest one (checked
  against every allowed cut by brute force);
* the mean loss over the batch is the weighted sum of the micro-batches' mean losses
  (``w_m = n_m / n``), so each micro-batch's ``e_m`` (and BP's gradients) summed over the
  micro-batches is the whole batch's, and a pipeline of DFA, DRTP, GrAPE (tangents forward) or BP
  ends with the weights of one process on the same batches, to float rounding, with ``B_l``
  identical on every rank to the single process's: every rank creates every ``B_l`` and draws every
  point's tangents from the method's stream in forward order, as one process does;
* GrAPE's ``Jbar`` after the steps equals the single process's on every rank.

All pipelined scenarios run in one spawn per world size (one start-up of torch each).
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import conftest  # noqa: F401  (registers blobs-test)
from bpfree import distributed, methods, models
from bpfree.options import OptionError
from bpfree.pipeline import PipelineError, _balanced_cuts, make_pipeline, microbatches, split_model
from bpfree.train.config import resolve
from bpfree.train.loop import train

WIDTHS = (64, 48, 32, 24)
STEPS = 5
SCENARIOS = {
    "dfa": ("dfa", {}),
    "drtp": ("drtp", {}),
    "grape": ("grape", {"tangents": "forward", "every": 2, "samples": 10}),
    "grape-central": ("grape", {"tangents": "central", "every": 2, "samples": 10}),
    # the 2025 rule adds noise from the method's stream at every update: the stream stays in step
    "grape-noise": ("grape", {"tangents": "forward", "rule": "rescale", "noise": 1e-2, "every": 1, "eta": 0.1}),
    "bp-1f1b": ("bp", {}),
    "bp-gpipe": ("bp", {}),
}


def build(method: str, options: dict):
    torch.manual_seed(0)
    model = models.create("mlp", (1, 28, 28), 10, widths=WIDTHS, activation="tanh")
    return model, methods.create(method, model, **options)


def batches(n: int = 22):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)) for _ in range(STEPS)]


def single_process(method: str, options: dict):
    model, m = build(method, options)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches():
        opt.zero_grad(set_to_none=True)
        m.step(x, y, nn.functional.cross_entropy)
        opt.step()
    return model, m


def _pipelined(out: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for name, (method, options) in SCENARIOS.items():
        model, m = build(method, options)
        data = batches()
        pipe = make_pipeline(m, model, world, rank, 3, data[0][0], torch.device("cpu"),
                             schedule="gpipe" if name == "bp-gpipe" else "1f1b")
        opt = torch.optim.SGD(pipe.module.parameters(), lr=0.1)
        losses = []
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            result = pipe.step(x, y, nn.functional.cross_entropy)
            opt.step()
            losses.append(float(result.loss))
        state = {k: v.tolist() for k, v in pipe.module.state_dict().items()}
        feedback = {k: v.tolist() for k, v in m.state.get("feedback", {}).items()}
        jbar = {k: v.tolist() for k, v in m.jacobian_estimates().items()}
        results[name] = {"state": state, "feedback": feedback, "jbar": jbar, "losses": losses,
                         "points": pipe.split.points[rank]}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_a_pipeline_ends_with_the_single_process_weights_and_feedback(tmp_path, world):
    out = str(tmp_path / "pipe")
    distributed.spawn(world, _pipelined, out)
    ranks = [json.load(open(f"{out}.{r}")) for r in range(world)]
    for name, (method, options) in SCENARIOS.items():
        model, m = single_process(method, options)
        reference = model.state_dict()
        seen = set()
        for r, got in enumerate(ranks):
            got = got[name]
            assert got["state"], f"{name}: rank {r} trains no parameters"
            for key, value in got["state"].items():
                torch.testing.assert_close(torch.tensor(value), reference[key], atol=1e-5, rtol=0,
                                           msg=lambda s: f"{name}, rank {r}, {key}: {s}")
                seen.add(key)
            # every rank holds every B_l, the single process's (a difference divides rounding by 2 step)
            for key, value in got["feedback"].items():
                torch.testing.assert_close(torch.tensor(value), m.state.feedback[key], atol=1e-5, rtol=0)
            for key, value in got["jbar"].items():
                torch.testing.assert_close(torch.tensor(value), m.jacobian_estimates()[key], atol=1e-5, rtol=0)
            if method == "grape":
                assert set(got["jbar"]) == set(m.jacobian_estimates()) and got["jbar"]
        assert seen == set(reference), f"{name}: the stages together train every parameter once"
        # every rank reports the batch's mean loss, the last stage's
        assert all(ranks[r][name]["losses"] == ranks[0][name]["losses"] for r in range(world))
    # each stage owns at least one point, and the points are split in forward order
    order = [p for r in range(world) for p in ranks[r]["dfa"]["points"]]
    assert order == [n for n, _ in build("dfa", {})[1].points]


def mlp_costs(widths=WIDTHS, inputs=784, classes=10):
    """The MAC estimate per top-level child of the zoo MLP: Flatten (784 element-wise), then per
    hidden layer Linear (a*b), Tanh (b), FeedbackPoint (b), then the head Linear."""
    costs, a = [float(inputs)], inputs
    for b in widths:
        costs += [float(a * b), float(b), float(b)]
        a = b
    return costs + [float(a * classes)]


def test_the_split_balances_the_largest_stage_over_every_allowed_cut():
    model, _ = build("dfa", {})
    costs = mlp_costs()
    children = list(model.children())
    allowed = [i for i, c in enumerate(children[:-1]) if type(c).__name__ == "FeedbackPoint"]
    for stages in (2, 3, 4):
        split = split_model(model, stages, torch.randn(2, 1, 28, 28), balance="macs")
        best = min(max(sum(costs[a:b]) for a, b in zip((0,) + tuple(c + 1 for c in cut),
                                                      tuple(c + 1 for c in cut) + (len(costs),)))
                   for cut in itertools.combinations(allowed, stages - 1))
        assert max(split.costs) == pytest.approx(best)
        assert sum(split.costs) == pytest.approx(sum(costs))
        assert [b - a for a, b in split.bounds] and split.bounds[0][0] == 0 and split.bounds[-1][1] == len(children)
        assert all(split.bounds[i][1] == split.bounds[i + 1][0] for i in range(stages - 1))
        # the boundaries carry the width of the point they are cut at; the output is (10,)
        assert all(len(shape) == 1 and shape[0] in WIDTHS for shape in split.boundary)
        assert split.output == (10,)
        assert split.point_shapes == {n: (w,) for n, w in zip(split.owner(), WIDTHS)}


def test_balanced_cuts_by_hand():
    # costs 5 | 1 1 | 4 | 2 2, cuts allowed after children 0, 2, 3: two stages -> {0..2 | 3..5}
    # (7 vs 8: after 0 gives 5 vs 10, after 3 gives 11 vs 4); three stages -> after 0 and 3 (5, 6, 4)
    assert _balanced_cuts([5, 1, 1, 4, 2, 2], [0, 2, 3], 2) == [2]
    assert _balanced_cuts([5, 1, 1, 4, 2, 2], [0, 2, 3], 3) == [0, 3]


def test_microbatches_split_like_tensor_split_with_their_share_of_the_batch():
    x, y = torch.arange(10.0)[:, None], torch.arange(10)
    parts = microbatches(x, y, 4)
    assert [p[0].shape[0] for p in parts] == [3, 3, 2, 2]
    assert [p[2] for p in parts] == [0.3, 0.3, 0.2, 0.2]
    assert torch.equal(torch.cat([p[1] for p in parts]), y)
    assert len(microbatches(x[:2], y[:2], 4)) == 2  # never an empty micro-batch


def test_what_a_pipeline_cannot_split_or_train_is_refused_in_one_line():
    x = torch.randn(2, 1, 28, 28)
    model, fa = build("fa", {})
    with pytest.raises(PipelineError, match="method 'fa' has no pipeline schedule"):
        make_pipeline(fa, model, 2, 0, 2, x, torch.device("cpu"))
    with pytest.raises(PipelineError, match="need 4 cuts"):
        split_model(models.create("mlp", (1, 28, 28), 10, widths=(8, 8)), 5, x)
    with pytest.raises(PipelineError, match="at least 2 stages"):
        split_model(model, 1, x)
    with pytest.raises(PipelineError, match="nn.Sequential"):
        split_model(models.create("resnet20", (3, 32, 32), 10), 2, torch.randn(2, 3, 32, 32))
    for options, match in (({"estimator": "train-pass"}, "tangents carried through the stages"),
                           ({"tangents": "onesided"}, "tangents carried through the stages"),
                           ({"calibrate_every": 5}, "calibration")):
        model, m = build("grape", options)
        with pytest.raises(OptionError, match=match):
            make_pipeline(m, model, 2, 0, 2, x, torch.device("cpu"))


# --------------------------------------------------------------------------- the training loop

HELPER = Path(__file__).with_name("_blobs_cli.py")
LOOP_ARGS = ["--dataset", "blobs-test", "--epochs", "3", "--batch-size", "16", "--limit-train", "160",
             "--limit-test", "64", "--lr", "0.01", "--set", "widths=16,16", "--set", "checkpoint_every=1",
             "--set", "log_every=3", "--set", "microbatches=3", "--pipeline", "2", "--no-progress"]


def cli(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), **(env or {}))
    return subprocess.Popen([sys.executable, str(HELPER), "train", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, **popen)


def checkpoint(path: Path) -> dict:
    return torch.load(path / "checkpoint.pt", weights_only=False)


@pytest.mark.parametrize("method", ["grape", pytest.param("bp", marks=pytest.mark.slow)])
def test_a_pipeline_run_killed_with_sigkill_resumes_to_the_uninterrupted_weights(tmp_path, method):
    """The whole job (both stage processes) killed with SIGKILL once checkpoints flow, resumed with
    ``--resume`` (which starts the two stages again): the weights, ``B_l``, the optimizer state and
    the metrics equal an uninterrupted pipeline run's, and the weights a single process's."""
    ref, out = tmp_path / "ref", tmp_path / "killed"
    done = cli("--method", method, *LOOP_ARGS, "--out", str(ref))
    killed = cli("--method", method, *LOOP_ARGS, "--out", str(out), env={"BPFREE_TEST_HOLD_AFTER": "4"})
    deadline = time.monotonic() + 120
    step = -1
    while time.monotonic() < deadline and killed.poll() is None and step < 3:
        time.sleep(0.05)
        try:
            step = checkpoint(out)["state"]["global_step"]
        except Exception:
            pass
    assert killed.poll() is None, killed.stderr.read().decode()
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(timeout=60)
    assert done.wait(timeout=300) == 0, done.stderr.read().decode()
    assert 0 < checkpoint(out)["state"]["global_step"] < 30
    resumed = cli("--resume", str(out), "--no-progress")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()
    a, b = checkpoint(out), checkpoint(ref)
    assert a["state"]["global_step"] == b["state"]["global_step"] == 30
    for key in b["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], atol=1e-6, rtol=0)
    for key in b["method"].get("feedback", {}):
        torch.testing.assert_close(a["method"]["feedback"][key], b["method"]["feedback"][key], atol=1e-6, rtol=0)
    assert a["optimizer"]["by_name"].keys() == b["optimizer"]["by_name"].keys() == b["model"].keys() - {
        k for k in b["model"] if not k.endswith(("weight", "bias"))}
    strip = lambda p: [{k: round(v, 5) if isinstance(v, float) else v for k, v in json.loads(l).items()
                        if k != "train_seconds"} for l in (p / "metrics.jsonl").read_text().splitlines()]
    assert strip(out) == strip(ref)
    # and a single process on the same batches (GrAPE's pipelined estimate is the central difference)
    cfg = resolve({"run": {"method": method, "dataset": "blobs-test", "epochs": 3, "batch_size": 16,
                           "limit_train": 160, "limit_test": 64, "lr": 0.01, "log_every": 3},
                   "model": {"widths": [16, 16]}, "method": {"tangents": "central"} if method == "grape" else {}})
    single = train(cfg, tmp_path / "single", progress=False)
    assert single["steps"] == 30
    for key, value in checkpoint(tmp_path / "single")["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- BatchNorm: per micro-batch

BN_STEPS, BN_MICRO = 3, 4


def bn_build(method: str):
    torch.manual_seed(0)
    model = models.create("cnn", (1, 28, 28), 10, channels=(4, 8), hidden=16)
    return model, methods.create(method, model)


def bn_batches():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(24, 1, 28, 28, generator=g), torch.randint(0, 10, (24,), generator=g))
            for _ in range(BN_STEPS)]


def _pipelined_bn(out: str) -> None:
    rank = dist.get_rank()
    results = {}
    for method in ("dfa", "bp"):
        model, m = bn_build(method)
        data = bn_batches()
        pipe = make_pipeline(m, model, 2, rank, BN_MICRO, data[0][0], torch.device("cpu"))
        opt = torch.optim.SGD(pipe.module.parameters(), lr=0.1)
        for x, y in data:
            opt.zero_grad(set_to_none=True)
            pipe.step(x, y, nn.functional.cross_entropy)
            opt.step()
        results[method] = {k: v.tolist() for k, v in pipe.module.state_dict().items()}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(results, f)


def test_with_batchnorm_a_pipeline_is_one_process_accumulating_the_same_micro_batches(tmp_path):
    """BatchNorm normalises each micro-batch with its own statistics and moves its running
    statistics once per micro-batch, so the reference is one process that runs the micro-batches in
    turn, ``loss_m = w_m L`` each, accumulating ``.grad``: DFA's pipeline and BP's (whose library
    must not move the statistics when it learns the stages' shapes) end with its weights and
    running statistics."""
    out = str(tmp_path / "bn")
    distributed.spawn(2, _pipelined_bn, out)
    got = {}
    for r in range(2):
        for method, state in json.load(open(f"{out}.{r}")).items():
            got.setdefault(method, {}).update(state)
    for method in ("dfa", "bp"):
        model, m = bn_build(method)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for x, y in bn_batches():
            opt.zero_grad(set_to_none=True)
            for xm, ym, w in microbatches(x, y, BN_MICRO):
                m.step(xm, ym, lambda out, t, w=w: nn.functional.cross_entropy(out, t) * w)
            opt.step()
        reference = model.state_dict()
        assert set(got[method]) == set(reference)
        for key, value in reference.items():
            torch.testing.assert_close(torch.tensor(got[method][key], dtype=value.dtype), value, atol=1e-5, rtol=0,
                                       msg=lambda s: f"{method}, {key}: {s}")


def test_the_error_leaves_the_tap_before_any_block_runs_its_backward():
    # the last stage sends e from Delivery.on_error: it must be called with e = dL/dy (autograd's,
    # recomputed here) before any block's weight gradient exists, the head's included
    model, dfa = build("dfa", {})
    x, y = batches()[0]
    dfa.step(x, y, nn.functional.cross_entropy)  # makes B_l: later steps link every point
    model.zero_grad(set_to_none=True)
    events = []
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, nn.Linear)):
        layer.weight.register_post_accumulate_grad_hook(lambda p, i=i: events.append(("grad", i)))
    record = dfa.forward_cut(x)
    record.delivery.on_error = lambda e: events.append(("e", e.detach().clone()))
    out = record.output
    dfa.deliver(record, nn.functional.cross_entropy(out, y))
    assert events[0][0] == "e" and sum(1 for k, _ in events if k == "grad") == len(WIDTHS) + 1
    y0 = out.detach().requires_grad_()
    torch.testing.assert_close(events[0][1], torch.autograd.grad(nn.functional.cross_entropy(y0, y), y0)[0])


def _dkp_stages(root: str) -> None:
    from bpfree.train.loop import Run

    cfg = resolve({"run": {"method": "dkp", "dataset": "blobs-test", "epochs": 1, "batch_size": 16, "limit_train": 64,
                           "limit_test": 32, "pipeline": 2, "microbatches": 2}, "model": {"widths": [16, 16]}})
    run = Run(cfg, Path(root) / "run", progress=False)
    run.fit()
    torch.save({"feedback": dict(run.method.state.feedback), "points": run.parallel.pipeline.split.points[dist.get_rank()]},
               Path(root) / f"rank{dist.get_rank()}.pt")


def test_the_checkpoint_takes_each_feedback_matrix_from_the_stage_that_owns_its_point(tmp_path):
    # DKP moves B_l from (h_l, e) on the stage that holds point l, so the ranks' copies differ: the
    # one checkpoint holds, for every point, its owner's B_l (and differs from the other rank's)
    distributed.spawn(2, _dkp_stages, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    saved = checkpoint(tmp_path / "run")["method"]["feedback"]
    assert sorted(ranks[0]["points"] + ranks[1]["points"]) == sorted(saved)
    for r, other in ((0, 1), (1, 0)):
        for name in ranks[r]["points"]:
            assert torch.equal(saved[name], ranks[r]["feedback"][name])
            assert not torch.equal(saved[name], ranks[other]["feedback"][name])
