"""Feedback alignment (Lillicrap et al., 2016) and the layer machinery its family shares.

Methods of this family keep end-to-end backpropagation but replace, in the backward pass of every
``nn.Linear`` and ``nn.Conv1d/2d/3d`` layer, the weight ``W`` that carries the gradient to the
layer's *input* by another matrix ``B`` of the same shape. The gradient of the layer's own
parameters stays the true one given the gradient ``g`` arriving at its output:

* ``nn.Linear``, ``y = x W^T + b`` with ``x``: ``(..., n_in)``, ``W``, ``B``: ``(n_out, n_in)``,
  ``g = dL/dy``: ``(..., n_out)``::

      dL/dx  <-  g B               (BP: g W)          shape (..., n_in)
      dL/dW  =   g^T x             (summed over the leading dimensions)
      dL/db  =   sum of g over the leading dimensions

* ``nn.ConvNd``: ``dL/dx`` is the transposed convolution of ``g`` with ``B`` (BP: with ``W``);
  ``dL/dW`` and ``dL/db`` are BP's.

The conversion lives in the method, not in the model: during :meth:`LayerFeedback.step` each
converted layer's ``forward`` is swapped (an instance attribute, removed again right after the
forward pass) for one that calls a custom ``autograd.Function`` with the same forward result.
Evaluation, checkpoints and the model's code are untouched. Feedback points in the model are
ignored (they stay identities).

Layers whose parameters act element-wise or have no input gradient (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, PReLU, Embedding) keep their exact backward. Any other module that holds
parameters directly (``nn.MultiheadAttention``, RNNs, ``nn.Bilinear``, transposed convolutions, a
custom module using its own ``nn.Parameter``) would silently transport its weights, so the
method refuses the model with a :class:`ValueError` naming those modules.
"""

from __future__ import annotations

import math
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..options import OptionError, option
from . import register
from .base import LossFn, Method, MethodGenerator, StepResult
from .guards import forward_checked

#: Layers whose input gradient the family computes with ``B`` instead of ``W``.
CONVERTED: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Layers with parameters that keep their exact backward (element-wise, or no input gradient).
EXACT: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.PReLU, nn.Embedding,
    nn.EmbeddingBag,
)

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
# subclasses that keep the stock forward are converted too; ones that override it are refused
_CONVERTED_FORWARDS = {c.forward for c in CONVERTED}


def fan_in(weight: torch.Tensor) -> int:
    """Inputs per output unit: ``n_in`` for Linear, ``C_in/groups * prod(kernel)`` for ConvNd."""
    return math.prod(weight.shape[1:])


# --------------------------------------------------------------------------------------------
# autograd Functions: forward as the layer, input gradient through B
# --------------------------------------------------------------------------------------------


class _LinearB(torch.autograd.Function):
    """``y = x W^T + b`` whose backward gives ``dL/dx = g B`` and BP's ``dL/dW``, ``dL/db``."""

    @staticmethod
    def forward(ctx, x, weight, bias, back):
        ctx.save_for_backward(x, back)
        ctx.has_bias = bias is not None
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, back = ctx.saved_tensors
        gx = gw = gb = None
        n_out = g.shape[-1]
        if ctx.needs_input_grad[0]:
            gx = (g @ back.to(g.dtype)).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            g2 = g.reshape(-1, n_out)
            gw = (g2.t() @ x.reshape(-1, x.shape[-1]).to(g.dtype)).to(ctx.dtypes[1])
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.reshape(-1, n_out).sum(0).to(ctx.dtypes[2])
        return gx, gw, gb, None


