"""Forward-mode estimates of the Jacobians ``J_l = dy/dh_l`` at the feedback points.

Activity perturbation: draw ``d_l ~ N(0, I)`` of the shape of ``h_l`` at every point and push the
tangents through one forward-mode pass; the output tangent is ``u = sum_k J_k d_k`` (per sample:
``(batch, o)``). For each point ``J~_l = mean_i u_i d_{l,i}^T`` (shape ``(o, n_l)``) is unbiased for
the mean Jacobian, because ``E[d d^T] = I`` and the other points' tangents are independent with
mean zero. For sequences ``u_i`` and ``d_{l,i}`` are per token (``(batch, T, o)`` and
``(batch, T, d)``): the estimate is the per-token Jacobian ``dy_t/dh_t`` averaged over tokens;
the cross-token terms ``dy_t/dh_s`` (s < t) enter only as zero-mean noise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..points import FeedbackPoint, Head, handled
from .matrices import flat_features, lead_dims


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Restore every buffer of ``model`` (BatchNorm running statistics...) on exit."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


def sample_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    names: dict[int, str],
    generator: torch.Generator,
    only: str | None = None,
) -> dict[str, torch.Tensor]:
    """One forward-mode estimate ``J~_l`` of shape ``(o, n_l)`` for every point (or only ``only``).

    ``x``: the (sub-)batch, ``(k, ...)``. ``names`` maps ``id(point)`` to its name. When ``only``
    names a point, tangents are injected there alone (lower variance, one pass per point).
    The pass runs without autograd and leaves the model's buffers as they were. With a
    :class:`Head` marker, ``u`` is the tangent at the head's input ``z`` and ``o`` its width.
    """
    tangents: dict[str, torch.Tensor] = {}
    at_head: list[torch.Tensor | None] = []

    def inject(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
        if isinstance(point, Head):
            at_head.append(fwAD.unpack_dual(h).tangent)
            return h
        name = names[id(point)]
        if only is not None and name != only:
            return h
        d = torch.randn(h.shape, generator=generator, device=h.device, dtype=h.dtype)
        tangents[name] = d
        primal, tangent = fwAD.unpack_dual(h)
        return fwAD.make_dual(primal, d if tangent is None else tangent + d)

    with torch.no_grad(), fwAD.dual_level(), handled(model, inject), preserved_buffers(model):
        y = model(x)
        u = at_head[0] if at_head else fwAD.unpack_dual(y).tangent
    if u is None:
        raise RuntimeError("the model output does not depend on any feedback point")
    out = {}
    for name, d in tangents.items():
        lead = lead_dims(u, d)
        U, D = flat_features(u, lead), flat_features(d, lead)
        out[name] = U.t() @ D / U.shape[0]
    return out


class RunningJacobian:
    """A running average ``Jbar_l`` of the estimates, per point.

    ``kind="cumulative"``: ``Jbar <- Jbar + (J~ - Jbar) / t`` (the mean of all ``t`` estimates so far);
    ``kind="ema"``: ``Jbar <- beta Jbar + (1 - beta) J~`` (the first estimate initialises it).
    """

    def __init__(self, kind: str = "cumulative", beta: float = 0.99) -> None:
        if kind not in ("cumulative", "ema"):
            raise ValueError(f"unknown moving-average kind {kind!r}; choose cumulative or ema")
        self.kind, self.beta = kind, beta
        self.mean: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def update(self, estimates: dict[str, torch.Tensor]) -> None:
        for name, J in estimates.items():
            t = self.count.get(name, 0) + 1
            self.count[name] = t
            if t == 1:
                self.mean[name] = J.clone()
            elif self.kind == "cumulative":
                self.mean[name].add_(J - self.mean[name], alpha=1.0 / t)
            else:
                self.mean[name].mul_(self.beta).add_(J, alpha=1.0 - self.beta)

    def state_dict(self) -> dict:
        return {"mean": dict(self.mean), "count": dict(self.count)}

    def load_state_dict(self, state: dict) -> None:
        self.mean = {k: v.clone() for k, v in state["mean"].items()}
        self.count = dict(state["count"])
