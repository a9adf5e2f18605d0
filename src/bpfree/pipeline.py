"""Pipeline-parallel training: the model split at its feedback points into stages, one process each.

The split
---------
A model whose top level is an ``nn.Sequential`` (the zoo's ``mlp``, ``cnn``, ``alexnet``, ``vgg*``, or
any model given ``bpfree.attach``) is cut after ``S - 1`` of its top-level :class:`FeedbackPoint`
children into ``S`` contiguous stages (:func:`split_model`): stage ``s`` runs on rank ``s`` of the
process group. The cuts balance each child's forward time, measured on a micro-batch at set-up
(rank 0's measurement, for every rank), so each stage does about the same work. Every rank builds the whole model from the
same configuration and seed (so its weights start as a single process's would) and trains only its
own stage's parameters; the optimizer of rank ``s`` holds only those.

The direct-feedback schedule (dfa, grape, drtp, dkp)
----------------------------------------------------
One optimizer step on a batch of ``n`` samples is ``M`` micro-batches ``x_m`` (``torch.tensor_split``,
sizes differing by at most one, weights ``w_m = n_m / n``). Activations flow forward only:

* stage ``s`` runs its forward on micro-batch ``m`` (graph cut at its points, as in one process) and
  sends its output ``h`` (``(n_m, *features)``) to stage ``s + 1``;
* the last stage runs the head, ``loss_m = w_m L(y_m, t_m)``, and one backward call yields
  ``e_m = d loss_m / d y_m`` (``(n_m, o)``), the head's gradients and its own points' signals; it
  sends ``e_m`` to every other stage the moment the error tap receives it, before its own blocks'
  backward runs;
* stage ``s`` delivers ``B_l e_m`` into its blocks once ``e_m`` arrives, ``w_s = S - 1 - s``
  micro-batches after it ran that forward (the warm-up: the forwards still in flight downstream); no
  stage ever waits for another stage's backward pass, and no gradient crosses a stage boundary.

Gradients accumulate over the micro-batches (``sum_m w_m g_m`` is the batch-mean gradient), then each
rank steps its own optimizer. GrAPE's update (on its update steps) comes first: a pass over the first
``samples`` inputs of the batch, in micro-batches, carries from stage to stage either ``[h + step d;
h - step d]`` (the central difference: GrAPE's ``tangents=auto`` and ``central``) or ``(h, dh)``
(forward mode: ``tangents=forward``); the last stage broadcasts ``u = sum_l J_l d_l``
(``(samples, o)``), and every rank forms ``J~_l = mean_i u_i d_{l,i}^T`` and moves ``B_l`` as one
process would. Every rank draws the tangents of *all* points (in forward order, from the method's
stream), so the stream, the estimates, ``Jbar`` and every ``B_l`` equal a single process's on every
rank (:class:`FeedbackPipeline` creates the ``B_l`` at set-up from the same stream). With no
BatchNorm (whose batch statistics are per micro-batch) a pipeline run ends with the weights of a
single-process run with the same ``tangents`` on the same batches, to float rounding; with it, those
of one process that accumulates the same micro-batches (``tests/test_pipeline.py``).

BP on the same split
--------------------
``bp`` runs ``torch.distributed.pipelining``'s ``Schedule1F1B`` (or ``ScheduleGPipe``: run option
``pipeline_schedule``) over the same stages and micro-batches, each micro-batch's loss weighted by
``w_m`` as above, so it too computes the batch-mean gradient. Its backward pass crosses every stage
boundary (input gradients travel back), which is what the direct-feedback schedule removes.

Every rank returns the same :class:`~bpfree.methods.base.StepResult` (the last stage broadcasts the
batch's output and loss), so the loop's running sums and logs need no reduction.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch import nn

from .feedback.estimators import matched_tangents, outer_mean, perturbed_copies, preserved_buffers
from .methods.base import LossFn, Method, StepResult
from .methods.dfa import CutPass, Delivery, DirectFeedback, Estimator, TangentProbe
from .points import FeedbackPoint, Head, handled, head_marker

#: The methods a pipeline trains: the direct-feedback family on its own schedule, and BP.
PIPELINED_METHODS = ("bp", "dfa", "grape", "drtp", "dkp")
#: Schedules of the BP reference (``torch.distributed.pipelining``).
BP_SCHEDULES = ("1f1b", "gpipe")

TAG_ACTIVATION, TAG_ERROR, TAG_TANGENT = 11, 12, 13


class PipelineError(ValueError):
    """A pipeline that cannot be built: the model, the method or the number of stages."""


# ----------------------------------------------------------------------------- the split


@dataclass
class Split:
    """Where a sequential model is cut, and the per-sample shapes the stages exchange.

    ``bounds[s] = (a, b)``: stage ``s`` runs the model's top-level children ``a .. b-1``;
    ``points[s]``: its feedback points' names; ``point_shapes``: every point's per-sample shape, in
    forward order; ``boundary[s]``: the per-sample shape of what stage ``s`` hands to ``s + 1``
    (``S - 1`` entries); ``output``: the model output's per-sample shape; ``costs``: what the split
    balanced, per stage (seconds of forward time, or multiply-accumulates per sample).
    """

    bounds: list[tuple[int, int]]
    points: list[list[str]]
    point_shapes: dict[str, tuple[int, ...]]
    boundary: list[tuple[int, ...]]
    output: tuple[int, ...]
    costs: list[float]

    @property
    def stages(self) -> int:
        return len(self.bounds)

    def stage_module(self, model: nn.Module, stage: int) -> nn.Sequential:
        """Stage ``stage`` as an ``nn.Sequential`` of the model's own child modules (shared, same names)."""
        a, b = self.bounds[stage]
        return nn.Sequential(collections.OrderedDict(list(model.named_children())[a:b]))

    def owner(self) -> dict[str, int]:
        """``{point name: stage}``."""
        return {name: s for s, names in enumerate(self.points) for name in names}


