"""The pipeline-schedule simulator against closed forms and hand-worked timelines, and the
``pipeline`` experiment kind with faked block costs (its table must be the simulator's numbers).

Closed forms for uniform stages (every stage F, B, D per micro-batch; latency c per message):

* GPipe: F_s(m) ends (m + s) F + s c (a forward chain that never waits on its own stage), the
  last forward at (M + S - 1) F + (S - 1) c; the backward chain then runs stage S-1 .. 0 with one
  hop B + c each: total (M + S - 1)(F + B) + 2 (S - 1) c.
* 1F1B, c = 0: (M + S - 1)(F + B), the same as GPipe (it saves memory, not time).
* DFA, c = 0: F_s(m) ends (m + s) F + max(0, m - (S - s)) D, and D_s(j) ends e_j + D with
  e_j = (S + j - 1) F + (j - 1) D (the last stage's F(j)): every op's stage and message constraints
  meet exactly, and in the cool-down each stage waits for e (one every F + D; it needs D). So the
  total is (M + S - 1) F + M D whatever D is against F.
* DFA, 0 < 2c <= D, S >= 2: e_1 = S F + (S - 1) c; the last stage stays bound by its own F + D
  per micro-batch (stage S-2's next forward reaches it 2c + D + F after e_{j-1}, within the F + 2D
  its own D(j-1), F(j), D(j) take when 2c <= D), so e_M = e_1 + (M - 1)(F + D) and every other
  stage ends at e_M + c + D: total (M + S - 1) F + M D + S c.
* DFA, 2c > D: the cycle e_j -> (c) -> D_{S-2}(j) -> F_{S-2}(j+2) -> (c) -> F_{S-1}(j+2) spans two
  micro-batches, so the steady period is max(F + D, F + c + D/2).
"""

import itertools
import random

import pytest
import torch

from bpfree import experiment, models
from bpfree.experiment import pipeline
from bpfree.experiment import pipeline_sim as sim
from bpfree.experiment.pipeline_sim import BlockCost, StageCost
from bpfree.options import OptionError
from bpfree.points import FeedbackPoint


def uniform(S, F, B, D):
    return [StageCost(F, B, D)] * S


SIZES = [(S, M) for S in (1, 2, 3, 4, 5, 8, 16) for M in (1, 2, 3, 4, 7, 8, 16, 32)]


@pytest.mark.parametrize("S, M", SIZES)
def test_bp_schedules_take_m_plus_s_minus_1_slots(S, M):
    for F, B in ((1.0, 2.0), (1.5, 0.75), (3.0, 3.0)):
        res = sim.predict(uniform(S, F, B, 0.5), M)
        assert res["gpipe"].total == pytest.approx((M + S - 1) * (F + B))
        assert res["1f1b"].total == pytest.approx((M + S - 1) * (F + B))
        for c in (0.1, 2.5):
            gpipe = sim.predict(uniform(S, F, B, 0.5), M, c, ("gpipe",))["gpipe"]
            assert gpipe.total == pytest.approx((M + S - 1) * (F + B) + 2 * (S - 1) * c)


@pytest.mark.parametrize("S, M", SIZES)
@pytest.mark.parametrize("F, D", [(2.0, 0.5), (1.0, 1.0), (1.0, 3.0), (0.25, 4.0)])  # D < F, D = F, D > F
def test_dfa_pipeline_takes_m_plus_s_minus_1_forwards_and_m_backwards(S, M, F, D):
    res = sim.predict(uniform(S, F, 9.0, D), M, schedules=("dfa",))["dfa"]
    assert res.total == pytest.approx((M + S - 1) * F + M * D)
    # busy time is M (F + D) on every stage, so the bubble is what is left of the total
    assert res.busy == pytest.approx([M * (F + D)] * S)
    assert res.bubble_fraction == pytest.approx(1 - M * (F + D) / res.total)


@pytest.mark.parametrize("S, M", [(S, M) for S, M in SIZES if S >= 2])
def test_dfa_pipeline_with_message_latency(S, M):
    for F, D, c in ((1.0, 0.5, 0.25), (1.0, 2.0, 1.0), (2.0, 3.0, 0.1)):  # 2c <= D
        res = sim.predict(uniform(S, F, 9.0, D), M, c, ("dfa",))["dfa"]
        assert res.total == pytest.approx((M + S - 1) * F + M * D + S * c)
    if M == 32:  # 2c > D: the steady period, from two micro-batches deep in the steady state
        for F, D, c in ((1.0, 0.5, 0.3), (1.0, 2.0, 3.0), (0.5, 1.0, 0.75)):
            T = [sim.predict(uniform(S, F, 9.0, D), m, c, ("dfa",))["dfa"].total for m in (M, M + 2)]
            assert (T[1] - T[0]) / 2 == pytest.approx(F + max(D, c + D / 2))


