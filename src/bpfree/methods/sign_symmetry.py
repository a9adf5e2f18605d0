"""The sign-symmetry family (Liao et al., 2016; Moskovitz et al., 2018; names as in BioTorch).

Feedback alignment (:mod:`bpfree.methods.fa`) whose backward matrix of every Linear/Conv layer
shares the *signs* of the current forward weight but not its magnitudes:

    B = sign(W) * M * s            (element-wise; B, W, M all shaped like the weight)

* ``usf`` (uniform sign-concordant feedback): ``M = 1``.
* ``brsf`` (batchwise random magnitude sign-concordant feedback): ``M = |R|``, ``R ~ N(0, 1)``
  drawn afresh for every step (mini-batch).
* ``frsf`` (fixed random magnitude sign-concordant feedback): ``M = |R|``, ``R ~ N(0, 1)`` drawn
  once when the method is created.

``E[M^2] = 1`` in all three, and the scale ``s`` (option ``scale``) is

* ``rms`` (default): ``s = |W|_F / sqrt(numel(W))``, the root-mean-square of the *current* ``W``,
  so that ``|B|_F = |W|_F`` for uSF (exactly, when ``W`` has no zero entries) and in expectation
  for brSF/frSF: the backward pass keeps BP's gradient magnitudes, whatever the optimizer;
* ``init``: ``s = 1 / sqrt(3 fan_in)``, the standard deviation of PyTorch's default init of the
  layer (``fan_in = n_in`` for Linear, ``C_in/groups * prod(kernel)`` for ConvNd);
* ``unit``: ``s = 1``, the raw signs of Liao et al. (large: use with adaptive optimizers only).

``sign(W)`` and ``s`` are read from the weights at the start of each step's forward pass. The
weight gradients are BP's given the incoming signal (see :class:`bpfree.methods.fa.LayerFeedback`);
feedback points are ignored. Models: as ``fa`` (nn.Linear / nn.Conv1d/2d/3d, norm layers,
parameter-free modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..options import option
from . import register
from .base import MethodGenerator
from .fa import LayerFeedback, fan_in


class SignSymmetry(LayerFeedback):
    """``B = sign(W) * M * s`` for every converted layer; ``magnitude`` picks ``M`` (see the module)."""

    magnitude: ClassVar[str] = "uniform"  # uniform | batchwise | fixed

    @dataclass
    class Options:
        scale: str = option("rms", "scale s of B = sign(W) * M * s: rms of the current W (|B| ~ |W|), "
                            "std of PyTorch's default init, or 1", choices=("rms", "init", "unit"))
        seed: int = option(0, "seed of the random magnitudes (brsf, frsf)")

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.state.update(generator=MethodGenerator(self.options.seed))
        if self.magnitude == "fixed":  # |R| per layer, drawn once
            self.state.update(magnitudes={name: self.draw(m.weight) for name, m in self.layers})

    def draw(self, weight: torch.Tensor) -> torch.Tensor:
        """``|R|`` with ``R ~ N(0, 1)``, shaped like ``weight``."""
        r = torch.randn(weight.shape, generator=self.state.generator.on(weight.device), device=weight.device, dtype=weight.dtype)
        return r.abs_()

    def layer_scale(self, W: torch.Tensor) -> torch.Tensor | float:
        """``s`` for weight ``W`` (a 0-d tensor for ``rms``, left on the device)."""
        if self.options.scale == "rms":
            return W.norm() / math.sqrt(W.numel())
        if self.options.scale == "init":
            return 1.0 / math.sqrt(3.0 * fan_in(W))
        return 1.0

    def backward_weight(self, name: str, module: nn.Module) -> torch.Tensor:
        W = module.weight.detach()
        B = torch.sign(W) * self.layer_scale(W)
        if self.magnitude == "batchwise":
            B = B * self.draw(W)
        elif self.magnitude == "fixed":
            M = self.state.magnitudes[name]
            if M.device != W.device or M.dtype != W.dtype:
                M = self.state.magnitudes[name] = M.to(W.device, W.dtype)
            B = B * M
        return B

    def check_state(self, state: dict[str, Any]) -> None:
        names = {n for n, _ in self.layers}
        if "magnitudes" in state and set(state["magnitudes"]) != names:
            raise ValueError(f"checkpoint holds magnitudes for layers {sorted(state['magnitudes'])}, "
                             f"this model has {sorted(names)}")


@register
class USF(SignSymmetry):
    """Uniform sign-concordant feedback: ``B = sign(W) * s`` (``s``: option ``scale``, default rms(W)).

    E.g. for ``nn.Linear`` with ``g = dL/dy`` (``(batch, n_out)``): ``dL/dx = g (sign(W) s)``; weight
    gradients are BP's given ``g``. Models: as ``fa``.
    """

    name = "usf"
    summary = "sign symmetry, uniform magnitudes: B = sign(W) * s"
    magnitude = "uniform"


@register
class BRSF(SignSymmetry):
    """Batchwise random magnitude sign-concordant feedback: ``B = sign(W) * |R_t| * s``, fresh ``R_t ~ N(0,1)`` per step.

    Models: as ``fa``.
    """

    name = "brsf"
    summary = "sign symmetry, magnitudes |R| drawn afresh every batch"
    magnitude = "batchwise"


@register
class FRSF(SignSymmetry):
    """Fixed random magnitude sign-concordant feedback: ``B = sign(W) * |R| * s``, ``R ~ N(0,1)`` drawn once.

    Models: as ``fa``.
    """

    name = "frsf"
    summary = "sign symmetry, fixed random magnitudes |R|"
    magnitude = "fixed"