def _macs_hook(counts: list[float], index: int):
    def hook(module: nn.Module, inputs: tuple, out: torch.Tensor) -> None:
        if not isinstance(out, torch.Tensor):
            return
        per_sample = out.numel() / max(out.shape[0], 1)
        if isinstance(module, nn.Linear):
            counts[index] += per_sample * module.in_features
        elif isinstance(module, nn.modules.conv._ConvNd):
            counts[index] += per_sample * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif not list(module.children()):
            counts[index] += per_sample  # element-wise layers
    return hook


def split_model(model: nn.Module, stages: int, example: torch.Tensor, balance: str = "time",
                repeats: int = 3) -> Split:
    """Cut ``model`` into ``stages`` contiguous stages after top-level feedback points (balanced).

    ``example``: a batch of inputs (a micro-batch) for the shape and cost pass, run in evaluation
    mode without autograd (nothing of the model changes). ``balance``: what the cuts balance:
    ``time``, the median over ``repeats`` passes of each top-level child's measured forward time on
    ``example`` (what a stage really costs: element-wise layers on large maps weigh more than their
    arithmetic); ``macs``, the multiply-accumulates per sample (deterministic). Under
    ``torch.distributed`` a measured split can differ between processes: :func:`make_pipeline`
    takes rank 0's.
    """
    if balance not in ("time", "macs"):
        raise PipelineError(f"balance must be time or macs, got {balance!r}")
    if stages < 2:
        raise PipelineError(f"a pipeline needs at least 2 stages, got {stages}")
    if not isinstance(model, nn.Sequential):
        raise PipelineError(f"--pipeline splits an nn.Sequential model at its top-level feedback points; this model "
                            f"is a {type(model).__name__} (zoo models that are: mlp, cnn, alexnet, vgg11/13/16; or "
                            f"bpfree.attach on an nn.Sequential)")
    if head_marker(model) is not None:
        raise PipelineError("--pipeline does not split models with a bpfree.Head marker")
    children = list(model.named_children())
    cuts = [i for i, (_, m) in enumerate(children[:-1])
            if isinstance(m, FeedbackPoint) and not isinstance(m, Head)]
    if len(cuts) < stages - 1:
        raise PipelineError(f"{stages} stages need {stages - 1} cuts, but the model has {len(cuts)} top-level "
                            f"feedback point(s) to cut at")
    # the shape and cost pass
    counts = [0.0] * len(children)
    hooks = [sub.register_forward_hook(_macs_hook(counts, i)) for i, (_, child) in enumerate(children)
             for sub in child.modules()] if balance == "macs" else []
    names = {id(m): n for n, m in model.named_modules() if isinstance(m, FeedbackPoint)}
    shapes: dict[str, tuple[int, ...]] = {}
    outputs: dict[int, tuple[int, ...]] = {}

    def record(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
        shapes[names[id(point)]] = tuple(h.shape[1:])
        return h

    was_training = model.training
    model.eval()
    seconds: list[list[float]] = [[] for _ in children]
    try:
        with torch.no_grad(), handled(model, record):
            h = example[:2]
            for i, (_, child) in enumerate(children):
                h = child(h)
                outputs[i] = tuple(h.shape[1:])
            for _ in range(repeats if balance == "time" else 0):
                h = example
                for i, (_, child) in enumerate(children):
                    t0 = time.perf_counter()
                    h = child(h)
                    seconds[i].append(time.perf_counter() - t0)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    if balance == "time":
        counts = [statistics.median(t) for t in seconds]
    ends = _balanced_cuts(counts, cuts, stages)
    bounds = [(a, b) for a, b in zip([0] + [c + 1 for c in ends], [c + 1 for c in ends] + [len(children)])]
    stage_points = [[names[id(m)] for _, child in children[a:b] for m in child.modules() if id(m) in names]
                    for a, b in bounds]
    return Split(bounds, stage_points, shapes, [outputs[c] for c in ends], outputs[len(children) - 1],
                 [sum(counts[a:b]) for a, b in bounds])


def _balanced_cuts(costs: list[float], cuts: list[int], stages: int) -> list[int]:
    """The ``stages - 1`` cut positions (children after which a stage ends) that minimise the
    largest stage cost (dynamic programming over the allowed positions)."""
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    ends = cuts + [len(costs) - 1]  # a stage ends after one of these children
    # best[j][k]: (max cost, previous end) covering children 0..ends[j] with k stages
    best: list[dict[int, tuple[float, int]]] = [{} for _ in ends]
    for j, e in enumerate(ends):
        best[j][1] = (prefix[e + 1], -1)
        for k in range(2, stages + 1):
            options = [(max(best[i][k - 1][0], prefix[e + 1] - prefix[ends[i] + 1]), i)
                       for i in range(j) if k - 1 in best[i]]
            if options:
                best[j][k] = min(options)
    chosen, j, k = [], len(ends) - 1, stages
    while k > 1:
        j = best[j][k][1]
        chosen.append(ends[j])
        k -= 1
    return sorted(chosen)


# ----------------------------------------------------------------------------- the stages


class _Group:
    """Point-to-point messages and the end-of-step broadcast of this process's pipeline."""

    def __init__(self, stage: int, stages: int, device: torch.device) -> None:
        self.stage, self.stages, self.device = stage, stages, device
        self.last = stages - 1

    def recv(self, shape: tuple[int, ...], src: int, tag: int) -> torch.Tensor:
        t = torch.empty(shape, device=self.device)
        dist.recv(t, src, tag=tag)
        return t

    def irecv(self, shape: tuple[int, ...], src: int, tag: int) -> tuple[dist.Work, torch.Tensor]:
        t = torch.empty(shape, device=self.device)
        return dist.irecv(t, src, tag=tag), t

    def broadcast_result(self, output: torch.Tensor | None, loss: torch.Tensor | None,
                         shape: tuple[int, ...]) -> StepResult:
        """The last stage's ``(output, loss)`` on every rank."""
        if self.stage != self.last:
            output, loss = torch.empty(shape, device=self.device), torch.empty((), device=self.device)
        dist.broadcast(output, self.last)
        dist.broadcast(loss, self.last)
        return StepResult(loss, output)


def microbatches(x: torch.Tensor, y: torch.Tensor, count: int) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """``[(x_m, y_m, n_m / n)]``: at most ``count`` micro-batches (``torch.tensor_split``: sizes differ by
    at most one; fewer when the batch holds fewer samples)."""
    n = x.shape[0]
    m = min(count, n)
    return [(a, b, a.shape[0] / n) for a, b in zip(x.tensor_split(m), y.tensor_split(m))]


class FeedbackPipeline:
    """One rank's stage of a direct-feedback pipeline step (the schedule in the module docstring).

    ``method``: a :class:`DirectFeedback` built on the whole ``model`` (every rank alike); its
    ``B_l`` are created here, for every point, from the method's stream, as a single process's first
    step would. ``step(x, y, loss_fn)`` takes the whole batch on every rank and returns the batch's
    output and mean loss on every rank.
    """

    def __init__(self, method: DirectFeedback, model: nn.Module, split: Split, stage: int, microbatches: int,
                 device: torch.device) -> None:
        if not isinstance(method, DirectFeedback):
            raise PipelineError(f"method {method.name!r} is not of the direct-feedback family")
        method.check_pipelined()
        self.method, self.split, self.stage = method, split, stage
        self.module = split.stage_module(model, stage)
        self.group = _Group(stage, split.stages, device)
        self.microbatches, self.device = microbatches, device
        self.names = {id(m): n for n, m in model.named_modules() if isinstance(m, FeedbackPoint)}
        feedback = method.state["feedback"]
        if len(feedback) < len(split.point_shapes):  # the first step's B_l, made in forward order
            like = torch.zeros((1, *split.output), device=device)
            shapes = {name: torch.Size((1, *shape)) for name, shape in split.point_shapes.items()}
            method.ensure_feedback(CutPass(like, like, shapes, Delivery(), False))

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        method, g, split, s = self.method, self.group, self.split, self.stage
        method.state["steps"] += 1
        probe = method.pipeline_probe(x.device)
        if probe is not None:
            self.align(x, probe)
        parts = microbatches(x, y, self.microbatches)
        warmup = g.last - s
        pending: list[tuple[CutPass, tuple[dist.Work, torch.Tensor], torch.Tensor, float]] = []
        sends: list[tuple[dist.Work, torch.Tensor]] = []
        outputs, losses = [], []
        for i, (xm, ym, w) in enumerate(parts):
            h = xm if s == 0 else g.recv((xm.shape[0], *split.boundary[s - 1]), s - 1, TAG_ACTIVATION)
            if s == g.last:
                record = method.forward_cut(h, module=self.module)
                record.delivery.target = _scaled(method.link_target(record, ym), w)

                def send_error(e: torch.Tensor) -> None:  # as soon as the tap has e: before this stage's blocks
                    e = e.contiguous()
                    sends.extend((dist.isend(e, r, tag=TAG_ERROR), e) for r in range(g.last))

                record.delivery.on_error = send_error
                loss = loss_fn(record.output, ym) * w
                method.deliver(record, loss)  # one backward call: e, the head's gradients, this stage's signals
                method.after_delivery(record)
                outputs.append(record.output.detach())
                losses.append(loss.detach())
                continue
            record = method.forward_cut(h, module=self.module, tapped=False)
            out = record.output.contiguous()
            sends.append((dist.isend(out, s + 1, tag=TAG_ACTIVATION), out))
            pending.append((record, g.irecv((xm.shape[0], *split.output), g.last, TAG_ERROR), ym, w))
            if i >= warmup:
                self.deliver(*pending[i - warmup])
        if s != g.last:
            for item in pending[max(len(parts) - warmup, 0):]:
                self.deliver(*item)
        for work, _ in sends:
            work.wait()
        if s == g.last:
            return g.broadcast_result(torch.cat(outputs), torch.stack(losses).sum(), (x.shape[0], *split.output))
        return g.broadcast_result(None, None, (x.shape[0], *split.output))

    def deliver(self, record: CutPass, arrival: tuple[dist.Work, torch.Tensor], y: torch.Tensor, w: float) -> None:
        """Wait for ``e`` of this micro-batch, then one backward call with ``B_l e`` at every own point."""
        work, e = arrival
        work.wait()
        method = self.method
        record.delivery.error = e
        record.delivery.target = _scaled(method.link_target(dataclasses.replace(record, output=e), y), w)
        method.backward_signals(record, method.signals(record, e))
        method.after_delivery(record)

    def align(self, x: torch.Tensor, probe: TangentProbe) -> None:
        """GrAPE's update across the stages: tangents for every point (drawn on every rank alike), a
        pass through the stages in micro-batches that yields ``u = sum_l J_l d_l`` at the last
        stage (forward mode, or the central difference of ``[h + step d; h - step d]``), ``u``
        broadcast, ``J~_l`` and the ``B_l`` update for all points.

        The pass over the ``k`` probed inputs is split like the training batch, so the stages work
        on it concurrently; per sample, its ``u`` rows are those of one pass over all ``k`` (with
        BatchNorm each chunk normalises with its own statistics).
        """
        g, split, s = self.group, self.split, self.stage
        k = min(probe.samples, x.shape[0])
        drawn = {name: probe.draw((k, *shape), probe.generator, x.device, x.dtype)
                 for name, shape in split.point_shapes.items()}
        d = {name: t for name, t in drawn.items() if t is not None}  # a declined point is not perturbed
        names, forward, step = self.names, probe.scheme == "forward", probe.step
        rows = torch.arange(k).tensor_split(min(self.microbatches, k))
        chunk: list[slice] = [slice(0, 0)]

        def inject(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
            if names[id(point)] not in d:
                return h
            dl = d[names[id(point)]][chunk[0]]
            if not forward:  # h holds [h_+; h_-]
                return perturbed_copies(h, dl, (step, -step))
            primal, tangent = fwAD.unpack_dual(h)
            return fwAD.make_dual(primal, dl if tangent is None else tangent + dl)

        sends, outputs = [], []
        with torch.no_grad(), (fwAD.dual_level() if forward else contextlib.nullcontext()), \
                handled(self.module, inject), preserved_buffers(self.module), matched_tangents(self.module):
            for r in rows:
                chunk[0] = slice(int(r[0]), int(r[-1]) + 1)
                n = len(r)
                if s == 0:
                    inp = x[chunk[0]] if forward else torch.cat([x[chunk[0]]] * 2)
                elif forward:
                    shape = (n, *split.boundary[s - 1])
                    inp = fwAD.make_dual(g.recv(shape, s - 1, TAG_TANGENT), g.recv(shape, s - 1, TAG_TANGENT))
                else:
                    inp = g.recv((2 * n, *split.boundary[s - 1]), s - 1, TAG_TANGENT)
                out = self.module(inp)
                parts = fwAD.unpack_dual(out) if forward else (out,)
                if s != g.last:
                    for t in parts:
                        t = t.contiguous()
                        sends.append((dist.isend(t, s + 1, tag=TAG_TANGENT), t))
                else:
                    outputs.append(parts[1] if forward else (out[:n] - out[n:]) / (2 * step))
        for work, _ in sends:
            work.wait()
        u = torch.cat(outputs).contiguous() if s == g.last else torch.empty((k, *split.output), device=x.device)
        dist.broadcast(u, g.last)
        estimates = {name: outer_mean(u, dl) for name, dl in d.items()}
        record = CutPass(u, u, {name: torch.Size((k, *shape)) for name, shape in split.point_shapes.items()},
                         Delivery(), True, estimator=Estimator(lambda _x, _record: estimates))
        self.method.before_delivery(record, x)


def _scaled(target: torch.Tensor | None, w: float) -> torch.Tensor | None:
    return None if target is None or w == 1.0 else target * w


class BackpropPipeline:
    """One rank's stage of BP on the same split: ``torch.distributed.pipelining``'s 1F1B or GPipe.

    Each micro-batch's loss is ``w_m L`` (``scale_grads=False``), so the accumulated gradient is the
    batch mean, as in :class:`FeedbackPipeline`. The micro-batches are of equal size (that library
    sizes its buffers from the first): the largest count up to ``microbatches`` that divides the batch;
    a batch left with fewer micro-batches than stages (a short last batch) runs GPipe, since 1F1B
    needs at least one per stage.
    """

    def __init__(self, method: Method, model: nn.Module, split: Split, stage: int, microbatches: int,
                 device: torch.device, schedule: str = "1f1b") -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        if schedule not in BP_SCHEDULES:
            raise PipelineError(f"pipeline_schedule must be one of {', '.join(BP_SCHEDULES)}, got {schedule!r}")
        self.method, self.split, self.stage, self.microbatches = method, split, stage, microbatches
        self.module = split.stage_module(model, stage)
        self.group = _Group(stage, split.stages, device)
        self.device = device
        self._stage_kind = PipelineStage
        self._kind = Schedule1F1B if schedule == "1f1b" else ScheduleGPipe
        self._gpipe = ScheduleGPipe
        self._schedules: dict[tuple[int, int], object] = {}
        self._loss: tuple[LossFn, int] | None = None

    def _weighted_loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss_fn, n = self._loss
        return loss_fn(out, target) * (out.shape[0] / n)

    def _warm_up(self, schedule: object, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> None:
        """One step of a new schedule on zeros, leaving no trace: the library learns the stages'
        shapes in its first step by running each stage on placeholder tensors, which would move
        BatchNorm's running statistics (to NaN); here buffers, ``.grad`` and the random state are
        put back after it."""
        grads = [(p, p.grad) for p in self.module.parameters()]
        self._loss = (loss_fn, x.shape[0])
        with preserved_buffers(self.module), torch.random.fork_rng(devices=[] if self.device.type == "cpu"
                                                                  else [self.device]):
            if self.stage == 0:
                schedule.step(torch.zeros_like(x))
            elif self.stage == self.group.last:
                schedule.step(target=y, losses=[])
            else:
                schedule.step()
        for p, g in grads:
            p.grad = g

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        n, g = x.shape[0], self.group
        # torch.distributed.pipelining sizes a stage's buffers from its first micro-batch, so BP's
        # micro-batches are equal: the largest count up to `microbatches` that divides the batch,
        # with a stage and schedule of their own per micro-batch size (a shorter last batch)
        m = max(d for d in range(1, min(self.microbatches, n) + 1) if n % d == 0)
        key = (m, n // m)
        if key not in self._schedules:
            stage = self._stage_kind(self.module, self.stage, self.split.stages, self.device)
            kind = self._kind if m >= self.split.stages else self._gpipe  # 1F1B needs M >= S
            self._schedules[key] = schedule = kind(stage, m, loss_fn=self._weighted_loss, scale_grads=False)
            self._warm_up(schedule, x, y, loss_fn)
        schedule = self._schedules[key]
        self._loss = (loss_fn, n)
        if self.stage == 0:
            schedule.step(x)
            return g.broadcast_result(None, None, (n, *self.split.output))
        if self.stage == g.last:
            losses: list[torch.Tensor] = []
            out = schedule.step(target=y, losses=losses)
            return g.broadcast_result(out.detach(), torch.stack([l.detach() for l in losses]).sum(),
                                      (n, *self.split.output))
        schedule.step()
        return g.broadcast_result(None, None, (n, *self.split.output))


def make_pipeline(method: Method, model: nn.Module, stages: int, stage: int, microbatches: int,
                  example: torch.Tensor, device: torch.device, schedule: str = "1f1b", balance: str = "time",
                  split: Split | None = None):
    """This rank's stage of a pipeline over ``stages`` processes (``stage``: this rank).

    ``example``: a training batch; its first micro-batch measures the split (:func:`split_model`),
    unless ``split`` is given (methods compared on one split share it).
    """
    if method.name not in PIPELINED_METHODS:
        raise PipelineError(f"method {method.name!r} has no pipeline schedule; --pipeline trains "
                            f"{', '.join(PIPELINED_METHODS)}")
    if microbatches < 1:
        raise PipelineError(f"microbatches must be at least 1, got {microbatches}")
    if split is None:
        split = split_model(model, stages, example[: max(1, math.ceil(example.shape[0] / microbatches))], balance)
        if dist.is_initialized():  # a measured split may differ between processes: rank 0's for all
            box = [split]
            dist.broadcast_object_list(box, src=0)
            split = box[0]
    if method.name == "bp":
        return BackpropPipeline(method, model, split, stage, microbatches, device, schedule)
    return FeedbackPipeline(method, model, split, stage, microbatches, device)