@pytest.mark.parametrize("M", [1, 2, 5, 32])
def test_one_stage_is_m_times_forward_plus_backward(M):
    cost = [StageCost(1.25, 2.5, 0.75)]
    res = sim.predict(cost, M, latency=10.0)  # one stage sends no message
    assert res["gpipe"].total == res["1f1b"].total == pytest.approx(M * (1.25 + 2.5))
    assert res["dfa"].total == pytest.approx(M * (1.25 + 0.75))
    assert all(r.bubble_fraction == pytest.approx(0.0) for r in res.values())
    assert sim.orders("1f1b", 1, M) == [[k for m in range(M) for k in (("F", m), ("B", m))]]
    assert sim.orders("dfa", 1, M) == [[k for m in range(M) for k in (("F", m), ("D", m))]]


@pytest.mark.parametrize("S, M", SIZES)
def test_peak_activations_are_the_stated_counts(S, M):
    res = sim.predict(uniform(S, 1.0, 2.0, 0.5), M)
    assert res["gpipe"].peak_activations == [M] * S
    assert res["1f1b"].peak_activations == [min(S - s, M) for s in range(S)]
    assert res["dfa"].peak_activations == [min(S - 1 - s + 1, M) for s in range(S)]  # w_s + 1, bounded by M
    per_micro = [10.0 * (s + 1) for s in range(S)]
    assert sim.activation_bytes(res["gpipe"], per_micro) == [M * b for b in per_micro]


@pytest.mark.parametrize("S, M", [(2, 2), (4, 4), (4, 8), (8, 32), (16, 16)])
def test_1f1b_order_has_torch_schedule1f1b_warmup(S, M):
    # torch 2.13, torch/distributed/pipelining/schedules.py, Schedule1F1B._step_microbatches:
    # warmup_chunks = min(n_microbatches, num_stages - stage_index) forwards, then 1B1F pairs (it
    # needs M >= S); its _get_pipeline_order writes (S - 1 - rank) forwards, then F, B pairs.
    for s, seq in enumerate(sim.orders("1f1b", S, M)):
        first_b = next(i for i, (k, _) in enumerate(seq) if k == "B")
        assert first_b == min(M, S - s)
        assert seq[:first_b] == [("F", m) for m in range(first_b)]
        steady = seq[first_b - 1 : first_b - 1 + 2 * (M - (S - 1 - s))]
        assert steady == [x for i in range(M - (S - 1 - s)) for x in (("F", S - 1 - s + i), ("B", i))]


def test_a_two_stage_case_worked_by_hand():
    # S = 2, M = 3, c = 0.5. Stage 0: F = 1, B = 3, D = 1; stage 1 (with the head): F = 2, B = 2, D = 1.5.
    costs = [StageCost(1.0, 3.0, 1.0), StageCost(2.0, 2.0, 1.5)]
    res = sim.predict(costs, 3, latency=0.5)
    t = {k: r.times for k, r in res.items()}
    # GPipe. s0: F0 [0,1] F1 [1,2] F2 [2,3]. s1: F0 waits 1+.5 -> [1.5,3.5], F1 [3.5,5.5],
    # F2 [5.5,7.5], B0 [7.5,9.5], B1 [9.5,11.5], B2 [11.5,13.5]. s0: B0 waits 9.5+.5 -> [10,13],
    # B1 (12 <= 13) [13,16], B2 (14 <= 16) [16,19]. Total 19.
    assert t["gpipe"][(1, "F", 0)] == (1.5, 3.5) and t["gpipe"][(0, "B", 0)] == (10.0, 13.0)
    assert res["gpipe"].total == 19.0
    assert res["gpipe"].bubble_fraction == pytest.approx(1 - (12 + 12) / (2 * 19))
    # 1F1B: s0 runs F0 F1 B0 F2 B1 B2, s1 F0 B0 F1 B1 F2 B2. s0: F0 [0,1], F1 [1,2]; s1: F0 [1.5,3.5],
    # B0 [3.5,5.5]; s0: B0 waits 5.5+.5 -> [6,9], F2 [9,10]; s1: F1 (2.5 <= 5.5) [5.5,7.5], B1 [7.5,9.5],
    # F2 waits 10+.5 -> [10.5,12.5], B2 [12.5,14.5]; s0: B1 waits 9.5+.5=10 -> [10,13], B2 waits
    # 14.5+.5 -> [15,18]. Total 18.
    assert t["1f1b"][(0, "F", 2)] == (9.0, 10.0) and t["1f1b"][(1, "F", 2)] == (10.5, 12.5)
    assert res["1f1b"].total == 18.0
    # DFA: s0 runs F0 F1 D0 F2 D1 D2, s1 F0 D0 F1 D1 F2 D2; s0's D(m) waits for s1's F(m) + .5.
    # s0: F0 [0,1], F1 [1,2]; s1: F0 [1.5,3.5], D0 [3.5,5], F1 (2.5 <= 5) [5,7], D1 [7,8.5];
    # s0: D0 waits 3.5+.5 -> [4,5], F2 [5,6], D1 waits 7+.5 -> [7.5,8.5]; s1: F2 (6.5 <= 8.5)
    # [8.5,10.5], D2 [10.5,12]; s0: D2 waits 10.5+.5 -> [11,12]. Total 12.
    assert t["dfa"][(0, "D", 0)] == (4.0, 5.0) and t["dfa"][(1, "F", 2)] == (8.5, 10.5)
    assert res["dfa"].total == 12.0
    assert res["dfa"].busy == [6.0, 10.5]
    assert [r.peak_activations for r in res.values()] == [[3, 3], [2, 1], [2, 1]]
    assert sim.predict_two_stage([(1.0, 3.0, 1.0), (2.0, 2.0, 1.5)], 3, latency=0.5) == pytest.approx(18 / 12)
    assert sim.predict_two_stage(costs, 3, latency=0.5, baseline="gpipe") == pytest.approx(19 / 12)


