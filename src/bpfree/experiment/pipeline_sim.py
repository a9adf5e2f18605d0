"""A pipeline-schedule simulator: step time, bubbles and activation memory of BP and DFA pipelines.

Pure Python (no torch). A network cut into ``S`` stages, one processor each, trains on ``M``
micro-batches per optimizer step. Stage ``s`` (0-based, ``s = 0 .. S-1``) costs, per micro-batch,

* ``F_s``: its forward pass (the last stage's includes the head and the loss, and so the output
  error ``e = dL/dy``, which is ready when its forward ends);
* ``B_s``: its BP backward, weight *and* input gradients (stage 0 needs no input gradient);
* ``D_s``: its DFA backward, weight gradients only: the signal ``B_l e`` projected from ``e``, the
  block input detached, no input gradient leaves the stage (the last stage's includes the head's
  own backward).

A message between stages (an activation forward, an input gradient back, ``e`` broadcast from the
last stage) lands ``c`` (``latency``) after the operation that produced it ends. Each stage runs
its operations in a fixed order; an operation starts when the previous one on its stage has ended
and its dependencies have ended (``+ c`` for those on another stage):
``start = max(end of the previous op on the stage, max over deps of (end + lag))``,
``end = start + duration``. :func:`simulate` computes these by list scheduling.

Schedules (:func:`orders`; micro-batches 0-based below, ``w_s`` the warm-up forwards):

``gpipe``
    every stage: ``F(0..M-1)`` then ``B(0..M-1)`` (torch's ``ScheduleGPipe`` order).
    ``F_s(m)`` needs ``F_{s-1}(m)``; ``B_s(m)`` needs ``B_{s+1}(m)`` (the input gradient).
    Peak activations on every stage: ``M`` micro-batches.
``1f1b``
    the non-interleaved 1F1B of PipeDream-flush and ``torch.distributed.pipelining.Schedule1F1B``:
    ``w_s = min(S-1-s, M)`` warm-up forwards, then ``(F, B)`` pairs, then the remaining backwards.
    Dependencies as GPipe's. Peak activations: ``min(S-s, M)``.
    (torch 2.13's ``Schedule1F1B._step_microbatches`` runs ``min(M, S - stage_index)`` forwards and
    then "1B1F" pairs; its ``_get_pipeline_order`` writes ``S-1-rank`` forwards then 1F1B pairs:
    the same order. It refuses ``M < S``; the simulator does not.)
``dfa``
    bpfree's schedule, ``w_s = S-1-s``: ``for m in 0..M-1: F(m); if m >= w_s: D(m - w_s)``, then
    the remaining ``D`` in order. ``F_s(m)`` needs ``F_{s-1}(m)``; ``D_s(m)`` needs ``e_m``, the end
    of ``F_{S-1}(m)`` (``+ c`` off the last stage). No stage waits on another's backward.
    Peak activations: ``min(w_s + 1, M)``.

Closed forms, uniform costs ``F``, ``B``, ``D`` (the tests check them):

* GPipe: ``(M + S - 1)(F + B) + 2 (S - 1) c``.
* 1F1B, ``c = 0``: ``(M + S - 1)(F + B)``.
* DFA, ``c = 0``: ``(M + S - 1) F + M D`` for every ``M >= 1`` and both ``D <= F`` and ``D > F``.
  Why: ``F_s(m)`` ends at ``(m + s) F + max(0, m - (S - s)) D`` and ``D_s(j)`` at
  ``e_j + D = (S + j - 1) F + j D``; every op's two constraints (its stage, its message) meet
  exactly in the steady state, and in the cool-down a stage waits for ``e`` (``e`` comes every
  ``F + D``, a stage needs ``D``). The last op is ``D_s(M)`` on every stage.

Results (:class:`Result`): total time (end of the last op), per-stage busy time, per-stage and
overall bubble fraction (``1 - busy / total``; overall ``1 - sum(busy) / (S total)``), and the peak
number of micro-batches whose activations a stage holds (``+1`` at a forward, ``-1`` at its
backward), which :func:`activation_bytes` turns into bytes with a measured size per micro-batch.

Stages from measured blocks: :func:`partition` cuts a list of per-block costs into ``S`` contiguous
stages minimising the largest stage cost; :func:`replicate` builds ``S`` identical mean blocks when
``S`` exceeds the number of blocks; :func:`stage_costs` adds them up (the model's first block's BP
backward has no input gradient; the head goes to the last stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

SCHEDULES = ("gpipe", "1f1b", "dfa")
FORWARD, BACKWARD, DFA_BACKWARD, UPDATE = "F", "B", "D", "U"


@dataclass(frozen=True)
class StageCost:
    """Per-micro-batch costs of one stage: ``forward`` F_s, ``backward`` B_s (BP: weights and input
    gradient), ``dfa_backward`` D_s (DFA: weights only); any time unit (the results share it)."""

    forward: float
    backward: float
    dfa_backward: float
    update: float = 0.0  # the stage's optimizer step, once per step after its last op (both schedules)


@dataclass(frozen=True)
class BlockCost:
    """Measured per-micro-batch costs of one block (the layers between two feedback points).

    ``forward``, ``backward`` (BP, weights and input gradient), ``dfa_backward`` (the projection of
    ``e`` and the weight gradients, input detached); ``weight_backward``: BP's backward without
    the input gradient, what the model's first block runs (its input, the data, needs no gradient;
    ``None``: ``backward``). Memory per micro-batch: ``activation_bytes``, what its forward saves
    for BP's backward (parameters not counted); ``shared_bytes``, the part of that which is its
    input and which the previous block saves too (one tensor, counted once when both blocks are on
    one stage); ``dfa_activation_bytes``, ``dfa_shared_bytes``: the same under DFA (input
    detached; ``None``: as BP's).
    """

    forward: float
    backward: float
    dfa_backward: float
    weight_backward: float | None = None
    activation_bytes: float = 0.0
    shared_bytes: float = 0.0
    dfa_activation_bytes: float | None = None
    dfa_shared_bytes: float | None = None
    update: float = 0.0  # the optimizer step over the block's parameters (once per step)

    def memory(self, mode: str) -> tuple[float, float]:
        """``(activation bytes, shared bytes)`` under ``mode`` ``bp`` or ``dfa``."""
        if mode == "dfa" and self.dfa_activation_bytes is not None:
            shared = self.shared_bytes if self.dfa_shared_bytes is None else self.dfa_shared_bytes
            return self.dfa_activation_bytes, shared
        return self.activation_bytes, self.shared_bytes


@dataclass(frozen=True)
class Op:
    """One operation: ``kind`` F, B or D of micro-batch ``micro`` on ``stage``, taking ``duration``;
    ``deps``: ``((stage, kind, micro), lag)`` pairs it waits for (``lag``: the message latency)."""

    stage: int
    kind: str
    micro: int
    duration: float
    deps: tuple[tuple[tuple[int, str, int], float], ...] = ()

    @property
    def key(self) -> tuple[int, str, int]:
        return (self.stage, self.kind, self.micro)


@dataclass
class Result:
    """What :func:`simulate` computes for one schedule (see the module docstring)."""

    schedule: str
    stages: int
    microbatches: int
    total: float
    busy: list[float]
    bubble: list[float]
    bubble_fraction: float
    peak_activations: list[int]
    ops: list[list[Op]] = field(repr=False, default_factory=list)
    times: dict[tuple[int, str, int], tuple[float, float]] = field(repr=False, default_factory=dict)

    def throughput(self, samples_per_micro: float = 1.0) -> float:
        """Samples per time unit: ``M * samples_per_micro / total``."""
        return self.microbatches * samples_per_micro / self.total if self.total > 0 else math.inf


def warmup(schedule: str, S: int, s: int, M: int) -> int:
    """Forwards stage ``s`` runs before its first backward: ``min(S - 1 - s, M)`` for 1f1b and dfa,
    ``M`` for gpipe."""
    if schedule == "gpipe":
        return M
    return min(S - 1 - s, M)


def orders(schedule: str, S: int, M: int) -> list[list[tuple[str, int]]]:
    """Per stage, the ``(kind, micro)`` sequence it runs (see the module docstring)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; schedules: {', '.join(SCHEDULES)}")
    if S < 1 or M < 1:
        raise ValueError(f"a pipeline needs at least one stage and one micro-batch, got S={S}, M={M}")
    out = []
    for s in range(S):
        w = warmup(schedule, S, s, M)
        if schedule == "gpipe":
            seq = [(FORWARD, m) for m in range(M)] + [(BACKWARD, m) for m in range(M)]
        elif schedule == "1f1b":
            seq = [(FORWARD, m) for m in range(w)]
            for i in range(M - w):
                seq += [(FORWARD, w + i), (BACKWARD, i)]
            seq += [(BACKWARD, m) for m in range(M - w, M)]
        else:  # dfa: forward m, then the backward of the micro-batch whose e has had time to arrive
            seq = []
            for m in range(M):
                seq.append((FORWARD, m))
                if m >= w:
                    seq.append((DFA_BACKWARD, m - w))
            seq += [(DFA_BACKWARD, m) for m in range(max(0, M - w), M)]
        out.append(seq)
    return out


def build_ops(schedule: str, costs: Sequence[StageCost], M: int, latency: float = 0.0) -> list[list[Op]]:
    """Per stage, its :class:`Op` list in order, with durations from ``costs`` and dependencies."""
    S = len(costs)
    last = S - 1
    out = []
    for s, seq in enumerate(orders(schedule, S, M)):
        ops = []
        for kind, m in seq:
            if kind == FORWARD:
                deps = (((s - 1, FORWARD, m), latency),) if s > 0 else ()
                duration = costs[s].forward
            elif kind == BACKWARD:
                deps = (((s + 1, BACKWARD, m), latency),) if s < last else (((s, FORWARD, m), 0.0),)
                duration = costs[s].backward
            else:
                deps = (((last, FORWARD, m), latency if s < last else 0.0),)
                duration = costs[s].dfa_backward
            ops.append(Op(s, kind, m, float(duration), deps))
        if costs[s].update:  # the optimizer step of the stage's parameters, after its last backward
            ops.append(Op(s, UPDATE, 0, float(costs[s].update)))
        out.append(ops)
    return out


def simulate(ops: list[list[Op]], schedule: str = "") -> Result:
    """Start and end of every op of ``ops`` (per stage, in order) by list scheduling; raises
    ``ValueError`` when the orders deadlock (an op waits for one that can never run)."""
    S = len(ops)
    times: dict[tuple[int, str, int], tuple[float, float]] = {}
    nxt = [0] * S
    free = [0.0] * S
    remaining = sum(len(o) for o in ops)
    while remaining:
        progressed = False
        for s in range(S):
            while nxt[s] < len(ops[s]):
                op = ops[s][nxt[s]]
                if any(d not in times for d, _ in op.deps):
                    break
                start = max([free[s]] + [times[d][1] + lag for d, lag in op.deps])
                times[op.key] = (start, start + op.duration)
                free[s] = start + op.duration
                nxt[s] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [ops[s][nxt[s]].key for s in range(S) if nxt[s] < len(ops[s])]
            raise ValueError(f"the stage orders deadlock: {stuck} wait for ops that cannot run")
    total = max((end for _, end in times.values()), default=0.0)
    busy = [sum(op.duration for op in stage) for stage in ops]
    bubble = [1 - b / total if total > 0 else 0.0 for b in busy]
    overall = 1 - sum(busy) / (S * total) if total > 0 else 0.0
    peaks = []
    for stage in ops:
        held = peak = 0
        for op in stage:
            held += 1 if op.kind == FORWARD else 0 if op.kind == UPDATE else -1
            peak = max(peak, held)
        peaks.append(peak)
    M = 1 + max((op.micro for stage in ops for op in stage), default=-1)
    return Result(schedule, S, M, total, busy, bubble, overall, peaks, ops, times)


def predict(costs: Sequence[StageCost], M: int, latency: float = 0.0,
            schedules: Sequence[str] = SCHEDULES) -> dict[str, Result]:
    """``{schedule: Result}`` for the stages ``costs`` and ``M`` micro-batches."""
    return {name: simulate(build_ops(name, costs, M, latency), name) for name in schedules}


def predict_two_stage(costs: Sequence[StageCost | Sequence[float]], M: int, latency: float = 0.0,
                      baseline: str = "1f1b") -> float:
    """Throughput of the 2-stage DFA pipeline over BP's (``baseline`` ``1f1b`` or ``gpipe``):
    ``T_bp / T_dfa`` for the two stages' ``costs`` (:class:`StageCost` or ``(F, B, D)``) and ``M``
    micro-batches: what a measured 2-stage run's ratio of step times is to be checked against."""
    if len(costs) != 2:
        raise ValueError(f"predict_two_stage takes the costs of exactly 2 stages, got {len(costs)}")
    stages = [c if isinstance(c, StageCost) else StageCost(*map(float, c)) for c in costs]
    res = predict(stages, M, latency, (baseline, "dfa"))
    return res[baseline].total / res["dfa"].total


# -- stages from measured blocks -------------------------------------------------------------------
def bp_cost(b: BlockCost, first: bool = False) -> float:
    """``F + B`` of block ``b`` (``first``: the model's first block, whose backward is ``weight_backward``)."""
    return b.forward + (_weight_backward(b) if first else b.backward)


def dfa_cost(b: BlockCost, first: bool = False) -> float:
    """``F + D`` of block ``b``."""
    return b.forward + b.dfa_backward


def partition(weights: Sequence[float], S: int) -> list[tuple[int, int]]:
    """``S`` contiguous, non-empty ranges ``[start, end)`` covering ``weights`` whose largest sum is
    the smallest possible (ties: the earliest cut points); ``S`` at most ``len(weights)``."""
    n = len(weights)
    if not 1 <= S <= n:
        raise ValueError(f"cannot cut {n} blocks into {S} non-empty stages")
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + float(w))
    # best[k][i]: the smallest largest-stage sum of cutting the first i blocks into k stages
    best = [[math.inf] * (n + 1) for _ in range(S + 1)]
    cut = [[0] * (n + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for k in range(1, S + 1):
        for i in range(k, n - (S - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i] - 1e-15:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], n
    for k in range(S, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def replicate(blocks: Sequence[BlockCost], S: int) -> list[BlockCost]:
    """``S`` identical blocks, each the mean of ``blocks`` (field by field): a model of ``S`` blocks
    with the measured per-block cost."""
    n = len(blocks)

    def mean(get) -> float:
        return sum(get(b) for b in blocks) / n

    block = BlockCost(mean(lambda b: b.forward), mean(lambda b: b.backward), mean(lambda b: b.dfa_backward),
                      mean(_weight_backward), mean(lambda b: b.activation_bytes), mean(lambda b: b.shared_bytes),
                      mean(lambda b: b.memory("dfa")[0]), mean(lambda b: b.memory("dfa")[1]),
                      mean(lambda b: b.update))
    return [block] * S


def _weight_backward(b: BlockCost) -> float:
    return b.backward if b.weight_backward is None else b.weight_backward


def stage_costs(blocks: Sequence[BlockCost], bounds: Sequence[tuple[int, int]],
                head: BlockCost | None = None) -> list[StageCost]:
    """The :class:`StageCost` of each range of ``bounds`` over ``blocks``: sums of the blocks'
    costs, block 0's BP backward taken as its ``weight_backward``; ``head`` added to the last stage."""
    out = []
    for k, (a, b) in enumerate(bounds):
        part = list(blocks[a:b]) + ([head] if head is not None and k == len(bounds) - 1 else [])
        backward = sum(_weight_backward(x) if a + i == 0 else x.backward for i, x in enumerate(part))
        out.append(StageCost(sum(x.forward for x in part), backward, sum(x.dfa_backward for x in part),
                             sum(x.update for x in part)))
    return out


def stage_activation_bytes(blocks: Sequence[BlockCost], bounds: Sequence[tuple[int, int]],
                           head: BlockCost | None = None, mode: str = "bp") -> list[float]:
    """Bytes one micro-batch's saved activations take on each stage of ``bounds`` (``mode`` ``bp`` or
    ``dfa``): the sum over its blocks (and the head on the last stage), less each inner boundary's
    ``shared_bytes`` (a tensor both blocks of the boundary save)."""
    out = []
    for k, (a, b) in enumerate(bounds):
        part = list(blocks[a:b]) + ([head] if head is not None and k == len(bounds) - 1 else [])
        mem = [x.memory(mode) for x in part]
        out.append(sum(m[0] for m in mem) - sum(m[1] for m in mem[1:]))
    return out


def activation_bytes(result: Result, per_micro: Sequence[float]) -> list[float]:
    """Peak activation bytes per stage: ``peak_activations[s] * per_micro[s]``."""
    return [p * b for p, b in zip(result.peak_activations, per_micro)]


def model_stages(blocks: Sequence[BlockCost], S: int, head: BlockCost | None = None,
                 balance: str = "bp") -> tuple[list[StageCost], list[float], list[tuple[int, int]], bool]:
    """``(stage costs, activation bytes per micro-batch per stage, bounds, replicated)`` for an
    ``S``-stage pipeline of ``blocks``: the contiguous partition minimising the largest stage's
    ``F + B`` (``balance`` ``bp``; memory under BP) or ``F + D`` (``dfa``; memory under DFA), the
    head on the last stage; for ``S`` beyond the number of blocks, ``S`` replicated mean blocks
    (:func:`replicate`), one per stage."""
    if balance not in ("bp", "dfa"):
        raise ValueError(f"balance is 'bp' or 'dfa', got {balance!r}")
    replicated = S > len(blocks)
    if replicated:
        blocks = replicate(blocks, S)
    key = bp_cost if balance == "bp" else dfa_cost
    weights = [key(b, first=i == 0) for i, b in enumerate(blocks)]
    if head is not None:
        weights[-1] += key(head)
    bounds = partition(weights, S)
    return (stage_costs(blocks, bounds, head), stage_activation_bytes(blocks, bounds, head, balance), bounds,
            replicated)
