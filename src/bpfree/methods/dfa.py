"""Direct Feedback Alignment (Nøkland, 2016) and the machinery its family shares.

A direct-feedback step is a pipeline of plain values (DESIGN.md §5)::

    record = forward_cut(x)          # y, every point's shape, where e is taken, estimator inputs
    ensure_feedback(record)          # B_l (n_l, o) exists for every point
    before_delivery(record, x)       # GrAPE: estimate J~_l and move B_l; DFA: nothing
    source = signal_source(record, y)  # how a point's signal is made: B_l e (DRTP: B_l y*)
    loss = loss_fn(record.output, y)
    deliver(record, loss, source)    # ONE autograd call: e = dL/dy, the head, every block's B_l e
    after_delivery(record)           # DKP: B_l's own update from (h_l, e)

How one backward call delivers every signal: the forward pass cuts the graph at every point (the
next block sees ``h_l`` detached) and, at each point, links ``h_l`` into a *chain*: the 0-d sum
``h_1.sum() + h_2.sum() + ...`` (its value is never used), with a gradient hook on ``h_l`` that
replaces whatever the chain sends with the point's signal. The chain enters an *error tap* on the
tensor where ``e`` is taken (``y``, or the input ``z`` of a :class:`bpfree.Head`).
``loss.backward()`` then runs the head's backward as BP would; the tap receives ``e = dL/dy``,
keeps it in the step's :class:`Delivery` and sends a zero down the chain, and the hook of ``h_l``
hands block ``l`` its signal (``B_l e``). The links are made after their block's forward operations
and before the next block's, so autograd (which runs the most recently created ready node first)
runs each block's whole backward right after its signal is made: every signal is made just before
its block needs it and freed when the block is done, and the peak memory of a step is BP's.
Nothing of a step is kept on the method.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..feedback.matrices import init_feedback, point_width
from ..options import OptionError, option
from ..points import all_points, feedback_points, handled, head_marker
from . import register
from .base import LossFn, Method, MethodGenerator, StepResult
from .guards import forward_checked

#: ``source(name, e)``: the signal for point ``name`` given the output error ``e`` (any shape with
#: ``h_l``'s number of elements; it is reshaped to ``h_l`` and cast to ``h_l``'s dtype).
SignalSource = Callable[[str, torch.Tensor], torch.Tensor]


class Delivery:
    """What passes between the error tap and the points during one step's backward call.

    ``source``: makes each point's signal (set by :meth:`DirectFeedback.deliver`); ``error``:
    ``e``, set by the tap; ``kept``: the signals by point name, when the pass was cut with
    ``keep_signals`` (diagnostics).
    """

    __slots__ = ("source", "error", "kept", "autocast")

    def __init__(self, device_type: str, keep_signals: bool = False) -> None:
        self.source: SignalSource | None = None
        self.error: torch.Tensor | None = None
        self.kept: dict[str, torch.Tensor] | None = {} if keep_signals else None
        #: the device type, when the forward pass ran under autocast (the step runs inside it)
        self.autocast = device_type if torch.is_autocast_enabled(device_type) else None

    def signal(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """Point ``name``'s signal from ``e``, shaped ``shape`` and of ``dtype`` (``h_l``'s)."""
        e = self.error
        if self.autocast is not None:
            with torch.autocast(self.autocast, enabled=False):  # the projection stays float32
                signal = self.source(name, e)
        else:
            signal = self.source(name, e)
        signal = signal.view(shape) if signal.dtype == dtype else signal.reshape(shape).to(dtype)
        if self.kept is not None:
            self.kept[name] = signal.detach()
        return signal


def _signal_hook(delivery: Delivery, name: str, shape: torch.Size, dtype: torch.dtype):
    """The gradient hook of ``h_l``: replaces the chain's placeholder with the point's signal.

    Outside a delivery (no ``e`` yet: some other backward pass through ``h_l``) it changes nothing.
    """

    def hand_signal(grad: torch.Tensor) -> torch.Tensor | None:
        return None if delivery.error is None else delivery.signal(name, shape, dtype)
    return hand_signal


class _ErrorTap(torch.autograd.Function):
    """Identity on the tensor where ``e`` is taken; backward keeps ``e`` and wakes the chain.

    ``chain``: the 0-d sum of every point's ``h_l.sum()``, accumulated in the forward pass (its
    value is never used, only its graph: each ``h_l.sum()`` node leads into block ``l``).
    """

    @staticmethod
    def forward(ctx, at: torch.Tensor, chain: torch.Tensor | None, delivery: Delivery) -> torch.Tensor:
        ctx.delivery, ctx.chained = delivery, chain is not None
        return at.view_as(at)

    @staticmethod
    def backward(ctx, e: torch.Tensor):
        ctx.delivery.error = e
        return e, (e.new_zeros(()) if ctx.chained else None), None


@dataclass
class CutPass:
    """The record of one forward pass with the graph cut at every feedback point.

    ``output``: the model output ``y`` (``(batch, o)`` or ``(batch, T, o)``), in the head's graph;
    ``error_at``: the tensor ``e`` is taken at (``y``, or the Head's input ``z``), so ``e`` has its
    shape; ``shapes``: ``h_l.shape`` per point name, in forward order; ``delivery``: filled during
    the backward call. Optional parts: ``activities`` (``h_l`` detached, for methods that set
    ``keeps_activities``); ``tangents`` (``d_l`` per point) and ``output_tangent`` (``u`` at
    ``error_at``) when the pass carried forward-mode tangents; ``estimator``: the method's Jacobian
    estimator for this step, resolved once (GrAPE).
    """

    output: torch.Tensor
    error_at: torch.Tensor
    shapes: dict[str, torch.Size]
    delivery: Delivery
    activities: dict[str, torch.Tensor] | None = None
    tangents: dict[str, torch.Tensor] | None = None
    output_tangent: torch.Tensor | None = None
    estimator: Any = None


@dataclass
class Estimator:
    """A Jacobian estimator resolved for one step: ``estimate(x, record) -> {name: J~_l (o, n_l)}``.

    ``draw``: when set, the training pass itself carries tangents ``d_l = draw(h_l)`` (forward-mode
    AD) and ``estimate`` reads them from the record.
    """

    estimate: Callable[[torch.Tensor, CutPass], dict[str, torch.Tensor]]
    draw: Callable[[torch.Tensor], torch.Tensor] | None = None


class DirectFeedback(Method):
    """Base of the direct-feedback family: cut the graph at every point, send each a signal.

    Forward: each :class:`FeedbackPoint` hands the next block ``h_l`` detached, so no input
    gradient is ever computed across blocks. The output error ``e = dL/dy`` (``(batch, o)``) comes
    out of the backward call itself, and point ``l`` receives :meth:`signal` (``B_l e`` for DFA);
    inside each block ordinary autograd turns it into weight gradients. The head (the block after
    the last point) receives its true gradient. With a :class:`bpfree.Head` marker, ``e = dL/dz`` at
    the head's input instead. ``B_l`` of shape ``(n_l, o)`` is created on the first step, seeded by
    ``seed``. See the module docstring for the step's pipeline.
    """

    #: Methods whose update reads ``h_l`` after the delivery (DKP) keep it in the record.
    keeps_activities = False

    @dataclass
    class Options:
        init: str = option("normal", "distribution of the initial feedback matrices", choices=("normal", "uniform"))
        scale: float = option(1.0, "B_l entries have variance scale^2 / o (each row has norm ~scale)")
        seed: int = option(0, "seed of the method's own generator (feedback matrices, tangents)")
        calibrate_every: int = option(0, "every T steps (or epochs) one ordinary BP step instead (0: never)")
        calibrate_unit: str = option("steps", "unit of calibrate_every", choices=("steps", "epochs"))

        def check(self) -> None:
            if self.calibrate_every < 0:
                raise OptionError(f"option 'calibrate_every' must not be negative, got {self.calibrate_every}")

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.points = feedback_points(model)
        if not self.points:
            raise ValueError(
                f"method {self.name!r} needs feedback points in the model, and it has none: "
                "use bpfree.attach() on an nn.Sequential or place bpfree.FeedbackPoint modules"
            )
        self.names = {id(p): n for n, p in self.points}
        self.head = head_marker(model)
        self.markers = all_points(model)  # the points and the Head, for handled()
        self.state.update(
            feedback={},                    # B_l per point name, (n_l, o)
            generator=MethodGenerator(self.options.seed),
            steps=0,                        # step() calls so far, calibration steps included
            calibrate_next=False,           # a BP step is due (calibrate_unit = epochs)
        )

    # -- the step -----------------------------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """A direct-feedback step, or a BP calibration step when one is due.

        Calibration (``calibrate_every = T``): steps ``T, 2T, ...`` (counting from 1) are BP steps,
        or with ``calibrate_unit = "epochs"`` the first step after every ``T``-th epoch.
        """
        self.state["steps"] += 1
        if self.calibration_due():
            return self.calibration_step(x, y, loss_fn)
        record = self.forward_cut(x, estimator=self.estimator_for_step(x.device))
        self.ensure_feedback(record)
        self.before_delivery(record, x)
        source = self.signal_source(record, y)
        loss = loss_fn(record.output, y)
        self.deliver(record, loss, source)
        self.after_delivery(record)
        return StepResult(loss.detach(), record.output.detach())

    def forward_cut(self, x: torch.Tensor, *, estimator: Estimator | None = None,
                    keep_signals: bool = False) -> CutPass:
        """One forward pass with the graph cut at every point, every ``h_l`` linked into the chain.

        With ``estimator.draw`` the pass runs under forward-mode AD: every point hands the next
        block ``h_l`` detached with tangent ``(incoming tangent) + d_l``, ``d_l = draw(h_l)``; the
        primal keeps its graph for the delivery, and the record gets ``d_l`` and the tangent ``u``
        at ``error_at`` (``u = sum_l J_l d_l``).
        """
        draw = estimator.draw if estimator is not None else None
        delivery = Delivery(x.device.type, keep_signals)
        shapes: dict[str, torch.Size] = {}
        activities = {} if self.keeps_activities else None
        tangents: dict[str, torch.Tensor] | None = {} if draw is not None else None
        chain: list[torch.Tensor | None] = [None]  # the sum of the points' links so far
        at_head: list[tuple[torch.Tensor, torch.Tensor | None]] = []

        def cut(point, h: torch.Tensor) -> torch.Tensor:
            tangent = None
            if draw is not None:
                h, tangent = fwAD.unpack_dual(h)
            if point is self.head:
                at_head.append((h, tangent))
                return _ErrorTap.apply(h, chain[0], delivery)
            name = self.names[id(point)]
            shapes[name] = h.shape
            if activities is not None:
                activities[name] = h.detach()
            if h.requires_grad:  # a node into block l on the chain, whose gradient the hook replaces
                link = h.sum()
                chain[0] = link if chain[0] is None else chain[0] + link
                h.register_hook(_signal_hook(delivery, name, h.shape, h.dtype))
            if draw is None:
                return h.detach()
            d = tangents[name] = draw(h)
            return fwAD.make_dual(h.detach(), d if tangent is None else tangent.detach() + d)

        with handled(self.model, cut, self.markers), (fwAD.dual_level() if draw is not None else _nothing()):
            out = forward_checked(self.model, x)
            u = None
            if draw is not None:
                out, u = fwAD.unpack_dual(out)
        if at_head:
            error_at, u = at_head[0][0], at_head[0][1] if draw is not None else None
        else:
            error_at, out = out, _ErrorTap.apply(out, chain[0], delivery)
        return CutPass(out, error_at, shapes, delivery, activities, tangents,
                       None if u is None else u.detach(), estimator)

    def ensure_feedback(self, record: CutPass) -> None:
        """Create ``B_l`` (``(n_l, o)``) for points seen for the first time; check the others."""
        like = self.projected(record)
        o, flat = like.shape[-1], like.dim() == 2
        feedback = self.state["feedback"]
        for name, shape in record.shapes.items():
            B = feedback.get(name)
            # n_l; for (batch, o) errors every h_l is flattened after the batch dimension
            n = math.prod(shape[1:]) if flat and shape[0] == like.shape[0] else point_width(like, shape)
            if B is None:
                feedback[name] = init_feedback(n, o, init=self.options.init, scale=self.options.scale,
                                               generator=self.state.generator.on(like.device), device=like.device)
            elif B.shape != (n, o):
                raise ValueError(f"feedback point {name!r} carries {n} features for {o} outputs now, "
                                 f"but its feedback matrix is {tuple(B.shape)}")
            elif B.device != like.device:
                feedback[name] = B.to(like.device)

    def projected(self, record: CutPass) -> torch.Tensor:
        """The tensor whose rows ``B_l`` projects (DFA: ``e``, shaped like ``record.error_at``)."""
        return record.error_at

    def estimator_for_step(self, device: torch.device) -> Estimator | None:
        """A Jacobian estimator for this step (GrAPE on its update steps), or ``None``."""
        return None

    def before_delivery(self, record: CutPass, x: torch.Tensor) -> None:
        """Hook for methods that change ``B_l`` each step (GrAPE) before the signals go out."""

    def after_delivery(self, record: CutPass) -> None:
        """Hook for methods that update ``B_l`` from this step's ``h_l`` and ``e`` (DKP)."""

    def signal_source(self, record: CutPass, y: torch.Tensor) -> SignalSource:
        """``source(name, e)`` for this step: DFA's ``B_l e``, ``(batch, n_l)`` (per token:
        ``(batch, T, n_l)``), computed in ``B_l``'s dtype (float32)."""
        feedback = self.state["feedback"]

        def projected_error(name: str, e: torch.Tensor) -> torch.Tensor:
            B = feedback[name]
            return (e if e.dtype == B.dtype else e.to(B.dtype)) @ B.t()
        return projected_error

    def deliver(self, record: CutPass, loss: torch.Tensor, source: SignalSource) -> None:
        """The one backward call: ``e``, the head's gradients, and every block's signal from
        ``source`` (see the module docstring)."""
        record.delivery.source = source
        loss.backward()

    # -- calibration ----------------------------------------------------------------------------
    def calibration_due(self) -> bool:
        """Whether this step is a calibration step (``calibrate_every`` steps, or after epochs)."""
        T, state = self.options.calibrate_every, self.state
        if T and self.options.calibrate_unit == "steps":
            return state["steps"] % T == 0
        due, state["calibrate_next"] = state["calibrate_next"], False
        return due

    def on_epoch_end(self, epoch: int) -> None:
        T = self.options.calibrate_every
        if T and self.options.calibrate_unit == "epochs" and epoch % T == 0:
            self.state.calibrate_next = True

    def calibration_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """One ordinary BP step on this mini-batch: ``loss.backward()`` through every block."""
        out = forward_checked(self.model, x)
        loss = loss_fn(out, y)
        loss.backward()
        return StepResult(loss.detach(), out.detach(), {"calibration": 1.0})

    # -- diagnostics and state --------------------------------------------------------------------
    def probe_signals(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """The signals this method sends to every point for ``(x, y)``, with the current ``B_l``.

        Also fills ``.grad`` as a step would, but changes none of the method's state (no feedback
        update, no step counted): for diagnostics, inside :func:`bpfree.metrics.alignment.sandbox`.
        """
        record = DirectFeedback.forward_cut(self, x, keep_signals=True)
        if any(name not in self.state.feedback for name in record.shapes):
            return {}
        source = self.signal_source(record, y)
        self.deliver(record, loss_fn(record.output, y), source)
        return record.delivery.kept

    def feedback_matrices(self) -> dict[str, torch.Tensor]:
        return self.state.feedback

    def check_state(self, state: dict[str, Any]) -> None:
        unknown = set(state.get("feedback", {})) - {n for n, _ in self.points}
        if unknown:
            raise ValueError(f"checkpoint holds feedback for points this model lacks: {sorted(unknown)}")


class _nothing:
    """A null context manager (cheaper to enter than ``contextlib.nullcontext`` on the hot path)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


@register
class DFA(DirectFeedback):
    """Direct Feedback Alignment: point ``l`` receives ``B_l e`` with a fixed random ``B_l``.

    ``e = dL/dy``: ``(batch, o)``; ``B_l``: ``(n_l, o)``, entries ``N(0, scale^2/o)`` (or uniform
    with that variance); signal ``delta_l = B_l e`` per sample, reshaped to ``h_l``. Needs feedback
    points (``bpfree.attach`` or a zoo model).
    """

    name = "dfa"
    supports_loss_scaling = True
    summary = "direct feedback alignment: fixed random B_l e at every feedback point"