class _ConvB(torch.autograd.Function):
    """An N-d convolution whose backward gives ``dL/dx`` through ``B`` and BP's ``dL/dW``, ``dL/db``.

    ``dL/dW`` does not depend on the values of the weight, so one ``convolution_backward`` call
    with ``B`` in the weight's place yields both the substituted input gradient and BP's weight
    gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, back, stride, padding, dilation, groups):
        ctx.save_for_backward(x, back)
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else [bias.shape[0]]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _CONV_FN[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g):
        x, back = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geometry
        need_b = ctx.bias_sizes is not None and ctx.needs_input_grad[2]
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b]
        if not any(mask):
            return (None,) * 8
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, x.to(g.dtype), back.to(g.dtype), ctx.bias_sizes if need_b else None,
            list(stride), list(padding), list(dilation), False, [0] * len(stride), groups, mask,
        )
        gx = gx.to(ctx.dtypes[0]) if mask[0] else None
        gw = gw.to(ctx.dtypes[1]) if mask[1] else None
        gb = gb.to(ctx.dtypes[2]) if mask[2] else None
        return gx, gw, gb, None, None, None, None, None


def _conv_input(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``(x', padding)`` so that ``conv(x', padding=padding)`` equals ``module(x)``.

    Non-zero padding modes and asymmetric ``padding='same'`` are applied with ``F.pad`` first
    (ordinary autograd), the rest is handed to the convolution as integer padding.
    """
    nd = module.weight.dim() - 2
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * nd
    if isinstance(module.padding, str):
        pads = module._reversed_padding_repeated_twice  # (left_last, right_last, left_prev, ...)
        if all(pads[2 * i] == pads[2 * i + 1] for i in range(nd)):
            return x, tuple(pads[2 * i] for i in reversed(range(nd)))
        return F.pad(x, pads), (0,) * nd
    return x, tuple(module.padding)


