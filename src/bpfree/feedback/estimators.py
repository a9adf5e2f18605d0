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
import functools
import math
from collections.abc import Callable, Iterator

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from ..points import FeedbackPoint, Head, handled
from .matrices import flat_features, lead_dims


#: ``draw(shape, generator, device, dtype)``: one tangent per sample, shaped like ``h_l``, or ``None``:
#: the point is not perturbed (it gets no estimate, and adds no noise to the others').
TangentDraw = Callable[[tuple[int, ...], torch.Generator, torch.device, torch.dtype], torch.Tensor | None]


def gaussian_tangents(shape: tuple[int, ...], generator: torch.Generator, device, dtype) -> torch.Tensor:
    """``d ~ N(0, I)``: the default tangent, ``E[d d^T] = I``."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@functools.lru_cache(maxsize=64)
def dct_basis(q: int, n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    """The ``q`` lowest-frequency rows of the orthonormal DCT-II of length ``n``: ``(q, n)``,
    ``D[f, t] = c_f cos(pi (t + 1/2) f / n)`` with ``c_0 = sqrt(1/n)``, ``c_f = sqrt(2/n)``."""
    f = torch.arange(q, dtype=torch.float64)[:, None]
    t = torch.arange(n, dtype=torch.float64)[None, :]
    D = torch.cos(math.pi * (t + 0.5) * f / n) * math.sqrt(2.0 / n)
    D[0] /= math.sqrt(2.0)
    return D.to(device=device, dtype=dtype)


def flat_only(draw: TangentDraw) -> TangentDraw:
    """``draw`` at flat and per-token points; image points (4-D ``(batch, C, H, W)``) decline."""
    def declining(shape, generator, device, dtype):
        return None if len(shape) >= 4 else draw(shape, generator, device, dtype)
    return declining


def spatial_tangents(modes: int) -> TangentDraw:
    """Tangents in the span of the ``modes x modes`` lowest spatial frequencies at image points.

    At a point of shape ``(batch, C, H, W)``: ``d = D_H^T z D_W`` per sample and channel with
    ``z ~ N(0, I)`` of shape ``(batch, C, q_H, q_W)``, ``q = min(modes, size)`` and ``D`` from
    :func:`dct_basis`, so ``E[d d^T] = P``, the orthogonal projector on those frequencies (per
    channel). Then ``E[u d^T] = Jbar P``: the estimate targets ``Jbar``'s low-frequency part, with
    the noise of ``C q_H q_W`` dimensions instead of ``C H W``. Other points get ``N(0, I)``;
    ``modes = 0`` means every frequency (plain Gaussian tangents everywhere).
    """
    if modes <= 0:
        return gaussian_tangents

    def draw(shape, generator, device, dtype):
        if len(shape) != 4 or (shape[2] <= modes and shape[3] <= modes):
            return gaussian_tangents(shape, generator, device, dtype)
        b, c, H, W = shape
        Dh = dct_basis(min(modes, H), H, str(device), dtype)
        Dw = dct_basis(min(modes, W), W, str(device), dtype)
        z = torch.randn((b, c, Dh.shape[0], Dw.shape[0]), generator=generator, device=device, dtype=dtype)
        return torch.matmul(torch.matmul(Dh.t(), z), Dw)  # (b, c, H, W)
    return draw


@contextlib.contextmanager
def preserved_buffers(model: nn.Module) -> Iterator[None]:
    """Leave every buffer of ``model`` as it was after the block, without writing to unchanged ones.

    Norm layers that track running statistics in training mode stop tracking them for the block
    (they still normalise with the batch statistics, as in training); any other buffer a module
    changes is copied back. Buffers nobody touched are not written to, so an autograd graph built
    before the block (which saved BatchNorm's running statistics) stays valid for ``backward``.
    """
    norms = [m for m in model.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats]
    saved = [(b, b._version, b.detach().clone()) for b in model.buffers()]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True
        with torch.no_grad():
            for b, version, value in saved:
                if b._version != version:
                    b.copy_(value)


#: Layers whose forward-mode formula can return a tangent of another dtype than their output.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _same_dtype_tangent(module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
    primal, tangent = fwAD.unpack_dual(out)
    if tangent is None or tangent.dtype == primal.dtype:
        return out
    return fwAD.make_dual(primal, tangent.to(primal.dtype))


@contextlib.contextmanager
def matched_tangents(model: nn.Module) -> Iterator[None]:
    """For the block: every norm layer's output tangent in the dtype of its output (forward mode).

    Under autocast a norm layer takes a bfloat16 input with float32 affine parameters (autocast
    leaves them float32) and returns bfloat16, but PyTorch's forward-mode formula of
    ``batch_norm`` returns the tangent in float32; the next layer, which autocast runs in
    bfloat16, then meets operands of two dtypes and fails. The tangent is cast to the output's
    dtype (a no-op when they agree, i.e. always without autocast).
    """
    handles = [m.register_forward_hook(_same_dtype_tangent) for m in model.modules() if isinstance(m, NORM_LAYERS)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def outer_mean(u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``mean_i u_i d_i^T`` in float32 (also under autocast): ``(o, n_l)`` from ``u`` and ``d``.

    ``u``: ``(batch, o)`` or ``(batch, T, o)``; ``d`` shaped like the point's ``h``; for sequences
    the mean runs over samples and tokens.
    """
    lead = lead_dims(u, d)
    U, D = flat_features(u, lead).float(), flat_features(d, lead).float()
    if torch.is_autocast_enabled(U.device.type):
        with torch.autocast(device_type=U.device.type, enabled=False):
            return U.t() @ D / U.shape[0]
    return U.t() @ D / U.shape[0]


class _HeadReached(Exception):
    """Raised at the Head in forward-mode estimate passes: nothing after it is needed."""

    def __init__(self, tangent: torch.Tensor | None) -> None:
        super().__init__()
        self.tangent = tangent


def _output_tangent(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Run ``model(x)`` (handlers installed) and return the tangent at the Head or at the output.

    With a Head the pass stops there, so the head (e.g. a vocabulary projection) is never run.
    """
    try:
        y = model(x)
    except _HeadReached as stop:
        return stop.tangent
    return fwAD.unpack_dual(y).tangent


def sample_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    names: dict[int, str],
    generator: torch.Generator,
    only: str | None = None,
    points: list[FeedbackPoint] | None = None,
    draw: TangentDraw = gaussian_tangents,
) -> dict[str, torch.Tensor]:
    """One forward-mode estimate ``J~_l`` of shape ``(o, n_l)`` for every point (or only ``only``).

    ``x``: the (sub-)batch, ``(k, ...)``. ``names`` maps ``id(point)`` to its name. When ``only``
    names a point, tangents are injected there alone (lower variance, one pass per point).
    The pass runs without autograd and leaves the model's buffers as they were. With a
    :class:`Head` marker, ``u`` is the tangent at the head's input ``z`` and ``o`` its width.
    """
    tangents: dict[str, torch.Tensor] = {}

    def inject(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
        if isinstance(point, Head):
            raise _HeadReached(fwAD.unpack_dual(h).tangent)
        name = names[id(point)]
        if only is not None and name != only:
            return h
        d = draw(tuple(h.shape), generator, h.device, h.dtype)
        if d is None:
            return h
        tangents[name] = d
        primal, tangent = fwAD.unpack_dual(h)
        return fwAD.make_dual(primal, d if tangent is None else tangent + d)

    with torch.no_grad(), fwAD.dual_level(), handled(model, inject, points), preserved_buffers(model), \
            matched_tangents(model):
        u = _output_tangent(model, x)
    if u is None:
        raise RuntimeError("the model output does not depend on any feedback point")
    return {name: outer_mean(u, d) for name, d in tangents.items()}


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


def block_parameters(model: nn.Module, x: torch.Tensor, names: dict[int, str]) -> dict[str, list[str]]:
    """For every point, the names of the parameters of the block that ends at it.

    Found by one forward pass that notes which modules run before each point (a parameter used by
    several blocks belongs to the first). The block after the last point (the head) is left out.
    """
    owner: dict[str, int] = {}
    order: list[str] = []
    current = [0]
    hooks = []
    for mod_name, mod in model.named_modules():
        own = [n for n, _ in mod.named_parameters(recurse=False)]
        if own:
            full = [f"{mod_name}.{n}" if mod_name else n for n in own]

            def pre(m, inp, full=full):
                for n in full:
                    owner.setdefault(n, current[0])

            hooks.append(mod.register_forward_pre_hook(pre))

    def count(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
        if not isinstance(point, Head):
            order.append(names[id(point)])
            current[0] += 1
        return h

    try:
        with torch.no_grad(), handled(model, count), preserved_buffers(model):
            model(x[:2])  # two samples: BatchNorm in training mode refuses one per channel
    finally:
        for h in hooks:
            h.remove()
    return {name: [p for p, b in owner.items() if b == i] for i, name in enumerate(order)}


def weight_perturbation_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    names: dict[int, str],
    blocks: dict[str, list[str]],
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Jacobian estimates from weight perturbation, one forward-mode pass per point.

    For point ``l`` the parameters of block ``l`` get tangents ``V ~ N(0, I)``; the tangent that
    arrives at the point is ``t_l`` (``(k, n_l)``) and the output tangent ``u = J_l t_l``. Then
    ``E[u t^T] = J_l E[t t^T]``, and the estimate is ``(mean_i u_i t_i^T) / mean_i (t_i * t_i)``,
    dividing column ``j`` by the mean of ``t_j^2``. For a block ``f(W h + b)`` with element-wise
    ``f``, rows of ``V`` are independent, so ``E[t t^T]`` is diagonal and this is consistent for
    the mean Jacobian weighted per unit by ``E[t_j^2]`` (exactly ``J`` when ``J`` is the same for
    every sample, as for the last hidden point of an MLP). Blocks whose tangent covariance is not
    diagonal (convolutions sharing weights across positions) get a biased estimate: prefer
    activity perturbation there.
    """
    from torch.func import functional_call

    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, owned in blocks.items():
        if not owned:
            continue
        at_point: list[torch.Tensor] = []

        def watch(point: FeedbackPoint, h: torch.Tensor, name=name) -> torch.Tensor:
            if isinstance(point, Head):
                raise _HeadReached(fwAD.unpack_dual(h).tangent)
            if names[id(point)] == name:
                at_point.append(fwAD.unpack_dual(h).tangent)
            return h

        with torch.no_grad(), fwAD.dual_level(), handled(model, watch), preserved_buffers(model), \
                matched_tangents(model):
            dual = {
                k: fwAD.make_dual(p, torch.randn(p.shape, generator=generator, device=p.device, dtype=p.dtype))
                for k, p in params.items() if k in owned
            }
            try:
                u = fwAD.unpack_dual(functional_call(model, dual, (x,), strict=False)).tangent
            except _HeadReached as stop:
                u = stop.tangent
        t = at_point[0]
        T = flat_features(t, lead_dims(u, t)).float()
        out[name] = outer_mean(u, t) / (T * T).mean(0).clamp_min(1e-12)
    return out


def per_sample_forward(model: nn.Module) -> bool:
    """Whether, as far as its modules show, each sample's output depends on that sample alone and
    deterministically: no BatchNorm using batch statistics, no active dropout (training mode).

    Functional dropout or batch coupling inside a custom ``forward`` cannot be seen here.
    """
    for m in model.modules():
        if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
            return False
        if m.training and isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return False
    return True


def first_point_child(model: nn.Module) -> int | None:
    """Where a pass over ``model`` may start from the first feedback point's ``h``.

    The index ``i`` of that point among ``model``'s children when ``model`` is an ``nn.Sequential``
    that runs its children in order (its own ``forward``) and the first child holding a marker is
    a :class:`FeedbackPoint` itself (not a :class:`Head`, not a block with points inside); else
    ``None``. Then ``model(x) == children[i+1:](h_1)`` with ``h_1 = children[:i](x)``.
    """
    if not isinstance(model, nn.Sequential) or type(model).forward is not nn.Sequential.forward:
        return None
    for i, child in enumerate(model):
        if isinstance(child, FeedbackPoint):
            return None if isinstance(child, Head) else i
        if any(isinstance(m, FeedbackPoint) for m in child.modules()):
            return None
    return None


def perturbed_copies(h: torch.Tensor, d: torch.Tensor, signs: tuple[float, ...]) -> torch.Tensor:
    """``[h_0 + signs[0] d; h_1 + signs[1] d; ...]`` for ``h`` holding ``len(signs)`` stacked copies
    of ``k`` rows (``d``: ``(k, ...)``): how a difference pass perturbs a point."""
    if len(signs) == 1:
        return torch.add(h, d, alpha=signs[0])
    k = d.shape[0]
    return torch.cat([torch.add(h[j * k:(j + 1) * k], d, alpha=s) for j, s in enumerate(signs)])


def _perturbed_pass(model: nn.Module, x: torch.Tensor, names: dict[int, str], generator: torch.Generator,
                    signs: tuple[float, ...], points: list[FeedbackPoint] | None = None,
                    draw: TangentDraw = gaussian_tangents,
                    resume: tuple[int, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One primal pass over ``len(signs)`` stacked copies of ``x`` (``(k, ...)``); copy ``j`` gets
    ``signs[j] * d_l`` added at every point, ``d_l ~ N(0, I)`` of shape ``(k, ...)``.

    ``resume = (i, h_1)``: ``h_1`` (``(k, ...)``) is what the model computes for ``x`` up to its
    first point, child ``i`` (:func:`first_point_child`), e.g. the rows the training pass already
    computed: the pass starts there instead of at the input, with the same draws in the same order
    (the blocks before the first point carry no perturbation, so they would compute ``h_1`` again).
    Valid only for a per-sample, deterministic forward (:func:`per_sample_forward`).

    Returns the output (or the Head's input) of all copies, ``(len(signs) * k, ...)``, and the
    ``d_l`` per point. No autograd, no autocast (float32 differences), buffers left as they were.
    """
    k = x.shape[0]
    tangents: dict[str, torch.Tensor] = {}

    def perturb(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
        if isinstance(point, Head):
            raise _HeadReached(h)
        d = draw((k,) + tuple(h.shape[1:]), generator, h.device, h.dtype)
        if d is None:
            return h
        tangents[names[id(point)]] = d
        return perturbed_copies(h, d, signs)

    def stacked(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t] * len(signs)) if len(signs) > 1 else t

    with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False), \
            handled(model, perturb, points), preserved_buffers(model):
        try:
            if resume is None:
                y = model(stacked(x))
            else:
                i, h = resume
                children = list(model)
                y = children[i](stacked(h.detach()))
                for child in children[i + 1:]:
                    y = child(y)
        except _HeadReached as stop:
            y = stop.tangent  # the Head's input, carried by the exception
    return y.float(), tangents


def central_difference_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    names: dict[int, str],
    generator: torch.Generator,
    step: float = 1e-2,
    points: list[FeedbackPoint] | None = None,
    draw: TangentDraw = gaussian_tangents,
    resume: tuple[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The activity-perturbation estimate with ``u`` from one fused primal pass, no forward AD.

    The sub-batch ``x`` (``(k, ...)``) is run twice in one batch, ``[x; x]``; every point adds
    ``+step * d_l`` to the first copy's ``h_l`` and ``-step * d_l`` to the second's, so
    ``u = (y_+ - y_-) / (2 step) = sum_l J_l d_l + O(step^2)`` (central difference), and
    ``J~_l = mean_i u_i d_{l,i}^T`` as in :func:`sample_jacobians`. One plain forward pass over
    ``2k`` inputs replaces the forward-mode pass, whose per-layer cost on CPU is several matrix
    products (PyTorch's forward-mode ``addmm`` also multiplies the weights' zero tangents).
    ``resume``: start at the first point from ``h_1`` (see :func:`_perturbed_pass`).
    """
    k = x.shape[0]
    y, tangents = _perturbed_pass(model, x, names, generator, (step, -step), points, draw, resume)
    u = (y[:k] - y[k:]) / (2 * step)
    return {name: outer_mean(u, d) for name, d in tangents.items()}


def onesided_difference_jacobians(
    model: nn.Module,
    x: torch.Tensor,
    names: dict[int, str],
    generator: torch.Generator,
    reference: torch.Tensor,
    step: float = 1e-2,
    points: list[FeedbackPoint] | None = None,
    draw: TangentDraw = gaussian_tangents,
    resume: tuple[int, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The activity-perturbation estimate from one primal pass over ``x`` alone, against ``reference``.

    ``reference``: the unperturbed output (or Head input) for ``x`` (``(k, ...)``), e.g. the first
    ``k`` rows the training forward pass already computed. Every point adds ``step * d_l``;
    ``u = (y_+ - reference) / step = sum_l J_l d_l + (step / 2) sum d^T H d + O(step^2)``.
    The second-order term is even in ``d``, so its product with ``d_l^T`` has mean zero: like the
    central difference, ``J~_l = mean_i u_i d_{l,i}^T`` is unbiased up to ``O(step^2)``, at half
    the rows. Valid only when each sample's output depends on that sample alone and
    deterministically (:func:`per_sample_forward`), or the reference does not match the pass.
    ``resume``: start at the first point from ``h_1`` (see :func:`_perturbed_pass`).
    """
    y, tangents = _perturbed_pass(model, x, names, generator, (step,), points, draw, resume)
    u = (y - reference.float()) / step
    return {name: outer_mean(u, d) for name, d in tangents.items()}