@pytest.mark.parametrize("schedule", sim.SCHEDULES)
def test_every_op_starts_when_its_stage_and_its_dependencies_let_it(schedule):
    rng = random.Random(0)
    for S, M in ((2, 3), (3, 8), (5, 2), (6, 11)):
        costs = [StageCost(rng.uniform(0.1, 2), rng.uniform(0.1, 4), rng.uniform(0.1, 2)) for _ in range(S)]
        c = rng.uniform(0, 0.5)
        res = sim.predict(costs, M, c, (schedule,))[schedule]
        back = "D" if schedule == "dfa" else "B"
        for s, ops in enumerate(res.ops):
            # each stage runs every micro-batch's forward once and then, later, its backward once
            assert sorted((op.kind, op.micro) for op in ops) == sorted((k, m) for m in range(M) for k in ("F", back))
            for m in range(M):
                assert ops.index(next(o for o in ops if o.key == (s, "F", m))) < ops.index(
                    next(o for o in ops if o.key == (s, back, m)))
            previous_end = 0.0
            for op in ops:
                start, end = res.times[op.key]
                assert end == pytest.approx(start + op.duration)
                # the dependencies the schedules are defined by (module docstring of pipeline_sim)
                m, last = op.micro, S - 1
                expected = {"F": [((s - 1, "F", m), c)] if s > 0 else [],
                            "B": [((s + 1, "B", m), c)] if s < last else [((s, "F", m), 0.0)],
                            "D": [((last, "F", m), c if s < last else 0.0)]}[op.kind]
                assert list(op.deps) == expected
                if schedule == "dfa":
                    assert all(dk == "F" for (_, dk, _), _ in op.deps)  # no DFA op waits on a backward
                ready = [previous_end] + [res.times[d][1] + lag for d, lag in op.deps]
                assert start == pytest.approx(max(ready))  # as early as its stage and its messages allow
                assert start >= previous_end - 1e-12
                previous_end = end
        assert res.total == pytest.approx(max(e for _, e in res.times.values()))


def test_orders_that_deadlock_are_refused():
    ops = sim.build_ops("1f1b", uniform(2, 1, 1, 1), 2)
    ops[1] = [ops[1][1], ops[1][0]] + ops[1][2:]  # the last stage's B(0) before its own F(0)
    with pytest.raises(ValueError, match="deadlock"):
        sim.simulate(ops)


def test_partition_minimises_the_largest_stage():
    assert sim.partition([5, 1, 1, 1, 5], 3) == [(0, 1), (1, 4), (4, 5)]
    assert sim.partition([5, 1, 1, 1, 5], 2) == [(0, 2), (2, 5)]  # 6 | 7 and 7 | 6 tie at 7: earliest cut
    assert sim.partition([1, 2, 3], 3) == [(0, 1), (1, 2), (2, 3)]
    rng = random.Random(1)
    for _ in range(30):  # against every way of cutting
        n, S = rng.randint(1, 8), None
        w = [rng.uniform(0, 5) for _ in range(n)]
        S = rng.randint(1, n)
        best = min(max(sum(w[a:b]) for a, b in zip((0,) + cuts, cuts + (n,)))
                   for cuts in itertools.combinations(range(1, n), S - 1))
        got = sim.partition(w, S)
        assert got[0][0] == 0 and got[-1][1] == n and all(a < b for a, b in got)
        assert all(got[i][1] == got[i + 1][0] for i in range(S - 1))
        assert max(sum(w[a:b]) for a, b in got) == pytest.approx(best)
    with pytest.raises(ValueError):
        sim.partition([1, 2], 3)