def substituted_forward(module: nn.Module, x: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
    """``module(x)`` whose input gradient goes through ``back`` (shaped like ``module.weight``)."""
    if isinstance(module, nn.Linear):
        return _LinearB.apply(x, module.weight, module.bias, back)
    x, padding = _conv_input(module, x)
    return _ConvB.apply(x, module.weight, module.bias, back, tuple(module.stride), padding,
                        tuple(module.dilation), module.groups)


# --------------------------------------------------------------------------------------------
# the family's base
# --------------------------------------------------------------------------------------------


class LayerFeedback(Method):
    """Base of the FA family: BP in which each converted layer's input gradient uses ``B``.

    Subclasses implement :meth:`backward_weight` (the ``B`` of one layer for the current step,
    shaped like its weight) and may override :meth:`begin_step`. ``self.layers`` lists the
    converted ``(name, module)`` pairs in registration order.
    """

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.layers: list[tuple[str, nn.Module]] = []
        refused: list[str] = []
        for name, m in model.named_modules():
            own = list(m.parameters(recurse=False))
            if not own:
                continue
            if any(isinstance(p, nn.parameter.UninitializedParameter) for p in own):
                raise ValueError(
                    f"method {self.name!r}: layer {name or type(m).__name__} ({type(m).__name__}) is lazy "
                    "and not initialised yet; run one forward pass before creating the method"
                )
            if isinstance(m, CONVERTED) and type(m).forward in _CONVERTED_FORWARDS:
                self.layers.append((name, m))
            elif not isinstance(m, EXACT):
                refused.append(f"{name or '(model)'} ({type(m).__name__})")
        if refused:
            raise ValueError(
                f"method {self.name!r} cannot train layers whose weights it cannot replace in the backward "
                f"pass: {', '.join(refused)}; supported: nn.Linear, nn.Conv1d/2d/3d (converted) and "
                "norm layers, PReLU, Embedding (exact backward)"
            )
        if not self.layers:
            raise ValueError(
                f"method {self.name!r} needs at least one nn.Linear or nn.Conv1d/2d/3d layer, "
                f"and {type(model).__name__} has none"
            )

    # -- what subclasses define ---------------------------------------------------------------
    def backward_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        """``B`` for ``module`` this step, shaped like ``module.weight``."""
        raise NotImplementedError

    def begin_step(self) -> None:
        """Called once per step before the forward pass (e.g. to draw batchwise-random ``B``)."""

    # -- machinery ------------------------------------------------------------------------------
    @contextmanager
    def converted(self) -> Iterator[None]:
        """Swap each converted layer's ``forward`` for the ``B``-backward one; restore on exit."""
        saved = []
        try:
            for name, m in self.layers:
                back = self.backward_weight(name, m).detach()

                def forward(mod, x, _back=back):
                    return substituted_forward(mod, x, _back)

                saved.append((m, m.__dict__.get("forward")))
                m.forward = types.MethodType(forward, m)
            yield
        finally:
            for m, previous in saved:
                if previous is None:
                    del m.forward
                else:
                    m.forward = previous

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        self.begin_step()
        with self.converted():
            out = forward_checked(self.model, x)
        loss = loss_fn(out, y)
        loss.backward()
        return StepResult(loss.detach(), out.detach())


def random_like_init(weight: torch.Tensor, *, init: str, scale: float, generator: torch.Generator) -> torch.Tensor:
    """A random tensor shaped like ``weight`` with the variance of PyTorch's default layer init.

    ``init="uniform"``: ``U(-a, a)``, ``a = scale / sqrt(fan_in)`` (``nn.Linear``/``nn.ConvNd``'s own
    default init when ``scale = 1``); ``init="normal"``: ``N(0, scale^2 / (3 fan_in))``, the same
    variance.
    """
    a = scale / math.sqrt(fan_in(weight))
    if init == "uniform":
        r = torch.rand(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
        return r.mul_(2.0).sub_(1.0).mul_(a)
    if init == "normal":
        r = torch.randn(weight.shape, generator=generator, device=weight.device, dtype=weight.dtype)
        return r.mul_(a / math.sqrt(3.0))
    raise ValueError(f"unknown init {init!r}; choose uniform or normal")


@register
class FA(LayerFeedback):
    """Feedback alignment: every Linear/Conv layer sends its input gradient through a fixed random ``B``.

    For ``nn.Linear`` with ``W``, ``B``: ``(n_out, n_in)`` and ``g = dL/dy``: ``(batch, n_out)``:
    ``dL/dx = g B`` (``(batch, n_in)``), ``dL/dW = g^T x``, ``dL/db = sum_batch g`` (BP's, given ``g``).
    ``nn.ConvNd``: ``dL/dx = conv_transpose(g, B)``; weight and bias gradients as BP's.
    ``B`` is drawn once, when the method is created: ``U(-scale/sqrt(fan_in), scale/sqrt(fan_in))``
    (``init=uniform``, PyTorch's default init of the layer for ``scale=1``) or normal with the same
    variance. The last layer's input gradient also goes through its ``B``; the head's own weight
    gradient is exact. Feedback points are ignored.

    Supports any model built from nn.Linear / nn.Conv1d/2d/3d, parameter-free modules and the layers
    in :data:`EXACT`; refuses other parametrised modules. ``method.backward`` maps each converted
    layer's name to its ``B`` (setting ``B = W`` there gives BP).
    """

    name = "fa"
    summary = "feedback alignment: fixed random B in place of W in every layer's backward"

    @dataclass
    class Options:
        init: str = option("uniform", "distribution of B (the variance of PyTorch's default layer init)",
                           choices=("uniform", "normal"))
        scale: float = option(1.0, "B's standard deviation relative to PyTorch's default init of the layer")
        seed: int = option(0, "seed of B")

        def check(self) -> None:
            if not self.scale > 0:
                raise OptionError(f"option 'scale' must be positive, got {self.scale}")

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        seeded = MethodGenerator(self.options.seed)  # B is drawn once, here: not part of the state
        with torch.no_grad():
            self.state.update(backward={  # B per converted layer, shaped like its weight
                name: random_like_init(m.weight, init=self.options.init, scale=self.options.scale,
                                       generator=seeded.on(m.weight.device))
                for name, m in self.layers})

    def backward_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        B = self.state.backward[name]
        if B.shape != module.weight.shape:
            raise ValueError(f"the backward matrix of layer {name!r} is {tuple(B.shape)}, "
                             f"but its weight is {tuple(module.weight.shape)}")
        if B.device != module.weight.device or B.dtype != module.weight.dtype:
            B = self.state.backward[name] = B.to(module.weight.device, module.weight.dtype)
        return B

    def check_state(self, state: dict[str, Any]) -> None:
        saved, names = state.get("backward", {}), {n for n, _ in self.layers}
        if set(saved) != names:
            raise ValueError(
                f"checkpoint holds backward matrices for layers {sorted(saved)}, this model has {sorted(names)}"
            )
