"""PEPITA: error-driven input modulation (Dellaferrera and Kreiman, ICML 2022).

No backward pass at all: two forward passes, the second with the input shifted by a fixed random
projection of the output error, and a local update per layer from the difference of the passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..options import OptionError, option
from ..points import NONLINEARITIES, FeedbackPoint
from . import register
from .base import LossFn, Method, MethodGenerator, StepResult

#: Layers PEPITA updates.
LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)
_STOCK_FORWARDS = {c.forward for c in LAYERS}
#: Element-wise modules: the activity ``h_l`` of a layer is taken after the ones that follow it.
ELEMENTWISE: tuple[type[nn.Module], ...] = NONLINEARITIES + (nn.Identity, FeedbackPoint)
#: Parameter-free modules allowed on the way from ``h_l`` to the next layer's input.
PATH: tuple[type[nn.Module], ...] = (
    nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
)


@dataclass
class _Layer:
    """One PEPITA layer: ``layer`` (Linear/Conv2d), its element-wise ``act``s and the ``path`` after them."""

    name: str
    layer: nn.Module
    act: list[nn.Module]
    path: list[nn.Module]


def _flatten(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out: list[tuple[str, nn.Module]] = []
    for name, m in model.named_children():
        if isinstance(m, nn.Sequential):
            out += _flatten(m, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", m))
    return out


def _run(mods: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in mods:
        h = m(h)
    return h


@register
class PEPITA(Method):
    """Present the Error to Perturb the Input To modulate Activity (Dellaferrera & Kreiman 2022).

    For layers ``l = 1..L`` (each a Linear or Conv2d ``W_l`` with its element-wise non-linearity
    ``f_l``; ``h_0 = x`` flattened to ``(batch, d)`` where it meets ``F``):

    1. standard pass: ``h_l = f_l(W_l h_{l-1})``; output ``y = W_L h_{L-1}``;
       per-sample error ``e = N dL/dy`` (``(batch, o)``; ``softmax(y) - onehot`` for mean cross-entropy,
       ``N`` = batch size);
    2. modulated pass from ``x_mod = x + F e`` (``F``: fixed random ``(d, o)``, reshaped to ``x``):
       ``h_l^mod = f_l(W_l h_{l-1}^mod)``;
    3. updates, written into ``.grad`` so that the user's optimizer (which descends,
       ``W <- W - lr grad``) applies ``W_l <- W_l - lr dW_l`` as in the paper::

           dW_l = mean_i (h_l - h_l^mod)_i (h_{l-1}^mod)_i^T     hidden layers, (n_l, n_{l-1})
           dW_L = mean_i e_i (h_{L-1}^mod)_i^T                   last layer, (o, n_{L-1})

       (no activation derivative). Biases take the same rule with input 1
       (``db_l = mean_i (h_l - h_l^mod)_i``, ``db_L = mean_i e_i``). For a Conv2d layer the outer
       product is the convolution weight-gradient correlation of ``(h_l - h_l^mod)`` (at the
       layer's output) with its modulated input.

    Signs as in the paper's algorithm (``x + F e``, ``h - h^mod``, descent). ``F_ij ~ U(-a, a)``,
    ``a = f_scale * sqrt(6 / d)`` (the paper: ``0.05 * sqrt(6/d)``), seeded by ``seed``. ``h_l`` is
    taken after the element-wise modules that directly follow layer ``l`` (non-linearities,
    feedback points, Identity); pooling/Flatten after it form the next layer's input path. After
    the last layer only parameter-free modules may follow; ``e`` is taken at the last layer's
    output through them.

    Models: an ``nn.Sequential`` (nested ones are flattened; bpfree's ``mlp``) made of nn.Linear,
    at most one nn.Conv2d, element-wise non-linearities, feedback points, Identity, Flatten/Unflatten
    and pooling; outputs ``(batch, o)``. Anything else (BatchNorm, Dropout, several conv layers,
    custom modules) is refused with a ValueError.

    Optimizer: the paper uses SGD (lr 0.01, momentum 0.9, batch 64, 100 epochs with lr decay).
    Over one epoch of MNIST the run defaults (Adam, lr 1e-3, batch 128) learn faster than SGD lr
    0.01 (measured on the first 10k samples: 87% vs 75% test accuracy), so they work as they are.
    """

    name = "pepita"
    summary = "two forward passes, the second from x + F e; local updates from their difference"

    @dataclass
    class Options:
        f_scale: float = option(0.05, "F_ij ~ U(-a, a) with a = f_scale * sqrt(6 / input features)")
        seed: int = option(0, "seed of F")

        def check(self) -> None:
            if self.f_scale < 0:
                raise OptionError(f"option 'f_scale' must be non-negative, got {self.f_scale}")

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.pre, self.stages, self.tail = self._parse(model)
        self.state.update(F=None)  # the input projection F (d, o), drawn on first use

    # -- the model as PEPITA sees it -----------------------------------------------------------
    def _parse(self, model: nn.Module) -> tuple[list[nn.Module], list[_Layer], list[nn.Module]]:
        if not isinstance(model, nn.Sequential):
            raise ValueError(
                f"method 'pepita' trains chains of layers and needs an nn.Sequential, got {type(model).__name__}; "
                "build the model as nn.Sequential(Linear, activation, ..., Linear)"
            )
        flat = _flatten(model)
        bad = [f"{n} ({type(m).__name__})" for n, m in flat
               if not (isinstance(m, LAYERS) and type(m).forward in _STOCK_FORWARDS)
               and not isinstance(m, ELEMENTWISE + PATH)]
        bad += [f"{n} ({type(m).__name__}, parameters)" for n, m in flat
                if isinstance(m, ELEMENTWISE + PATH) and any(True for _ in m.parameters())]
        if bad:
            raise ValueError(
                "method 'pepita' supports nn.Linear, one nn.Conv2d, element-wise non-linearities, feedback "
                f"points, Identity, Flatten/Unflatten and pooling, and cannot train: {', '.join(bad)}"
            )
        convs = [n for n, m in flat if isinstance(m, nn.Conv2d)]
        if len(convs) > 1:
            raise ValueError(
                f"method 'pepita' is defined for networks with at most one convolutional layer "
                f"(Dellaferrera & Kreiman 2022), and this one has {len(convs)}: {', '.join(convs)}"
            )
        pre: list[nn.Module] = []
        stages: list[_Layer] = []
        for name, m in flat:
            if isinstance(m, LAYERS):
                stages.append(_Layer(name, m, [], []))
            elif not stages:
                pre.append(m)
            elif isinstance(m, ELEMENTWISE) and not stages[-1].path:
                stages[-1].act.append(m)
            else:
                stages[-1].path.append(m)
        if not stages:
            raise ValueError("method 'pepita' needs at least one nn.Linear or nn.Conv2d layer, and the model has none")
        tail = stages[-1].act + stages[-1].path
        stages[-1].act, stages[-1].path = [], []
        return pre, stages, tail

    # -- the step ------------------------------------------------------------------------------
    def projection(self, x: torch.Tensor, o: int) -> torch.Tensor:
        """``F``: ``(d, o)`` with ``d = prod(x.shape[1:])``, created on first use."""
        d = math.prod(x.shape[1:])
        F = self.state.F
        if F is None:
            a = self.options.f_scale * math.sqrt(6.0 / d)
            g = MethodGenerator(self.options.seed).on(x.device)
            dtype = x.dtype if x.is_floating_point() else torch.float32
            F = self.state.F = (torch.rand(d, o, generator=g, device=x.device, dtype=dtype) * 2 - 1) * a
        elif F.shape != (d, o):
            raise ValueError(f"method 'pepita': F is {tuple(F.shape)} but the batch has {d} input "
                             f"features and the model {o} outputs")
        if F.device != x.device:
            F = self.state.F = F.to(x.device)
        return F

    def passes(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """``(layer inputs, activities h_l, output of the last layer)`` of one pass without autograd."""
        inputs, acts = [], []
        h = _run(self.pre, x)
        for s in self.stages:
            inputs.append(h)
            h = _run(s.act, s.layer(h))
            acts.append(h)
            h = _run(s.path, h)
        return inputs, acts, acts[-1]

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        if not x.is_floating_point():
            raise ValueError(f"method 'pepita' adds F e to the input and needs floating-point inputs, got {x.dtype}")
        try:
            with torch.no_grad():
                _, acts, a_L = self.passes(x)
        except RuntimeError as err:
            raise ValueError(f"the model cannot take input of shape {tuple(x.shape)}: {str(err).splitlines()[0]}") from err
        # e at the last layer's output, through the parameter-free tail
        leaf = a_L.detach().requires_grad_()
        with torch.enable_grad():
            out = _run(self.tail, leaf)
            if out.dim() != 2:
                raise ValueError(f"method 'pepita' needs outputs of shape (batch, o), got {tuple(out.shape)}")
            loss = loss_fn(out, y)
            (e,) = torch.autograd.grad(loss, leaf)
        N = e.shape[0]
        F = self.projection(x, e.shape[1])
        x_mod = x + (N * e).to(x.dtype).matmul(F.to(x.dtype).t()).reshape(x.shape)
        # modulated pass, each layer's graph kept local (its input detached)
        outs, grads = [], []
        h = _run(self.pre, x_mod).detach()
        with torch.enable_grad():
            for l, s in enumerate(self.stages):
                a = s.layer(h)
                outs.append(a)
                with torch.no_grad():
                    h_mod = _run(s.act, a)
                    if l + 1 < len(self.stages):
                        grads.append((acts[l] - h_mod) / N)
                    h = _run(s.path, h_mod)
            grads.append(e.to(outs[-1].dtype))
            torch.autograd.backward(outs, grads)
        return StepResult(loss.detach(), out.detach(), {})