def test_stage_costs_take_the_first_blocks_weight_backward_and_put_the_head_last():
    blocks = [BlockCost(1, 10, 3, weight_backward=4, activation_bytes=100, shared_bytes=0),
              BlockCost(2, 20, 5, activation_bytes=50, shared_bytes=20),
              BlockCost(3, 30, 7, activation_bytes=60, shared_bytes=25, dfa_activation_bytes=40, dfa_shared_bytes=5)]
    head = BlockCost(0.5, 1.5, 1.0, activation_bytes=8, shared_bytes=6)
    costs = sim.stage_costs(blocks, [(0, 2), (2, 3)], head)
    assert costs == [StageCost(3, 4 + 20, 8), StageCost(3.5, 31.5, 8.0)]
    assert sim.stage_activation_bytes(blocks, [(0, 2), (2, 3)], head) == [100 + 50 - 20, 60 + 8 - 6]
    assert sim.stage_activation_bytes(blocks, [(0, 1), (1, 3)], head, "dfa") == [100, 50 + 40 - 5 + 8 - 6]
    # S above the number of blocks: S copies of the mean block, one per stage
    st, mem, bounds, replicated = sim.model_stages(blocks, 5, head)
    assert replicated and bounds == [(k, k + 1) for k in range(5)]
    assert st[0] == StageCost(2, (4 + 20 + 30) / 3, 5) and st[1] == StageCost(2, 20, 5)
    assert st[4] == StageCost(2.5, 21.5, 6)
    assert mem[1] == pytest.approx(70) and mem[4] == pytest.approx(70 + 8 - 6)
    # balancing on F + B (block 0 with its W): 5, 22, 33 + 2 (head); the best cut is 27 | 35
    st, _, bounds, replicated = sim.model_stages(blocks, 2, head)
    assert not replicated and bounds == [(0, 2), (2, 3)]


# -- the experiment kind -----------------------------------------------------------------------------
FAKE = dict(forward=2.0, backward=3.0, weight_backward=3.0, dfa_backward=1.0, activation_bytes=2 * 2**20,
            shared_bytes=0.0, dfa_activation_bytes=2 * 2**20, dfa_shared_bytes=0.0)
FREE_HEAD = dict(FAKE, forward=0.0, backward=0.0, weight_backward=0.0, dfa_backward=0.0, activation_bytes=0.0,
                 dfa_activation_bytes=0.0)

SPEC = """
title = "pipe"
kind = "pipeline"
questions = ["Q6"]
description = "fake costs"
published = [{ source = "df-lnpu", claim = "pipelined" }]
[base]
dataset = "blobs-test"
device = "cpu"
batch_size = 16
[pipeline]
stages = [2, 4, 8]
microbatches = [4, 16]
repeats = 1
warmup = 0
[scales.quick]
assumed = "faked"
[scales.full]
assumed = "faked"
[[variants]]
name = "four blocks"
model = "mlp"
widths = [8, 8, 8, 8]
"""


