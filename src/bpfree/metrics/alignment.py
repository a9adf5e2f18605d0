"""Alignment diagnostics on a fixed probe batch, measured without disturbing training.

For every feedback point ``l`` (DFA-family methods) :meth:`Diagnostics.measure` returns

* ``signal_cos/<l>``: cosine between the method's signal (``B_l e`` for DFA) and the BP signal
  ``J_l^T e = dL/dh_l``, both flattened over the probe batch;
* ``b_jacobian_cos/<l>``: Frobenius cosine ``<B_l, Jbar_l^T>_F / (|B_l|_F |Jbar_l|_F)`` with the
  exact mean Jacobian ``Jbar_l`` of the probe batch; ``b_jacobian_unit_cos/<l>``: the mean over
  units (rows of ``B_l``) of the per-unit cosine;
* ``estimate_cos/<l>``: Frobenius cosine of the method's running Jacobian estimate (GrAPE) with
  the exact ``Jbar_l``;

and for every method ``weight_grad_cos``: the cosine between all the weight gradients the
method produces on the probe batch and BP's (one flattened vector), with ``weight_grad_cos/<i>``
per parameter tensor ``i`` in ``model.parameters()`` order.

Nothing is changed: parameters' ``.grad``, buffers (BatchNorm statistics), the global RNG
streams, the method's state and the optimizer are as they were before the measurement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..feedback.estimators import preserved_buffers
from ..feedback.matrices import EPS, frobenius_cos, rowcos
from .jacobians import bp_signals, mean_jacobians


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(EPS))


@contextlib.contextmanager
def sandbox(model: nn.Module) -> Iterator[None]:
    """Run code on ``model`` and leave its ``.grad``, buffers and the global RNG as they were."""
    params = list(model.parameters())
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    devices = sorted({p.device.index for p in params if p.device.type == "cuda"})
    try:
        with preserved_buffers(model), torch.random.fork_rng(devices=devices):
            yield
    finally:
        for p, g in zip(params, saved):
            p.grad = g


class Diagnostics:
    """Alignment measurements of ``method`` on the fixed probe batch ``(x, y)``.

    ``max_outputs``: the exact mean Jacobian costs ``o`` reverse passes; when ``o`` is larger the
    Jacobian cosines are left out (the signal and weight-gradient cosines are always measured).
    """

    def __init__(self, method, x: torch.Tensor, y: torch.Tensor, loss_fn, max_outputs: int = 64) -> None:
        self.method, self.x, self.y, self.loss_fn, self.max_outputs = method, x, y, loss_fn, max_outputs

    def method_gradients(self) -> tuple[dict[str, torch.Tensor], list[torch.Tensor | None]]:
        """The method's signals per point (if it has any) and its weight gradients on the probe."""
        model = self.method.model
        signals = self.method.probe_signals(self.x, self.y, self.loss_fn)
        return signals, [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]

    def measure(self) -> dict[str, float]:
        model = self.method.model
        out: dict[str, float] = {}
        with sandbox(model):
            signals, grads = self.method_gradients()
        with sandbox(model):
            _, bp_sig, bp_grads = bp_signals(model, self.x, self.y, self.loss_fn)
        flat_m = torch.cat([(torch.zeros_like(b) if g is None else g).reshape(-1) for g, b in zip(grads, bp_grads)])
        out["weight_grad_cos"] = _cos(flat_m, torch.cat([b.reshape(-1) for b in bp_grads]))
        for i, (g, b) in enumerate(zip(grads, bp_grads)):
            out[f"weight_grad_cos/{i}"] = 0.0 if g is None else _cos(g, b)
        for name, s in signals.items():
            out[f"signal_cos/{name}"] = _cos(s, bp_sig[name])
        feedback = self.method.feedback_matrices()
        if feedback and next(iter(feedback.values())).shape[1] <= self.max_outputs:
            with sandbox(model):
                exact = mean_jacobians(model, self.x)
            running = self.method.jacobian_estimates()
            for name, B in feedback.items():
                G = exact[name].t().to(B.dtype)
                out[f"b_jacobian_cos/{name}"] = float(frobenius_cos(B, G))
                out[f"b_jacobian_unit_cos/{name}"] = float(rowcos(B, G).mean())
                if name in running:
                    out[f"estimate_cos/{name}"] = float(frobenius_cos(running[name], exact[name]))
        return out
