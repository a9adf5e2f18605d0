"""Forward gradients: unbiased gradient estimates from forward-mode directional derivatives.

* ``fg-weight`` (weight perturbation; Baydin et al. 2022): one JVP of the loss along a random
  direction of *all* parameters.
* ``fg-activity`` (activity perturbation; Ren et al. 2022): random directions at the feedback
  points; each block turns its estimated activity gradient into weight gradients with ordinary,
  local autograd.

Both use :mod:`torch.autograd.forward_ad`; neither runs a backward pass across blocks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from ..feedback.estimators import preserved_buffers
from ..options import OptionError, option
from ..points import FeedbackPoint, Head, handled
from . import register
from .base import LossFn, Method, MethodGenerator, StepResult
from .guards import forward_checked
from .dfa import DirectFeedback


def _check_samples(samples: int) -> None:
    if samples < 1:
        raise OptionError(f"option 'samples' must be at least 1, got {samples}")


@register
class ForwardGradientWeight(Method):
    """Weight-perturbation forward gradient: ``g = (1/K) sum_k (grad L . v_k) v_k``.

    ``theta``: all trainable parameters (``P`` numbers, one vector); ``v_k ~ N(0, I_P)`` (one normal
    tensor per parameter); ``grad L . v_k`` is the directional derivative of the loss, from one
    forward-mode pass (``torch.autograd.forward_ad`` dual parameters through
    ``torch.func.functional_call``; ``torch.func.jvp`` would refuse the in-place update of BatchNorm
    statistics). ``E[v v^T] = I`` makes ``g`` unbiased for ``dL/dtheta``; its
    variance grows with ``P`` (per coordinate ``(|grad L|^2 + (dL/dtheta_j)^2) / K``). ``g`` is added to
    each parameter's ``.grad``. ``K = samples`` forward-mode passes per step; buffers (BatchNorm
    statistics) are updated by the first only.

    Supports any model whose operations have forward-mode derivatives (Linear, Conv, norms,
    attention, the usual activations) and that has trainable parameters.
    """

    name = "fg-weight"
    summary = "forward gradient, weight perturbation: (grad L . v) v with v ~ N(0, I) over all parameters"

    @dataclass
    class Options:
        samples: int = option(1, "tangent directions per step (their estimates are averaged)")
        seed: int = option(0, "seed of the tangent directions")

        def check(self) -> None:
            _check_samples(self.samples)

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"method {self.name!r}: the model has no trainable parameters")
        self.state.update(generator=MethodGenerator(self.options.seed))

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        K = self.options.samples
        g = self.state.generator.on(self.params[0][1].device)
        estimate = [torch.zeros_like(p) for _, p in self.params]
        loss0 = out0 = None
        for k in range(K):
            tangents = [torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) for _, p in self.params]
            keep = preserved_buffers(self.model) if k > 0 else contextlib.nullcontext()
            with keep, torch.no_grad(), fwAD.dual_level():
                duals = {n: fwAD.make_dual(p.detach(), v) for (n, p), v in zip(self.params, tangents)}
                try:
                    out = functional_call(self.model, duals, (x,))
                except RuntimeError as err:
                    raise ValueError(f"the model cannot take input of shape {tuple(x.shape)} under forward-mode AD: "
                                     f"{str(err).splitlines()[0]}") from err
                loss = loss_fn(out, y)
                loss_p, dd = fwAD.unpack_dual(loss)
                out_p = fwAD.unpack_dual(out).primal
            if k == 0:
                loss0, out0 = loss_p.detach().clone(), out_p.detach().clone()
            if dd is not None:
                for acc, v in zip(estimate, tangents):
                    acc.add_(v * (dd / K))
        for (_, p), est in zip(self.params, estimate):
            p.grad = est if p.grad is None else p.grad + est
        return StepResult(loss0, out0, {})


@register
class ForwardGradientActivity(DirectFeedback):
    """Activity-perturbation forward gradient: point ``l`` receives ``(1/K) sum_k s_k d_k``.

    Per step: the training pass cuts the graph at every feedback point (as DFA); ``e = dL/dy``
    (``(batch, o)``). Then, per draw ``k = 1..K`` (``samples``), a forward-mode pass without autograd
    injects tangents ``d_l ~ N(0, I)`` shaped like ``h_l`` (``(batch, *features)``) at the points —
    all at once (``points=joint``) or one point per pass (``points=each``) — and yields the output
    tangent ``u`` (``(batch, o)``; ``u = sum_l J_l d_l`` per sample). The per-sample directional
    derivative ``s_i = e_i . u_i`` (``(batch,)``; summed over tokens for sequences) estimates
    ``grad_{h_l,i} L . d_{l,i}``, and ``g_{l,i} = s_i d_{l,i}`` is unbiased for ``grad_{h_l,i} L = J_l^T e_i``
    (``E[d d^T] = I``; in joint mode the other points' tangents are independent with zero mean).
    ``g_l`` is delivered at point ``l`` and backpropagated *inside* block ``l`` only; the head gets
    its true gradient. Weight gradients are linear in ``g_l``, so they are unbiased for BP's too.

    Samples are assumed not to interact inside the model (no BatchNorm in training mode between a
    point and the output); otherwise the cross-sample terms of the activity gradient are dropped.
    The estimate passes leave buffers unchanged (BatchNorm normalises with the batch statistics but
    does not update its running ones there). Needs feedback points (``bpfree.attach`` or a zoo
    model).
    """

    name = "fg-activity"
    summary = "forward gradient, activity perturbation at the feedback points, local backprop inside blocks"

    @dataclass
    class Options:
        samples: int = option(1, "tangent draws per step (their estimates are averaged)")
        points: str = option("each", "perturb each point in its own forward-mode pass (less variance), "
                             "or all points in one pass", choices=("each", "joint"))
        seed: int = option(0, "seed of the tangents")

        def check(self) -> None:
            _check_samples(self.samples)

    def estimate(self, x: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
        """``g_l`` (shaped like ``h_l``) for every point, from ``samples`` forward-mode draws."""
        K = self.options.samples
        g = self.state.generator.on(x.device)
        groups: list[str | None] = [None] if self.options.points == "joint" else [n for n, _ in self.points]
        est: dict[str, torch.Tensor] = {}
        for _ in range(K):
            for only in groups:
                tangents: dict[str, torch.Tensor] = {}
                at_head: list[torch.Tensor | None] = []

                def inject(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
                    if isinstance(point, Head):
                        at_head.append(fwAD.unpack_dual(h).tangent)
                        return h
                    name = self.names[id(point)]
                    if only is not None and name != only:
                        return h
                    d = torch.randn(h.shape, generator=g, device=h.device, dtype=h.dtype)
                    tangents[name] = d
                    primal, tangent = fwAD.unpack_dual(h)
                    return fwAD.make_dual(primal, d if tangent is None else tangent + d)

                with torch.no_grad(), fwAD.dual_level(), handled(self.model, inject, self.markers), preserved_buffers(self.model):
                    out = forward_checked(self.model, x)
                    u = at_head[0] if at_head else fwAD.unpack_dual(out).tangent
                    u = None if u is None else u.clone()
                if u is None:
                    s = torch.zeros(e.shape[0], device=e.device, dtype=e.dtype)
                else:
                    s = (e * u.to(e.dtype)).reshape(e.shape[0], -1).sum(1)
                for name, d in tangents.items():
                    contrib = d * (s / K).to(d.dtype).reshape((-1,) + (1,) * (d.dim() - 1))
                    est[name] = contrib if name not in est else est[name] + contrib
        return est

    # fg-activity has no B_l, so its passes have no links: the estimates enter as gradients of h_l

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """Cut forward; ``e`` by backpropagating the loss through the head alone; the estimates
        ``g_l``; then one backward call that gives the head its gradients and each block its ``g_l``."""
        self.state["steps"] += 1
        record = self.forward_cut(x)
        loss = loss_fn(record.output, y)
        self.deliver_signals(record, loss, lambda e: self.estimate(x, e))
        return StepResult(loss.detach(), record.output.detach())

    def on_epoch_end(self, epoch: int) -> None:
        """Nothing to do: fg-activity has no BP calibration."""

    def probe_signals(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """One step's estimates ``g_l`` per point for ``(x, y)`` (and the ``.grad`` they give).

        The method's state (its generator) is put back afterwards, so training continues as if unprobed.
        """
        saved = self.state_dict()
        try:
            record = self.forward_cut(x)
            estimates = self.deliver_signals(record, loss_fn(record.output, y), lambda e: self.estimate(x, e))
        finally:
            self.load_state_dict(saved)
        return {name: g.detach() for name, g in estimates.items()}
