"""Direct Feedback Alignment (Nøkland, 2016) and the machinery its family shares.

A direct-feedback step is a pipeline of plain values (DESIGN.md §5)::

    record = forward_cut(x)          # y, where e is taken, each point's shape, estimator inputs
    ensure_feedback(record)          # B_l (n_l, o) exists for every point (made on the first step)
    before_delivery(record, x)       # GrAPE: estimate J~_l and move B_l; DFA: nothing
    record.delivery.target = link_target(record, y)  # None: the links project e (DRTP: y*/N)
    loss = loss_fn(record.output, y)
    deliver(record, loss)            # ONE autograd call: e = dL/dy, the head, every block's B_l e
    after_delivery(record)           # DKP: B_l's own update from (h_l, e)

How one backward call delivers every signal: the forward pass cuts the graph at every point (the
next block sees ``h_l`` detached) and, at each point, makes a *link* ``z_l = h_l B_l``
(``(batch, n_l) @ (n_l, o)``, the points' features flattened, per token for sequences). The links
enter an *error tap* on the tensor where ``e`` is taken (``y``, or the input ``z`` of a
:class:`bpfree.Head`), which is the identity in the forward pass. ``loss.backward()`` runs the
head's backward as BP would; the tap receives ``e = dL/dy``, keeps it in the step's
:class:`Delivery` and hands it to every link, and each link's own backward turns it into
``dL/dh_l = e B_l^T``, the DFA signal ``B_l e`` per sample, which flows into block ``l``. For up
to :attr:`DirectFeedback.plain_link_outputs` outputs the link is the plain product, so the signals
are made by autograd itself, with no Python code per point in the backward pass; for wider outputs
(a vocabulary) and under autocast it is :class:`_Link`, whose forward is a zero-memory
placeholder and whose backward makes the same product in float32. A link is made after its
block's forward operations and before the next block's, so autograd (which runs the most recently
created ready node first) runs each block's backward right after its signal is made: every signal
exists only while its block needs it. (On the first step the ``B_l`` are made after the forward
pass, so that step has no links: ``loss.backward()`` stops at a leaf in place of ``error_at``,
whose gradient is ``e``, and one more call delivers every signal.)
The link reads ``B_l`` when the backward pass runs, so a feedback update between the forward pass
and the delivery (GrAPE) is the one the signals use. Nothing of a step is kept on the method.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..feedback.estimators import matched_tangents
from ..feedback.matrices import init_feedback, point_width, project
from ..options import OptionError, option
from ..points import all_points, feedback_points, handled, head_marker
from ..streams import BlockStreams, StreamPass
from . import register
from .base import LossFn, Method, MethodGenerator, StepResult
from .guards import forward_checked


class Delivery:
    """What the error tap shares with the rest of one step.

    ``error``: ``e``, set by the tap during the backward call; ``target``: what the links receive in
    place of ``e`` when a method projects something else (DRTP's one-hot targets), set before it;
    ``on_error``: called with ``e`` the moment the tap receives it, before any block's backward runs
    (a pipeline's last stage sends ``e`` to the other stages from here).
    """

    __slots__ = ("error", "target", "on_error")

    def __init__(self) -> None:
        self.error: torch.Tensor | None = None
        self.target: torch.Tensor | None = None
        self.on_error: Callable[[torch.Tensor], None] | None = None


class _ErrorTap(torch.autograd.Function):
    """Identity on the tensor where ``e`` is taken; backward keeps ``e`` and hands it to the links.

    ``links``: the ``z_l = h_l B_l`` of the forward pass; each receives ``e`` (or the delivery's
    ``target``), reshaped to its own shape (a view), and its backward makes ``B_l e``.
    """

    @staticmethod
    def forward(ctx, at: torch.Tensor, delivery: Delivery, *links: torch.Tensor) -> torch.Tensor:
        ctx.delivery, ctx.metas = delivery, [(z.shape, z.dtype) for z in links]
        return at.view_as(at)

    @staticmethod
    def backward(ctx, e: torch.Tensor):
        d = ctx.delivery
        d.error = e
        if d.on_error is not None:
            d.on_error(e)
        g = e if d.target is None else d.target
        return (e, None) + tuple(g if g.shape == shape and g.dtype == dtype else g.reshape(shape).to(dtype)
                                 for shape, dtype in ctx.metas)


class _Link(torch.autograd.Function):
    """The link of one point: a node on ``h_l`` whose backward turns ``e`` into ``e B_l^T``.

    Its forward value is never used, only its shape ``(batch[, T], o)``: it is a zero-stride
    placeholder (no memory, no product). Backward projects in ``B_l``'s dtype (float32) with
    autocast off, reads ``B_l`` as it is when the backward pass runs (so a feedback update between
    the forward pass and the delivery is the one the signal uses), and casts the signal to
    ``h_l``'s dtype.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.B, ctx.dtype = B, flat.dtype
        return B.new_zeros(()).expand(flat.shape[:-1] + (B.shape[1],))

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        B = ctx.B
        g = g if g.dtype == B.dtype else g.to(B.dtype)
        if torch.is_autocast_enabled(g.device.type):
            with torch.autocast(g.device.type, enabled=False):
                signal = g @ B.t()
        else:
            signal = g @ B.t()
        return (signal if signal.dtype == ctx.dtype else signal.to(ctx.dtype)), None


@dataclass
class CutPass:
    """The record of one forward pass with the graph cut at every feedback point.

    ``output``: the model output ``y`` (``(batch, o)`` or ``(batch, T, o)``), in the head's graph
    (of a pipeline stage before the last: what the stage hands on); ``error_at``: the tensor ``e`` is
    taken at (``y``, or the Head's input ``z``), so ``e`` has its shape (``None`` on such a stage); ``shapes``: ``h_l.shape`` per point name, in forward order; ``delivery``: shared with
    the error tap; ``linked``: whether every visited ``h_l`` got a link (its ``B_l`` existed). Optional
    parts: ``points`` (``h_l`` itself, for methods that set ``keeps_points``, and on a pass
    without links); ``tangents`` (``d_l`` per point) and ``output_tangent`` (``u`` at
    ``error_at``) when the pass carried forward-mode tangents; ``estimator``: the method's Jacobian
    estimator for this step, resolved once (GrAPE); ``error_leaf``: on a pass without links, the
    detached copy of ``error_at`` the head was run on (``e`` is its gradient); ``first_point``: the
    ``h`` of the first point visited (detached), when the estimator starts its own pass there
    (``Estimator.from_first_point``).
    """

    output: torch.Tensor
    error_at: torch.Tensor | None
    shapes: dict[str, torch.Size]
    delivery: Delivery
    linked: bool
    points: dict[str, torch.Tensor] | None = None
    tangents: dict[str, torch.Tensor] | None = None
    output_tangent: torch.Tensor | None = None
    estimator: Any = None
    error_leaf: torch.Tensor | None = None
    first_point: torch.Tensor | None = None


@dataclass
class Estimator:
    """A Jacobian estimator resolved for one step: ``estimate(x, record) -> {name: J~_l (o, n_l)}``.

    ``draw``: when set, the training pass itself carries tangents ``d_l = draw(h_l)`` (forward-mode
    AD) and ``estimate`` reads them from the record. ``from_first_point``: the training pass keeps
    ``h`` at its first point in the record (``first_point``), where ``estimate``'s own pass starts.
    """

    estimate: Callable[[torch.Tensor, CutPass], dict[str, torch.Tensor]]
    draw: Callable[[torch.Tensor], torch.Tensor] | None = None
    from_first_point: bool = False


@dataclass
class TangentProbe:
    """What a pipelined estimate pass draws: ``d_l = draw((samples, *h_l features), generator, ...)``
    at every point in forward order, on the first ``samples`` inputs of the batch, and how it gets
    ``u = sum_l J_l d_l``: ``scheme`` ``forward`` (forward-mode AD) or ``central`` (a difference of
    one pass over ``[x; x]`` perturbed by ``+-step d_l``)."""

    generator: torch.Generator
    draw: Callable[..., torch.Tensor]
    samples: int
    scheme: str = "forward"
    step: float = 1e-2


def flat_point(h: torch.Tensor, n: int) -> torch.Tensor:
    """``h_l`` as ``(batch, n_l)``, or ``(batch, T, n_l)`` when the feedback acts per token.

    ``n``: the rows of ``B_l``. Flattening after the batch dimension is tried first; a sequence map
    ``(batch, T, ...)`` whose features per token number ``n`` is flattened after ``T`` (feedback
    per token).
    """
    if math.prod(h.shape[1:]) == n:
        return h if h.dim() == 2 else h.reshape(h.shape[0], n)
    if h.dim() >= 3 and math.prod(h.shape[2:]) == n:
        return h if h.dim() == 3 else h.reshape(h.shape[0], h.shape[1], n)
    raise ValueError(f"a feedback point carries {tuple(h.shape[1:])} features now, but its feedback "
                     f"matrix has {n} rows")


class DirectFeedback(Method):
    """Base of the direct-feedback family: cut the graph at every point, send each a signal.

    Forward: each :class:`FeedbackPoint` hands the next block ``h_l`` detached, so no input
    gradient is ever computed across blocks. The output error ``e = dL/dy`` (``(batch, o)``) comes
    out of the backward call itself, and point ``l`` receives ``B_l e`` through its link (DRTP:
    ``B_l y*``); inside each block ordinary autograd turns it into weight gradients. The head (the
    block after the last point) receives its true gradient. With a :class:`bpfree.Head` marker,
    ``e = dL/dz`` at the head's input instead. ``B_l`` of shape ``(n_l, o)`` is created on the first
    step, seeded by ``seed``. See the module docstring for the step's pipeline.
    """

    #: Methods that read ``h_l`` itself after the forward pass (DKP, fg-activity) keep it in the record.
    keeps_points = False

    @dataclass
    class Options:
        init: str = option("normal", "distribution of the initial feedback matrices", choices=("normal", "uniform"))
        scale: float = option(1.0, "B_l entries have variance scale^2 / o (each row has norm ~scale)")
        seed: int = option(0, "seed of the method's own generator (feedback matrices, tangents)")
        calibrate_every: int = option(0, "every T steps (or epochs) one ordinary BP step instead (0: never)")
        calibrate_unit: str = option("steps", "unit of calibrate_every: steps; epochs (one BP step after every T-th "
                                     "epoch, the published schedule); epoch-all (BP on every batch of every T-th epoch)",
                                     choices=("steps", "epochs", "epoch-all"))
        calibrate_scale: str = option("none", "gradients of a BP calibration step: as they are (none), or rescaled to the "
                                      "global norm of the direct-feedback steps' gradients (feedback-norm: a moving "
                                      "average), so that one BP step does not jolt the optimizer's moment estimates",
                                      choices=("none", "feedback-norm"))

        parallel: str = option("none", "streams: each block's forward and backward on its own CUDA stream, so the "
                               "blocks' backward passes run concurrently on one GPU (bpfree.streams; no effect on "
                               "the CPU)", choices=("none", "streams"))

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
        self.block_streams = BlockStreams()  # parallel=streams: the CUDA streams, one per block (made once)
        self.state.update(
            feedback={},                    # B_l per point name, (n_l, o)
            generator=MethodGenerator(self.options.seed),
            steps=0,                        # step() calls so far, calibration steps included
            calibrate_next=False,           # a BP step is due (calibrate_unit = epochs)
            # this epoch is a BP epoch (calibrate_unit = epoch-all; epoch 1 is one when T = 1)
            calibrate_epoch=(getattr(self.options, "calibrate_unit", "steps") == "epoch-all"
                             and self.options.calibrate_every == 1),
            feedback_grad_norm=None,        # moving average of |grad| of the direct-feedback steps (calibrate_scale)
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
        streams = self.block_streams.forward(x.device, self.options.parallel == "streams")
        record = self.forward_cut(x, estimator=self.estimator_for_step(x.device), streams=streams)
        self.ensure_feedback(record)
        self.before_delivery(record, x)
        record.delivery.target = self.link_target(record, y)
        loss = loss_fn(record.output, y)
        self.deliver(record, loss)
        if streams is not None:
            streams.join()
        self.after_delivery(record)
        if self.options.calibrate_every and self.options.calibrate_scale == "feedback-norm":
            self.track_gradient_norm()
        return StepResult(loss.detach(), record.output.detach())

    def forward_cut(self, x: torch.Tensor, *, estimator: Estimator | None = None, module: nn.Module | None = None,
                    tapped: bool = True, streams: StreamPass | None = None) -> CutPass:
        """One forward pass with the graph cut at every point and every ``h_l`` linked to the tap.

        With ``estimator.draw`` the pass runs under forward-mode AD: every point hands the next
        block ``h_l`` detached with tangent ``(incoming tangent) + d_l``, ``d_l = draw(h_l)``; the
        primal keeps its graph for the delivery, and the record gets ``d_l`` and the tangent ``u``
        at ``error_at`` (``u = sum_l J_l d_l``).

        ``module``: run this part of the model instead of the whole (a pipeline stage: a slice of
        an ``nn.Sequential`` model's children). ``tapped=False``: a stage before the last one, whose
        output is not where ``e`` is taken: no links and no tap; the record keeps every ``h_l``
        (``points``), its ``output`` is what the stage hands on and ``error_at`` is ``None``.
        ``streams``: the pass switches to the next block's CUDA stream at every point
        (:mod:`bpfree.streams`), so each block's backward runs on its own stream.
        """
        draw = estimator.draw if estimator is not None else None
        first: list[torch.Tensor] | None = [] if estimator is not None and estimator.from_first_point else None
        delivery = Delivery()
        shapes: dict[str, torch.Size] = {}
        feedback = self.state["feedback"]
        # every visited point links to the tap if it has its B_l; the first step has none yet
        points = {} if not tapped or self.keeps_points or len(feedback) < len(self.points) else None
        missing = [False]  # a visited point without B_l: the pass has no links
        autocast = torch.is_autocast_enabled(x.device.type)
        tangents: dict[str, torch.Tensor] | None = {} if draw is not None else None
        links: list[torch.Tensor] = []
        at_head: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        leaves: list[torch.Tensor] = []  # without links: e is taken at a leaf in place of error_at

        def leaf_of(at: torch.Tensor) -> torch.Tensor:
            leaves.append(at.detach().requires_grad_())
            return leaves[0]

        def cut(point, h: torch.Tensor) -> torch.Tensor:
            tangent = None
            if draw is not None:
                h, tangent = fwAD.unpack_dual(h)
            if point is self.head:
                at_head.append((h, tangent))
                return _ErrorTap.apply(leaf_of(h) if missing[0] else h, delivery, *links)
            name = self.names[id(point)]
            if first is not None and not shapes:
                first.append(h.detach())
            shapes[name] = h.shape
            if points is not None:
                points[name] = h
            if h.requires_grad and tapped:
                if name in feedback:
                    links.append(self.link(name, h, autocast))
                else:
                    missing[0] = True
            if streams is not None:
                streams.next_block()
            if draw is None:
                return h.detach()
            d = draw(h)
            if d is None:  # a point the draw declines: no tangent of its own
                return h.detach() if tangent is None else fwAD.make_dual(h.detach(), tangent.detach())
            tangents[name] = d
            return fwAD.make_dual(h.detach(), d if tangent is None else tangent.detach() + d)

        model = self.model if module is None else module
        with handled(model, cut, self.markers if module is None else None), \
                (fwAD.dual_level() if draw is not None else contextlib.nullcontext()), \
                (matched_tangents(model) if draw is not None else contextlib.nullcontext()):
            out = forward_checked(model, x)
            if streams is not None:
                streams.end_forward()
            u = None
            if draw is not None:
                out, u = fwAD.unpack_dual(out)
        if not tapped:
            return CutPass(out, None, shapes, delivery, False, points, tangents, None if u is None else u.detach(),
                           estimator)
        if at_head:
            error_at, u = at_head[0][0], at_head[0][1] if draw is not None else None
        else:
            error_at, out = out, _ErrorTap.apply(leaf_of(out) if missing[0] else out, delivery, *links)
        return CutPass(out, error_at, shapes, delivery, not missing[0], points, tangents,
                       None if u is None else u.detach(), estimator, leaves[0] if leaves else None,
                       first[0] if first else None)

    #: Up to this many outputs a link is the plain product ``h_l B_l`` (autograd's own node, no
    #: Python in the backward pass; its ``(batch, o)`` value costs little); wider outputs (a
    #: vocabulary) and autocast take :class:`_Link`, whose forward is a zero-memory placeholder.
    plain_link_outputs = 64

    def link(self, name: str, h: torch.Tensor, autocast: bool) -> torch.Tensor:
        """The link of point ``name``: the tap's ``e`` becomes ``e B_l^T`` in its backward
        (``autocast``: the pass runs under autocast)."""
        B = self.state["feedback"][name]
        if B.device != h.device:
            B = self.state["feedback"][name] = B.to(h.device)
        flat = flat_point(h, B.shape[0])
        if B.shape[1] <= self.plain_link_outputs and flat.dtype == B.dtype and not autocast:
            if h.dim() == 2:
                # z^T = B^T h^T: the same products; the CPU matrix kernels run a (batch, n) x (n, o)
                # product with a narrow o slower than (o, n) x (n, batch). Autograd makes the gradient
                # of h^T in h^T's own layout, so the signal e B^T reaches the block row-major, as
                # from h B. (A point with more dimensions keeps h B: its flat view is reshaped.)
                return (B.t() @ flat.t()).t()
            return flat @ B
        return _Link.apply(flat, B)

    def ensure_feedback(self, record: CutPass) -> None:
        """Create ``B_l`` (``(n_l, o)``) for points seen for the first time (the first step).

        ``B_l`` is stored in the memory layout of its transpose (``o`` rows of ``n_l``), the layout
        of the Jacobian estimates it may be compared with. (Once every point has its ``B_l``, a
        point whose width changes is reported by its link.)
        """
        feedback = self.state["feedback"]
        like = self.projected(record)
        o = like.shape[-1]
        if record.linked:
            for name, B in feedback.items():
                if B.shape[1] != o:
                    raise ValueError(f"feedback point {name!r} projects {o} outputs now, but its feedback matrix "
                                     f"is {tuple(B.shape)}")
            return
        for name, shape in record.shapes.items():
            if name not in feedback:
                B = init_feedback(point_width(like, shape), o, init=self.options.init, scale=self.options.scale,
                                  generator=self.state["generator"].on(like.device), device=like.device)
                feedback[name] = B.t().contiguous().t()

    def projected(self, record: CutPass) -> torch.Tensor:
        """The tensor whose rows ``B_l`` projects (DFA: ``e``, shaped like ``record.error_at``)."""
        return record.error_at

    def estimator_for_step(self, device: torch.device) -> Estimator | None:
        """A Jacobian estimator for this step (GrAPE on its update steps), or ``None``."""
        return None

    def before_delivery(self, record: CutPass, x: torch.Tensor) -> None:
        """Hook for methods that change ``B_l`` each step (GrAPE) before the signals go out."""

    def check_pipelined(self) -> None:
        """Refuse options a pipeline-parallel run (:mod:`bpfree.pipeline`) cannot honour."""
        if self.options.calibrate_every:
            raise OptionError("calibration (calibrate_every) runs BP steps, which a direct-feedback pipeline does not "
                              "schedule; train with --pipeline without it")

    def pipeline_probe(self, device: torch.device) -> TangentProbe | None:
        """The forward-mode tangents this step's feedback update needs from a pipelined pass over the
        first inputs of the batch (GrAPE on its update steps), or ``None``."""
        return None

    def after_delivery(self, record: CutPass) -> None:
        """Hook for methods that update ``B_l`` from this step's ``h_l`` and ``e`` (DKP)."""

    def link_target(self, record: CutPass, y: torch.Tensor) -> torch.Tensor | None:
        """What the links project in place of ``e`` (``None``: ``e`` itself; DRTP: ``y* / N``)."""
        return None

    def deliver(self, record: CutPass, loss: torch.Tensor) -> None:
        """The one backward call: ``e``, the head's gradients and every block's signal.

        Without links (the first step) the signals are made from ``e`` first (:meth:`deliver_signals`).
        """
        if record.linked:
            loss.backward()
        else:
            self.deliver_signals(record, loss, lambda e: self.signals(record, e))

    def signals(self, record: CutPass, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every point's signal for the error ``e``: ``B_l e`` (``B_l`` times the delivery's target),
        projected in ``B_l``'s dtype (float32) with autocast off, as the links do."""
        feedback, projected = self.state["feedback"], e if record.delivery.target is None else record.delivery.target
        with torch.autocast(e.device.type, enabled=False):
            return {name: project(feedback[name], projected.to(feedback[name].dtype), shape)
                    for name, shape in record.shapes.items()}

    @staticmethod
    def deliver_signals(record: CutPass, loss: torch.Tensor,
                        signals_of: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """A delivery from a pass without links: ``loss.backward()`` through the head alone (which
        stops at ``error_leaf``, whose gradient is ``e``), then one call from ``error_at`` (with ``e``,
        for the block before a Head) and every ``h_l`` (with its signal, ``signals_of(e)[name]``).
        Returns the signals."""
        loss.backward()
        e = record.error_leaf.grad
        signals = signals_of(e)
        head = [(record.error_at, e)] if record.error_at.requires_grad else []
        DirectFeedback.backward_signals(record, signals, head)
        return signals

    @staticmethod
    def backward_signals(record: CutPass, signals: dict[str, torch.Tensor],
                         extra: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> None:
        """One autograd call that sends every point's ``signal`` into ``record.points[name]`` (its
        ``h_l``, reshaped and cast to it), and each ``(root, grad)`` of ``extra`` into its root."""
        roots = [root for root, _ in extra]
        grads = [grad.to(root.dtype) for root, grad in extra]
        for name, signal in signals.items():
            h = record.points[name]
            if h.requires_grad:
                roots.append(h)
                grads.append(signal.reshape(h.shape).to(h.dtype))
        if roots:
            torch.autograd.backward(roots, grads)

    # -- calibration ----------------------------------------------------------------------------
    def calibration_due(self) -> bool:
        """Whether this step is a calibration step (``calibrate_every`` steps, or after epochs)."""
        T, state = self.options.calibrate_every, self.state
        if T and self.options.calibrate_unit == "steps":
            return state["steps"] % T == 0
        if self.options.calibrate_unit == "epoch-all":
            return bool(state["calibrate_epoch"])
        due, state["calibrate_next"] = state["calibrate_next"], False
        return due

    def on_epoch_end(self, epoch: int) -> None:
        """After epoch ``epoch`` (counted from 1): ``epochs`` makes the next step a BP step when
        ``epoch`` is a multiple of ``T``; ``epoch-all`` makes all of epoch ``epoch + 1`` BP when
        ``epoch + 1`` is one (epochs ``T, 2T, ...``)."""
        T, unit = self.options.calibrate_every, self.options.calibrate_unit
        if T and unit == "epochs" and epoch % T == 0:
            self.state.calibrate_next = True
        if T and unit == "epoch-all":
            self.state.calibrate_epoch = (epoch + 1) % T == 0

    def gradient_norm(self) -> torch.Tensor:
        """``sqrt(sum_p |p.grad|^2)`` over the model's parameters (a 0-dim tensor, no host sync)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())

    def track_gradient_norm(self, beta: float = 0.9) -> None:
        """Fold this direct-feedback step's gradient norm into ``state.feedback_grad_norm``
        (``n <- beta n + (1 - beta) |grad|``; the first step sets it)."""
        norm, state = self.gradient_norm().detach(), self.state
        state.feedback_grad_norm = norm if state.feedback_grad_norm is None else (
            beta * state.feedback_grad_norm.to(norm.device) + (1 - beta) * norm)

    def calibration_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """One ordinary BP step on this mini-batch: ``loss.backward()`` through every block.

        With ``calibrate_scale = feedback-norm`` (and a direct-feedback step before it) every
        gradient is then multiplied by ``n_feedback / |grad_BP|``: the BP step keeps its direction
        and takes the size the optimizer has been seeing.
        """
        out = forward_checked(self.model, x)
        loss = loss_fn(out, y)
        loss.backward()
        target = self.state.feedback_grad_norm
        if self.options.calibrate_scale == "feedback-norm" and target is not None:
            factor = target.to(out.device) / self.gradient_norm().clamp_min(1e-12)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor.to(p.grad.dtype))
        return StepResult(loss.detach(), out.detach(), {"calibration": 1.0})

    # -- diagnostics and state --------------------------------------------------------------------
    def probe_signals(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """The signals this method sends to every point for ``(x, y)``, with the current ``B_l``.

        Also fills ``.grad`` as a step would, but changes none of the method's state (no feedback
        update, no step counted): for diagnostics, inside :func:`bpfree.metrics.alignment.sandbox`.
        """
        record = DirectFeedback.forward_cut(self, x)
        if not record.linked:  # a point has no B_l yet: nothing to probe (and nothing is created)
            return {}
        record.delivery.target = self.link_target(record, y)
        self.deliver(record, loss_fn(record.output, y))
        return {name: s.detach() for name, s in self.signals(record, record.delivery.error).items()}

    def feedback_matrices(self) -> dict[str, torch.Tensor]:
        return self.state.feedback

    def check_state(self, state: dict[str, Any]) -> None:
        unknown = set(state.get("feedback", {})) - {n for n, _ in self.points}
        if unknown:
            raise ValueError(f"checkpoint holds feedback for points this model lacks: {sorted(unknown)}")


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
