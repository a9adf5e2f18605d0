"""Feedback matrices ``B_l`` of shape ``(n_l, o)``: creation, projection of the error, cosines.

Conventions (DESIGN.md §1): ``B_l`` is always ``(n_l, o)`` and acts as ``B_l e``; cosines are per
unit (one per row of ``B_l``); the summary cosine is the Frobenius cosine.
"""

from __future__ import annotations

import math

import torch

EPS = 1e-12


def init_feedback(
    n: int, o: int, *, init: str, scale: float, generator: torch.Generator, device, dtype=torch.float32
) -> torch.Tensor:
    """A random ``B`` of shape ``(n, o)`` whose entries have variance ``scale**2 / o``.

    ``init="normal"``: ``B_ij ~ N(0, scale^2 / o)``; ``init="uniform"``: ``B_ij ~ U(-a, a)`` with
    ``a = scale * sqrt(3 / o)`` (the Kaiming-uniform bound for fan-in ``o``, same variance). Each row
    (one unit's feedback vector) then has expected squared norm ``scale^2``, so ``B e`` has the
    magnitude of ``e`` per unit.
    """
    if init == "normal":
        B = torch.randn(n, o, generator=generator, device=device, dtype=dtype)
        return B.mul_(scale / math.sqrt(o))
    if init == "uniform":
        B = torch.rand(n, o, generator=generator, device=device, dtype=dtype)
        return B.mul_(2.0).sub_(1.0).mul_(scale * math.sqrt(3.0 / o))
    raise ValueError(f"unknown feedback init {init!r}; choose normal or uniform")


def _shape(t: torch.Tensor | torch.Size) -> torch.Size:
    return t.shape if isinstance(t, torch.Tensor) else t


def lead_dims(e: torch.Tensor | torch.Size, h: torch.Tensor | torch.Size) -> int:
    """Number of leading dimensions over which feedback is applied sample-wise.

    ``e`` is ``(batch, o)`` or, for sequence models, ``(batch, T, o)``. If ``h`` shares all of
    ``e``'s leading dimensions (``(batch, T, d)``), feedback acts per token and ``n_l = d``;
    otherwise ``h`` is flattened after the batch dimension and ``n_l = prod(h.shape[1:])``.
    Either argument may be a tensor or just its shape.
    """
    e, h = _shape(e), _shape(h)
    k = len(e) - 1
    if k > 1 and h[:k] == e[:k]:
        return k
    if h[0] != e[0]:
        raise ValueError(f"feedback point tensor of shape {tuple(h)} does not match the batch of the error {tuple(e)}")
    return 1


def point_width(e: torch.Tensor | torch.Size, h: torch.Tensor | torch.Size) -> int:
    """``n_l``: the number of features at the point that ``B_l`` acts on (tensors or shapes)."""
    return math.prod(_shape(h)[lead_dims(e, h):])


def project(B: torch.Tensor, e: torch.Tensor, h: torch.Tensor | torch.Size) -> torch.Tensor:
    """The DFA signal ``B e`` for every sample, shaped like ``h`` (a tensor or its shape).

    ``B``: ``(n_l, o)``; ``e``: ``(batch, o)`` or ``(batch, T, o)``; result: ``h.shape``.
    """
    return (e @ B.t()).reshape(_shape(h))


def flat_features(t: torch.Tensor, lead: int) -> torch.Tensor:
    """``t`` as ``(samples, n_l)``: its ``lead`` leading dimensions merged into one."""
    return t.reshape(math.prod(t.shape[:lead]), -1)


def rownorm(A: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """``|A_i|``, the Euclidean norm of every row of ``A`` (``(n, o)``): shape ``(n,)`` (``(n, 1)``
    with ``keepdim``). Written as ``sqrt(sum_j A_ij^2)``: a plain sum reduces fast in either memory
    layout of ``A``, whereas ``vector_norm`` over the strided axis of a transposed layout is slow."""
    return (A * A).sum(1, keepdim=keepdim).sqrt()


def rowcos(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Cosine between matching rows of ``A`` and ``G`` (both ``(n, o)``): shape ``(n,)``."""
    num = (A * G).sum(1)
    return num / (rownorm(A) * rownorm(G)).clamp_min(EPS)


def frobenius_cos(A: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """``<A, G>_F / (|A|_F |G|_F)``: a scalar tensor."""
    return (A * G).sum() / (A.norm() * G.norm()).clamp_min(EPS)


def low_rank_per_output(J: torch.Tensor, channels: int, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation of each output's Jacobian map over an image point.

    ``J``: ``(o, C*H*W)``, the rows ``J[k]`` flattened from ``(C, H, W)``; each row is taken as a
    ``(C, H*W)`` matrix and replaced by its truncated SVD ``sum_{r < rank} s_r u_r v_r^T`` (the
    Frobenius-nearest matrix of that rank, Eckart–Young). So ``B[c, hw, k] = sum_r U_r[k, hw]
    V_r[c, k]`` holds ``o * rank * (C + H*W)`` numbers instead of ``o * C * H * W``; on a noisy
    estimate it keeps the leading directions, where the signal concentrates, and drops most of
    the noise, which is spread over all of them. Returns a new ``(o, C*H*W)`` tensor; a rank of
    ``min(C, H*W)`` or more returns ``J`` unchanged (copied).

    Computed as ``P_r M`` with ``P_r = U_r U_r^T`` the projection on the leading eigenvectors of
    the Gram matrix ``M M^T`` (``(C, C)``; ``M^T M`` and ``M Q_r Q_r^T`` when ``H*W < C``), in
    float64: the same matrix as the SVD's, at a fraction of its cost for these shapes.
    """
    o, n = J.shape
    if channels < 1 or n % channels:
        raise ValueError(f"{n} features do not split into {channels} channels")
    M = J.reshape(o, channels, n // channels).double()
    if rank >= min(M.shape[1:]):
        return J.clone()
    left = M.shape[1] <= M.shape[2]
    gram = M @ M.transpose(1, 2) if left else M.transpose(1, 2) @ M
    _, vectors = torch.linalg.eigh(gram)  # ascending eigenvalues: the leading vectors are the last
    Q = vectors[..., -rank:]
    low = Q @ (Q.transpose(1, 2) @ M) if left else (M @ Q) @ Q.transpose(1, 2)
    return low.reshape(o, n).to(J.dtype)
