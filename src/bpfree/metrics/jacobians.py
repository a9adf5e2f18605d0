"""Exact Jacobians and BP signals at the feedback points, by reverse-mode autograd.

These are the references the estimates and feedback matrices are measured against.
``y`` is the model output, or the input ``z`` of the :class:`bpfree.Head` when there is one.

BatchNorm in training mode couples the samples of a batch: ``h_i`` moves the batch statistics and
so every ``y_j``. A feedback ``B_l e_i`` is per sample, and a forward-mode estimate
``mean_i u_i d_i^T`` with independent tangents per sample has expectation ``mean_i dy_i/dh_i``:
the cross-sample terms ``dy_j/dh_i`` (``j != i``) average out. So the reference Jacobians here
hold the batch statistics constant (:func:`frozen_batch_statistics`): each sample's Jacobian is
its own, taken at this batch's statistics. (Summing the coupled gradient over the batch instead
removes each channel's mean over batch and space, after every BatchNorm downstream of ``h_l``:
a different matrix, which no per-sample feedback or estimate can match.)
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..feedback.matrices import flat_features, lead_dims
from ..points import FeedbackPoint, Head, feedback_points, handled


def _frozen_batch_norm(self: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """BatchNorm with this batch's statistics (biased variance, as in training), detached."""
    dims = [0] + list(range(2, x.dim()))
    mean = x.mean(dims).detach()
    var = x.var(dims, unbiased=False).detach()
    return F.batch_norm(x, mean, var, self.weight, self.bias, training=False, momentum=0.0, eps=self.eps)


@contextlib.contextmanager
def frozen_batch_statistics(model: nn.Module) -> Iterator[None]:
    """Every BatchNorm of ``model`` in training mode normalises with its batch's statistics held
    constant: forward values are unchanged, but no gradient flows through the mean and variance,
    so ``dy_j/dh_i = 0`` for ``j != i``. Running statistics are not updated inside the block."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in norms:
        m.forward = types.MethodType(_frozen_batch_norm, m)
    try:
        yield
    finally:
        for m in norms:
            del m.forward


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


def mean_jacobians(model: nn.Module, x: torch.Tensor, *, coupled: bool = False) -> dict[str, torch.Tensor]:
    """The exact mean Jacobian ``Jbar_l = mean_i dy_i/dh_{l,i}`` of shape ``(o, n_l)`` per point.

    Row ``k`` is the batch mean of ``d y[..., k] / d h_l``, from ``o`` reverse passes, with
    BatchNorm's batch statistics held constant (module docstring); ``coupled=True`` lets the
    gradient flow through them (the batch-summed gradient of ``y[..., k]``). For sequence
    models (``y``: ``(batch, T, o)``, ``h``: ``(batch, T, d)``) the mean is over samples and tokens
    of ``sum_t' dy_t'[k] / dh_t``: it includes the cross-token terms a per-token estimate treats
    as noise (causal models: ``t' >= t``).
    """
    with contextlib.nullcontext() if coupled else frozen_batch_statistics(model):
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

    BatchNorm in training mode uses this batch's statistics, held constant (module docstring).
    """
    with frozen_batch_statistics(model):
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
