"""Direct Feedback Alignment (Nøkland, 2016) and the machinery its family shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..feedback.matrices import init_feedback, point_width, project
from ..options import option
from ..points import FeedbackPoint, feedback_points, handled
from . import register
from .base import LossFn, Method, StepResult, check_batch, forward_checked


class DirectFeedback(Method):
    """Base of the direct-feedback family: cut the graph at every point, send each a signal.

    Forward: each :class:`FeedbackPoint` remembers ``h_l`` and hands the next block ``h_l``
    detached, so no input gradient is ever computed across blocks. After the forward pass the
    output error ``e = dL/dy`` (``(batch, o)``) is computed, each point ``l`` receives the signal
    :meth:`signal` (``B_l e`` for DFA), and one ``torch.autograd.backward`` call delivers
    ``(y, e)`` and every ``(h_l, signal_l)``; inside each block ordinary autograd turns the signal
    into weight gradients. The head (the block after the last point) thus receives its true
    gradient. ``B_l`` of shape ``(n_l, o)`` is created on the first step, seeded by ``seed``.
    """

    @dataclass
    class Options:
        init: str = option("normal", "distribution of the initial feedback matrices", choices=("normal", "uniform"))
        scale: float = option(1.0, "B_l entries have variance scale^2 / o (each row has norm ~scale)")
        seed: int = option(0, "seed of the method's own generator (feedback matrices, tangents)")

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.points: list[tuple[str, FeedbackPoint]] = feedback_points(model)
        if not self.points:
            raise ValueError(
                f"method {self.name!r} needs feedback points in the model, and it has none: "
                "use bpfree.attach() on an nn.Sequential or place bpfree.FeedbackPoint modules"
            )
        self.names = {id(p): n for n, p in self.points}
        self.feedback: dict[str, torch.Tensor] = {}
        self.generator: torch.Generator | None = None
        self._generator_state: torch.Tensor | None = None

    # -- pieces subclasses combine -------------------------------------------------------
    def rng(self, device: torch.device) -> torch.Generator:
        """The method's generator on ``device`` (created from ``seed`` or the loaded state)."""
        if self.generator is None or self.generator.device != torch.device(device):
            g = torch.Generator(device=device)
            g.manual_seed(self.options.seed)
            if self._generator_state is not None:
                g.set_state(self._generator_state)
                self._generator_state = None
            self.generator = g
        return self.generator

    def forward_cut(self, x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
        """``(y, [(name, h_l), ...])`` from a forward pass with the graph cut at every point."""
        records: list[tuple[str, torch.Tensor]] = []

        def cut(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
            records.append((self.names[id(point)], h))
            return h.detach()

        with handled(self.model, cut):
            out = forward_checked(self.model, x)
        return out, records

    @staticmethod
    def output_error(out: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, e)`` with ``e = dL/dy`` of the shape of ``out``; no graph is built through the model."""
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
                g = self.rng(h.device)
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

    def deliver(self, out: torch.Tensor, e: torch.Tensor, records, y: torch.Tensor) -> None:
        """One ``autograd.backward`` call: ``(y, e)`` and ``(h_l, signal_l)`` for every point."""
        tensors, grads = [], []
        if out.requires_grad:
            tensors.append(out)
            grads.append(e.to(out.dtype))
        for name, h in records:
            if h.requires_grad:
                tensors.append(h)
                grads.append(self.signal(name, e, h, y))
        if tensors:
            torch.autograd.backward(tensors, grads)

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        check_batch(self.model, x, y)
        out, records = self.forward_cut(x)
        loss, e = self.output_error(out, y, loss_fn)
        self.ensure_feedback(records, e)
        self.before_delivery(x, y, e, records)
        self.deliver(out, e, records, y)
        return StepResult(loss, out.detach(), self.step_metrics())

    def before_delivery(self, x, y, e, records) -> None:
        """Hook for subclasses that change ``B_l`` each step (GrAPE) before the signals go out."""

    def step_metrics(self) -> dict[str, float]:
        return {}

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"feedback": {k: v.detach().clone() for k, v in self.feedback.items()}}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        elif self._generator_state is not None:
            state["generator"] = self._generator_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        known = {n for n, _ in self.points}
        unknown = set(state.get("feedback", {})) - known
        if unknown:
            raise ValueError(f"checkpoint holds feedback for points this model lacks: {sorted(unknown)}")
        self.feedback = {k: v.clone() for k, v in state.get("feedback", {}).items()}
        self.generator = None
        self._generator_state = state.get("generator")


@register
class DFA(DirectFeedback):
    """Direct Feedback Alignment: point ``l`` receives ``B_l e`` with a fixed random ``B_l``.

    ``e = dL/dy``: ``(batch, o)``; ``B_l``: ``(n_l, o)``, entries ``N(0, scale^2/o)`` (or uniform
    with that variance); signal ``delta_l = B_l e`` per sample, reshaped to ``h_l``. Needs feedback
    points (``bpfree.attach`` or a zoo model).
    """

    name = "dfa"
    summary = "direct feedback alignment: fixed random B_l e at every feedback point"