def test_pipeline_table_is_the_simulators_prediction_from_the_measured_costs(tmp_path, monkeypatch):
    seen = []

    def fake_measure(model, x, y, loss_fn, repeats, warmup, generator, optimizer=None):
        blocks, head, names = pipeline.split_blocks(model)
        seen.append((len(blocks), x.shape))
        return {"blocks": [dict(FAKE, name=n) for n in names], "head": dict(FREE_HEAD, name="head+loss")}

    monkeypatch.setattr(pipeline, "measure", fake_measure)
    (tmp_path / "experiments").mkdir()
    path = tmp_path / "experiments" / "pipe.toml"
    path.write_text(SPEC)
    doc = experiment.run(experiment.load_spec(path), "quick", out=tmp_path, progress=False, echo=lambda s: None)
    assert seen == [(4, torch.Size([16, 16]))]  # the mlp's four blocks, one micro-batch of 16 blob samples
    rows = {(r["S"], r["M"]): r for r in doc["rows"]}
    assert set(rows) == {(S, M) for S in (2, 4, 8) for M in (4, 16)}
    for (S, M), r in rows.items():
        k = 4 // S if S <= 4 else 1  # blocks per stage; S = 8 > 4 blocks: 8 replicated mean blocks
        assert r["replicated"] == (S > 4) and r["layout_bp"] == [k] * S
        F, B, D = 2.0 * k, 3.0 * k, 1.0 * k  # the head is free, the first block's W equals its B
        assert r["ms"]["gpipe"] == pytest.approx((M + S - 1) * (F + B))
        assert r["ms"]["1f1b"] == pytest.approx((M + S - 1) * (F + B))
        assert r["ms"]["dfa"] == pytest.approx((M + S - 1) * F + M * D)
        assert r["ratio_1f1b"] == pytest.approx((M + S - 1) * (F + B) / ((M + S - 1) * F + M * D))
        assert r["peak_mb"] == pytest.approx({"gpipe": M * 2 * k, "1f1b": min(S, M) * 2 * k, "dfa": min(S, M) * 2 * k})
    table = (tmp_path / "pipe" / "quick" / "table.md").read_text()
    # S = 2, M = 4: F = 4, B = 6, D = 2 per stage: 5 x 10 = 50 ms; DFA 5 x 4 + 4 x 2 = 28 ms; 50/28 = 1.79
    assert "| four blocks | 2 | 4 | 2+2 | 50.0 | 50.0 | 28.0 | 1.79 | 1.79 |" in table
    assert "| four blocks | 8 | 16 | replicated (8 × mean block) |" in table
    # render from results.json alone gives the same table
    (tmp_path / "pipe" / "quick" / "table.md").unlink()
    experiment.render(experiment.load_spec(path), "quick", out=tmp_path, echo=lambda s: None)
    assert (tmp_path / "pipe" / "quick" / "table.md").read_text() == table


def test_measured_blocks_save_what_their_layers_need(tmp_path):
    torch.manual_seed(0)
    model = models.create("mlp", (1, 28, 28), 10, widths=(8, 8), activation="tanh")
    n = 4
    x, y = torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))
    out = pipeline.measure(model, x, y, torch.nn.functional.cross_entropy, 2, 1, torch.Generator().manual_seed(0))
    b0, b1 = out["blocks"]
    assert [b["name"] for b in out["blocks"]] == ["0..3", "4..6"]  # Flatten, Linear, Tanh, point | Linear, Tanh, point
    # Linear saves its input (for the weight gradient), Tanh its output: float32, batch n
    assert b0["activation_bytes"] == b0["dfa_activation_bytes"] == 4 * n * (784 + 8) and b0["shared_bytes"] == 0
    assert b1["activation_bytes"] == 4 * n * (8 + 8) and b1["shared_bytes"] == 4 * n * 8  # h_1, saved by both
    for b in out["blocks"] + [out["head"]]:
        assert all(b[k] > 0 for k in ("forward", "backward", "weight_backward", "dfa_backward"))
    assert not any(p.grad is not None for p in model.parameters())  # measuring leaves no gradient behind


def test_models_without_top_level_points_are_refused():
    model = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 4), FeedbackPoint()), torch.nn.Linear(4, 2))
    with pytest.raises(OptionError, match="top level"):
        pipeline.split_blocks(model)


@pytest.mark.parametrize("S,M", [(1, 3), (2, 4), (4, 8)])
def test_the_optimizer_step_ends_every_stage_once(S, M):
    # each stage runs its update U right after its own last op, and the step ends when the last
    # stage ends: the closed forms plus U, for both schedules; U holds no activation
    F, B, D, U = 1.0, 2.0, 0.75, 5.0
    plain = sim.predict(uniform(S, F, B, D), M, schedules=("1f1b", "dfa"))
    stages = [StageCost(F, B, D, update=U) for _ in range(S)]
    res = sim.predict(stages, M, schedules=("1f1b", "dfa"))
    assert res["1f1b"].total == pytest.approx((M + S - 1) * (F + B) + U)
    assert res["dfa"].total == pytest.approx((M + S - 1) * F + M * D + U)
    for name in res:
        assert res[name].peak_activations == plain[name].peak_activations
        assert [b - a for a, b in zip(plain[name].busy, res[name].busy)] == pytest.approx([U] * S)
    # stage_costs sums the blocks' updates (the head's on the last stage)
    blocks = [BlockCost(1, 2, 1, update=0.5), BlockCost(1, 2, 1, update=1.5)]
    assert [c.update for c in sim.stage_costs(blocks, [(0, 1), (1, 2)], BlockCost(0, 0, 0, update=0.25))] == [0.5, 1.75]
