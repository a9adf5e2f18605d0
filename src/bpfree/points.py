"""Feedback points: the one seam between a model and a learning rule.

A model marks the boundaries between its blocks with :class:`FeedbackPoint` modules. Block ``l``
maps ``h_{l-1}`` to ``h_l``; the point placed after it sees ``h_l``. In the forward pass a point is
the identity, and under backpropagation it stays that way. A learning rule (a
:class:`bpfree.methods.Method`) gives the points of a model a *handler* for the duration of a
forward pass; the handler receives ``(point, h_l)`` and returns what the next block sees. That is
how DFA-family methods cut the autograd graph between blocks and remember each ``h_l``, and how
GrAPE injects forward-mode tangents. Models never know which method trains them.

:func:`attach` places points in a plain :class:`torch.nn.Sequential` after every non-linearity.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

Handler = Callable[["FeedbackPoint", torch.Tensor], torch.Tensor]


class FeedbackPoint(nn.Module):
    """Identity marker at a block boundary; a method may install a handler for a forward pass.

    ``forward(h)`` with ``h`` of shape ``(batch, *features)`` returns ``h`` unchanged unless a handler
    is installed (see :func:`handled`), in which case it returns ``handler(self, h)``.
    ``n_l = prod(features)`` for flat and convolutional maps; for sequences ``(batch, T, d)`` the
    feedback acts per token on the last dimension.
    """

    def __init__(self) -> None:
        super().__init__()
        self.handler: Handler | None = None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.handler is None:
            return h
        return self.handler(self, h)

    def extra_repr(self) -> str:
        return "" if self.handler is None else f"handler={getattr(self.handler, '__name__', self.handler)}"


class Head(FeedbackPoint):
    """Marks where the output error is taken: the input ``z`` of the model's head.

    Without a ``Head`` the error is ``e = dL/dy`` at the model output. A model may place one
    ``Head`` before its final projection (a language model's vocabulary projection, as in Launay
    et al. 2020): then ``e = dL/dz`` is computed by backpropagating through the head alone, ``o``
    is the width of ``z``, and the Jacobians ``J_l`` are ``dz/dh_l``. Identity in the forward pass.
    """


def feedback_points(model: nn.Module) -> list[tuple[str, FeedbackPoint]]:
    """The ``(qualified name, point)`` pairs of ``model`` in registration order (no :class:`Head`)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, FeedbackPoint) and not isinstance(m, Head)]


def head_marker(model: nn.Module) -> Head | None:
    """The model's :class:`Head`, if it has one (at most one is allowed)."""
    heads = [m for m in model.modules() if isinstance(m, Head)]
    if len(heads) > 1:
        raise ValueError(f"a model may hold at most one bpfree.Head marker, this one holds {len(heads)}")
    return heads[0] if heads else None


def all_points(model: nn.Module) -> list[FeedbackPoint]:
    """Every :class:`FeedbackPoint` of ``model``, the :class:`Head` included, in module order."""
    return [m for m in model.modules() if isinstance(m, FeedbackPoint)]


@contextlib.contextmanager
def handled(model: nn.Module, handler: Handler | None,
            points: list[FeedbackPoint] | None = None) -> Iterator[None]:
    """Install ``handler`` on every feedback point (and the :class:`Head`) for the block.

    ``points``: the model's :func:`all_points`, when the caller keeps them (saves a scan of the
    module tree per pass). The previous handlers are restored on exit, even when the pass raises.
    """
    if points is None:
        points = all_points(model)
    previous = [p.handler for p in points]
    for p in points:  # a plain attribute: nn.Module.__setattr__'s checks are not needed
        object.__setattr__(p, "handler", handler)
    try:
        yield
    finally:
        for p, h in zip(points, previous):
            object.__setattr__(p, "handler", h)


# --------------------------------------------------------------------------------------------
# attach: points for a plain nn.Sequential
# --------------------------------------------------------------------------------------------

#: Element-wise non-linearities after which :func:`attach` places a point.
NONLINEARITIES: tuple[type[nn.Module], ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.Tanh, nn.Sigmoid, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid,
)

#: Layers a block may contain: they act per sample, so cutting the graph around them is sound.
BLOCK_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Bilinear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d,
    nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d,
    nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
    nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity, nn.Softmax, nn.LogSoftmax,
)


class AttachError(ValueError):
    """``attach`` met a model or layer it cannot place feedback points in."""


@dataclass
class AttachReport:
    """What :func:`attach` did: where points went and which layers it could not handle."""

    placed_after: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)


def attach(model: nn.Sequential, *, strict: bool = True) -> tuple[nn.Sequential, AttachReport]:
    """Return a copy of the ``nn.Sequential`` ``model`` with a point after each non-linearity.

    The modules themselves are shared, not copied. No point follows the last non-linearity if
    nothing with parameters comes after it (that would be the output). Layers that are neither a
    known non-linearity nor a known per-sample layer (:data:`BLOCK_LAYERS`) are reported in
    ``report.unsupported``; with ``strict=True`` (the default) they raise :class:`AttachError`,
    because a method cannot know whether cutting the graph around them is sound.
    Nested ``nn.Sequential`` containers are flattened.
    """
    if not isinstance(model, nn.Sequential):
        raise AttachError(
            f"attach() takes a plain nn.Sequential, got {type(model).__name__}; "
            "place bpfree.FeedbackPoint modules in custom models yourself"
        )
    flat: list[tuple[str, nn.Module]] = []

    def flatten(seq: nn.Sequential, prefix: str) -> None:
        for name, m in seq.named_children():
            if isinstance(m, nn.Sequential):
                flatten(m, f"{prefix}{name}.")
            else:
                flat.append((f"{prefix}{name}", m))

    flatten(model, "")
    report = AttachReport()
    for name, m in flat:
        if isinstance(m, FeedbackPoint):
            raise AttachError(f"layer {name} is already a FeedbackPoint; attach() a model once")
        if not isinstance(m, NONLINEARITIES + BLOCK_LAYERS):
            report.unsupported.append(f"{name} ({type(m).__name__})")
    if report.unsupported and strict:
        raise AttachError(
            "attach() cannot place feedback points around these layers: "
            + ", ".join(report.unsupported)
            + "; mark block boundaries with bpfree.FeedbackPoint yourself, or pass strict=False"
        )
    has_params_after = [False] * len(flat)
    seen = False
    for i in range(len(flat) - 1, -1, -1):
        has_params_after[i] = seen
        seen = seen or any(True for _ in flat[i][1].parameters())
    layers: list[nn.Module] = []
    for i, (name, m) in enumerate(flat):
        layers.append(m)
        if isinstance(m, NONLINEARITIES) and has_params_after[i]:
            layers.append(FeedbackPoint())
            report.placed_after.append(name)
    if not report.placed_after:
        raise AttachError(
            "attach() found no non-linearity followed by a layer with parameters, so there is "
            "no block boundary to place a feedback point at"
        )
    return nn.Sequential(*layers), report
