"""Exact Jacobians and BP signals at the feedback points, by reverse-mode autograd.

These are the references the estimates and feedback matrices are measured against.
``y`` is the model output, or the input ``z`` of the :class:`bpfree.Head` when there is one.
"""

from __future__ import annotations

import torch
from torch import nn

from ..feedback.matrices import flat_features, lead_dims
from ..points import FeedbackPoint, Head, feedback_points, handled


def forward_recording(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """``(out, y, {name: h_l})`` from a full-graph forward pass; every ``h_l`` requires grad.

    ``out`` is the model output, ``y`` the tensor the error is taken at (``out``, or the Head input).
    """
    names = {id(p): n for n, p in feedback_points(model)}
    hs: dict[str, torch.Tensor] = {}
    at_head: list[torch.Tensor] = []

    def record(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
        if not h.requires_grad:
            h = h.detach().requires_grad_()
        if isinstance(point, Head):
            at_head.append(h)
        else:
            hs[names[id(point)]] = h
        return h

    with torch.enable_grad(), handled(model, record):
        out = model(x)
    return out, (at_head[0] if at_head else out), hs


def mean_jacobians(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The exact mean Jacobian ``Jbar_l = mean_i dy_i/dh_{l,i}`` of shape ``(o, n_l)`` per point.

    Row ``k`` is the batch mean of ``d y[..., k] / d h_l``, from ``o`` reverse passes. For sequence
    models (``y``: ``(batch, T, o)``, ``h``: ``(batch, T, d)``) the mean is over samples and tokens
    of ``sum_t' dy_t'[k] / dh_t``: it includes the cross-token terms a per-token estimate treats
    as noise (causal models: ``t' >= t``).
    """
    _, y, hs = forward_recording(model, x)
    names = list(hs)
    o = y.shape[-1]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for k in range(o):
        grads = torch.autograd.grad(y[..., k].sum(), [hs[n] for n in names], retain_graph=k < o - 1, allow_unused=True)
        for n, g in zip(names, grads):
            h = hs[n]
            if g is None:
                g = torch.zeros_like(h)
            lead = lead_dims(y, h)
            rows[n].append(flat_features(g, lead).mean(0))
    return {n: torch.stack(r) for n, r in rows.items()}


def per_sample_jacobians(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Exact per-sample Jacobians ``dy_i/dh_{l,i}``: ``(batch, o, n_l)`` (flat outputs only).

    Valid when samples do not interact (no BatchNorm in training mode).
    """
    _, y, hs = forward_recording(model, x)
    if y.dim() != 2:
        raise ValueError("per_sample_jacobians takes models with (batch, o) outputs")
    names = list(hs)
    o = y.shape[-1]
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for k in range(o):
        grads = torch.autograd.grad(y[:, k].sum(), [hs[n] for n in names], retain_graph=k < o - 1, allow_unused=True)
        for n, g in zip(names, grads):
            g = torch.zeros_like(hs[n]) if g is None else g
            rows[n].append(g.reshape(g.shape[0], -1))
    return {n: torch.stack(r, dim=1) for n, r in rows.items()}


def bp_signals(model: nn.Module, x: torch.Tensor, target: torch.Tensor, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[torch.Tensor]]:
    """``(loss, {name: dL/dh_l}, [dL/dtheta])``: the BP signal ``J_l^T e`` at every point and the
    BP weight gradients, without touching ``.grad``."""
    out, _, hs = forward_recording(model, x)
    loss = loss_fn(out, target)
    params = [p for p in model.parameters() if p.requires_grad]
    names = list(hs)
    grads = torch.autograd.grad(loss, [hs[n] for n in names] + params, allow_unused=True)
    sig = {n: (torch.zeros_like(hs[n]) if g is None else g) for n, g in zip(names, grads[: len(names)])}
    pg = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[len(names):])]
    return loss.detach(), sig, pg
