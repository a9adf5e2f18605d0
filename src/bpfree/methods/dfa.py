"""Direct Feedback Alignment (Nøkland, 2016) and the machinery its family shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..feedback.matrices import init_feedback, point_width, project
from ..options import OptionError, option
from ..points import FeedbackPoint, Head, feedback_points, handled, head_marker
from . import register
from .base import LossFn, Method, MethodGenerator, StepResult, check_batch, forward_checked


class _SignalRoot(torch.autograd.Function):
    """A scalar root whose backward hands ``signal`` to ``h`` as its gradient.

    ``_SignalRoot.apply(h, signal).backward()`` fills the same gradients as
    ``torch.autograd.backward(h, signal)``, but the caller need not keep ``h`` or ``signal``
    alive during the backward pass: the signal is let go once handed on, and ``h`` lives only as
    long as the block's own saved tensors need it.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        ctx.signal = signal
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, _grad: torch.Tensor):
        signal, ctx.signal = ctx.signal, None
        return signal, None


class DirectFeedback(Method):
    """Base of the direct-feedback family: cut the graph at every point, send each a signal.

    Forward: each :class:`FeedbackPoint` remembers ``h_l`` and hands the next block ``h_l``
    detached, so no input gradient is ever computed across blocks. After the forward pass the
    output error ``e = dL/dy`` (``(batch, o)``) is computed, each point ``l`` receives the signal
    :meth:`signal` (``B_l e`` for DFA), and one ``torch.autograd.backward`` call delivers
    ``(y, e)`` and every ``(h_l, signal_l)``; inside each block ordinary autograd turns the signal
    into weight gradients. The head (the block after the last point) thus receives its true
    gradient. With a :class:`bpfree.Head` marker, ``e = dL/dz`` at the head's input instead, found by
    backpropagating through the head alone (which also gives the head its gradients). ``B_l`` of shape ``(n_l, o)`` is created on the first step, seeded by ``seed``.
    """

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
        self.points: list[tuple[str, FeedbackPoint]] = feedback_points(model)
        if not self.points:
            raise ValueError(
                f"method {self.name!r} needs feedback points in the model, and it has none: "
                "use bpfree.attach() on an nn.Sequential or place bpfree.FeedbackPoint modules"
            )
        self.names = {id(p): n for n, p in self.points}
        self.head = head_marker(model)
        self.feedback: dict[str, torch.Tensor] = {}
        self.generator = MethodGenerator(self.options.seed)
        self.steps = 0  # step() calls so far, calibration steps included
        self._calibrate_next = False

    # -- pieces subclasses combine -------------------------------------------------------
    def forward_cut(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """``(y, [(name, h_l), ...])`` from a forward pass with the graph cut at every point.

        With a :class:`Head`, its input ``z`` is handed on as a fresh leaf that requires grad and is
        kept in ``self._head_input`` for :meth:`output_error`.
        """
        records: list[tuple[str, torch.Tensor]] = []
        self._head_input = None

        def cut(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
            if isinstance(point, Head):
                self._head_input = (h, h.detach().requires_grad_())
                return self._head_input[1]
            records.append((self.names[id(point)], h))
            return h.detach()

        with handled(self.model, cut):
            out = forward_checked(self.model, x)
        return out, records

    def output_error(self, out: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, e)``: ``e = dL/dy`` shaped like ``out``, or ``dL/dz`` at the :class:`Head`.

        Without a head no graph is built through the model; with one, the head is backpropagated
        (filling its parameters' ``.grad``). :meth:`deliver` sends ``e`` to ``self._error_at``
        (``y``, or ``z`` as the block before the head computed it).
        """
        if getattr(self, "_head_input", None) is not None:
            z, leaf = self._head_input
            self._head_input = None
            loss = loss_fn(out, y)
            loss.backward()
            self._error_at = z
            return loss.detach(), leaf.grad
        self._error_at = out
        leaf = out.detach().requires_grad_()
        with torch.enable_grad():
            loss = loss_fn(leaf, y)
            (e,) = torch.autograd.grad(loss, leaf)
        return loss.detach(), e

    def ensure_feedback(self, records: list[tuple[str, torch.Tensor]], e: torch.Tensor) -> None:
        """Create ``B_l`` (``(n_l, o)``) for points seen for the first time; move to ``e``'s device."""
        o = e.shape[-1]
        for name, h in records:
            B = self.feedback.get(name)
            n = point_width(e, h)
            if B is None:
                g = self.generator.on(h.device)
                self.feedback[name] = init_feedback(
                    n, o, init=self.options.init, scale=self.options.scale, generator=g, device=h.device
                )
            else:
                if B.shape != (n, o):
                    raise ValueError(
                        f"feedback point {name!r} carries {n} features for {o} outputs now, "
                        f"but its feedback matrix is {tuple(B.shape)}"
                    )
                if B.device != h.device:
                    self.feedback[name] = B.to(h.device)

    def signal(self, name: str, e: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The learning signal sent to point ``name``: ``B_l e`` shaped like ``h``."""
        return project(self.feedback[name], e.to(self.feedback[name].dtype), h).to(h.dtype)

    def deliver(self, e: torch.Tensor, records, y: torch.Tensor) -> None:
        """Send ``(y, e)`` (or ``(z, e)``) and ``(h_l, signal_l)`` into the graph, last block first.

        The blocks' graphs are disjoint (cut at every point), so one backward call per block gives
        the same gradients as a single batched call. Block by block, each signal is made just
        before its block's backward, and neither it nor ``h_l`` is held here while the block runs
        (the entries of ``records`` are consumed; see :class:`_SignalRoot`), so every tensor is
        freed as soon as autograd is done with it and peak memory stays at BP's.
        """
        target = self._error_at
        self._error_at = None
        if target.requires_grad:
            torch.autograd.backward(target, e.to(target.dtype))
        del target
        while records:
            name, h = records.pop()
            if not h.requires_grad:
                continue
            root = _SignalRoot.apply(h, self.signal(name, e, h, y))
            del h
            root.backward()

    def calibration_due(self) -> bool:
        """Whether this step is a calibration step (``calibrate_every`` steps, or after epochs)."""
        T = self.options.calibrate_every
        if T and self.options.calibrate_unit == "steps":
            return self.steps % T == 0
        due, self._calibrate_next = self._calibrate_next, False
        return due

    def on_epoch_end(self, epoch: int) -> None:
        T = self.options.calibrate_every
        if T and self.options.calibrate_unit == "epochs" and epoch % T == 0:
            self._calibrate_next = True

    def calibration_step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """One ordinary BP step on this mini-batch: ``loss.backward()`` through every block."""
        out = forward_checked(self.model, x)
        loss = loss_fn(out, y)
        loss.backward()
        return StepResult(loss.detach(), out.detach(), {"calibration": 1.0})

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """A DFA-family step, or a BP calibration step when one is due.

        Calibration (``calibrate_every = T``): steps ``T, 2T, ...`` (counting from 1) are BP steps,
        or with ``calibrate_unit = "epochs"`` the first step after every ``T``-th epoch.
        """
        check_batch(self.model, x, y)
        self.steps += 1
        if self.calibration_due():
            return self.calibration_step(x, y, loss_fn)
        out, records = self.forward_cut(x)
        loss, e = self.output_error(out, y, loss_fn)
        self.ensure_feedback(records, e)
        self.before_delivery(x, y, e, records)
        self.deliver(e, records, y)
        return StepResult(loss, out.detach(), self.step_metrics())

    def before_delivery(self, x, y, e, records) -> None:
        """Hook for subclasses that change ``B_l`` each step (GrAPE) before the signals go out."""

    def step_metrics(self) -> dict[str, float]:
        return {}

    def probe_signals(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """The signals this method sends to every point for ``(x, y)``, with the current ``B_l``.

        Also fills ``.grad`` as a step would, but changes none of the method's state (no feedback
        update, no step counted): for diagnostics, inside :func:`bpfree.metrics.alignment.sandbox`.
        """
        out, records = self.forward_cut(x)
        _, e = self.output_error(out, y, loss_fn)
        if any(name not in self.feedback for name, _ in records):
            return {}
        signals = {name: self.signal(name, e, h, y).detach() for name, h in records}
        self.deliver(e, records, y)
        return signals

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"feedback": {k: v.detach().clone() for k, v in self.feedback.items()},
                                 "steps": self.steps, "calibrate_next": self._calibrate_next}
        if (g := self.generator.get_state()) is not None:
            state["generator"] = g
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {n for n, _ in self.points}
        unknown = set(state.get("feedback", {})) - known
        if unknown:
            raise ValueError(f"checkpoint holds feedback for points this model lacks: {sorted(unknown)}")
        self.feedback = {k: v.clone() for k, v in state.get("feedback", {}).items()}
        self.generator.set_state(state.get("generator"))
        self.steps = int(state.get("steps", 0))
        self._calibrate_next = bool(state.get("calibrate_next", False))


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
