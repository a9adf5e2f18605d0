"""Toy dynamics of the feedback rules against a fixed target (REFERENCE question 5).

A fixed target ``G`` (``(n, o)``, the role of ``Jbar_l^T``) and a start ``B_0`` whose every row has
cosine ``c0`` with the matching row of ``G``; the rule is applied ``steps`` times. The trajectory
of the mean per-unit cosine and the Frobenius cosine shows whether a rule turns ``B`` toward
``G`` or only rescales it.
"""

from __future__ import annotations

import torch

from .matrices import frobenius_cos, rowcos
from .rules import update_feedback


def start_with_cosine(G: torch.Tensor, c0: float, generator: torch.Generator) -> torch.Tensor:
    """``B`` with unit rows, each at cosine exactly ``c0`` with the matching row of ``G``."""
    g = G / G.norm(dim=1, keepdim=True)
    r = torch.randn(G.shape, generator=generator, dtype=G.dtype)
    r = r - (r * g).sum(1, keepdim=True) * g  # orthogonal to each row of G
    r = r / r.norm(dim=1, keepdim=True)
    return c0 * g + (1 - c0**2) ** 0.5 * r


def fixed_target_dynamics(rule: str, c0: float, *, n: int = 64, o: int = 10, steps: int = 200,
                          eta: float = 0.05, noise: float | None = None, renorm: str | None = None,
                          seed: int = 0) -> dict[str, list[float]]:
    """``{"step", "unit_cos", "frobenius_cos"}`` over ``steps`` updates of ``rule`` toward a fixed ``G``.

    ``G`` has rows of random norms (so Frobenius and per-unit cosines differ), ``B_0`` unit rows.
    """
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, o, generator=g, dtype=torch.float64) * torch.rand(n, 1, generator=g, dtype=torch.float64).add(0.2)
    B = start_with_cosine(G, c0, g)
    norm0 = float(B.norm())
    out = {"step": [0], "unit_cos": [float(rowcos(B, G).mean())], "frobenius_cos": [float(frobenius_cos(B, G))]}
    for t in range(1, steps + 1):
        B = update_feedback(B, G, rule=rule, eta=eta, norm0=norm0, noise=noise, renorm=renorm, generator=g)
        out["step"].append(t)
        out["unit_cos"].append(float(rowcos(B, G).mean()))
        out["frobenius_cos"].append(float(frobenius_cos(B, G)))
    return out
