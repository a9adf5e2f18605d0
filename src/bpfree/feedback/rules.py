"""GrAPE's feedback update rules: how ``B_l`` moves toward the Jacobian estimate.

Every rule takes ``B`` of shape ``(n, o)`` and ``G = Jbar_l^T`` of shape ``(n, o)`` (the transposed
running estimate of the mean Jacobian ``dy/dh_l``) and a rate ``eta``, and returns the new ``B``
before noise and renormalisation, which :func:`update_feedback` applies afterwards. With
``c = rowcos(B, G)`` (one cosine per unit, shape ``(n,)``):

* ``rescale`` (original GrAPE):  ``B_i <- (1 - eta (1 - c_i)) B_i``
* ``alt1``:  ``B_i <- B_i - eta (1 - c_i) B_i + eta c_i g~_i``
* ``alt2``:  ``B_i <- (1 - eta) B_i + eta g~_i``
  where ``g~_i = G_i |B_i| / |G_i|`` (rows of ``G`` rescaled to the norms of the rows of ``B``)
* ``cosine`` (published GrAPE): a gradient step on each unit's ``1 - c_i``:
  ``B_i <- B_i + eta (G_i / (|B_i| |G_i|) - c_i B_i / |B_i|^2)``.
  This is the gradient of ``n (1 - mean_i c_i)``: the per-unit form, so that ``eta`` does not
  shrink with the width ``n`` (the gradient of the mean itself is this divided by ``n``).
* ``regress`` (forward-DFA style):  ``B <- B - eta (B - G)``
* ``blend``:  ``B <- (1 - eta) B + eta G |B|_F / |G|_F``: toward ``G`` rescaled as a whole, so the
  rows of ``B`` take on the relative norms of ``G``'s as well as their directions (the per-row
  rules keep every unit's feedback at the same norm, which caps the Frobenius cosine with ``G``
  when its rows differ in norm: units that hardly move the output get as much signal as the
  ones that move it most); with ``frobenius`` renormalisation the update depends on neither
  ``|B|`` nor ``|G|``.

Renormalisation (after optional Gaussian noise ``noise * rms(B_0) * N(0, 1)``):
``frobenius`` rescales ``B`` to its initial Frobenius norm ``|B_0|_F``; ``rows`` rescales every
row to ``|B_0|_F / sqrt(n)`` (so ``|B|_F`` is kept too); ``none`` leaves ``B`` as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .matrices import EPS, rowcos, rownorm


def _rescaled_rows(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``g~``: each row of ``G`` scaled to the norm of the matching row of ``B``."""
    return G * (rownorm(B, keepdim=True) / rownorm(G, keepdim=True).clamp_min(EPS))


def rescale(B: torch.Tensor, G: torch.Tensor, eta: float) -> torch.Tensor:
    """``B_i <- (1 - eta (1 - c_i)) B_i``: shrinks badly aligned rows, never turns them."""
    c = rowcos(B, G)
    return B * (1.0 - eta * (1.0 - c)).unsqueeze(1)


def alt1(B: torch.Tensor, G: torch.Tensor, eta: float) -> torch.Tensor:
    """``B_i <- B_i - eta (1 - c_i) B_i + eta c_i g~_i``."""
    c = rowcos(B, G).unsqueeze(1)
    return B - eta * (1.0 - c) * B + eta * c * _rescaled_rows(G, B)


def alt2(B: torch.Tensor, G: torch.Tensor, eta: float) -> torch.Tensor:
    """``B_i <- (1 - eta) B_i + eta g~_i``."""
    return (1.0 - eta) * B + eta * _rescaled_rows(G, B)


def cosine(B: torch.Tensor, G: torch.Tensor, eta: float) -> torch.Tensor:
    """One gradient-descent step on each unit's ``1 - cos(B_i, G_i)``."""
    bn = rownorm(B, keepdim=True).clamp_min(EPS)
    gn = rownorm(G, keepdim=True).clamp_min(EPS)
    c = (B * G).sum(1, keepdim=True) / (bn * gn)
    return B + eta * (G / (bn * gn) - c * B / bn**2)


def regress(B: torch.Tensor, G: torch.Tensor, eta: float) -> torch.Tensor:
    """``B <- B - eta (B - G)``: a gradient step on ``|B - G|_F^2 / 2``."""
    return B - eta * (B - G)


def blend(B: torch.Tensor, G: torch.Tensor, eta: float) -> torch.Tensor:
    """``B <- (1 - eta) B + eta G |B|_F / |G|_F``."""
    return (1.0 - eta) * B + eta * G * (B.norm() / G.norm().clamp_min(EPS))


@dataclass(frozen=True)
class Rule:
    """A feedback rule with its default noise (relative to ``rms(B_0)``) and renormalisation."""

    fn: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    noise: float
    renorm: str


RULES: dict[str, Rule] = {
    "rescale": Rule(rescale, noise=1e-3, renorm="frobenius"),
    "alt1": Rule(alt1, noise=0.0, renorm="frobenius"),
    "alt2": Rule(alt2, noise=0.0, renorm="frobenius"),
    "cosine": Rule(cosine, noise=0.0, renorm="rows"),
    "regress": Rule(regress, noise=0.0, renorm="none"),
    "blend": Rule(blend, noise=0.0, renorm="frobenius"),
}
RENORMS = ("frobenius", "rows", "none")


def renormalise(B: torch.Tensor, kind: str, norm0: float) -> torch.Tensor:
    """``B`` rescaled to Frobenius norm ``norm0`` (``frobenius``), rows of norm
    ``norm0 / sqrt(n)`` (``rows``), or unchanged (``none``)."""
    if kind == "frobenius":
        return B * (norm0 / B.norm().clamp_min(EPS))  # stays on the device: no synchronisation
    if kind == "rows":
        target = norm0 / math.sqrt(B.shape[0])
        return B * (target / rownorm(B, keepdim=True).clamp_min(EPS))
    if kind == "none":
        return B
    raise ValueError(f"unknown renormalisation {kind!r}; choose one of {', '.join(RENORMS)}")


def update_feedback(
    B: torch.Tensor,
    G: torch.Tensor,
    *,
    rule: str,
    eta: float,
    norm0: float,
    noise: float | None = None,
    renorm: str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One GrAPE feedback update: the rule, then noise, then renormalisation.

    ``B``, ``G``: ``(n, o)``; ``noise``/``renorm`` default to the rule's own (:data:`RULES`).
    Returns a new tensor; ``B`` is not modified.
    """
    spec = RULES[rule]
    noise = spec.noise if noise is None else noise
    renorm = spec.renorm if renorm is None else renorm
    B = spec.fn(B, G, eta)
    if noise > 0:
        rms0 = norm0 / math.sqrt(B.numel())
        B = B + (noise * rms0) * torch.randn(B.shape, generator=generator, device=B.device, dtype=B.dtype)
    return renormalise(B, renorm, norm0)
