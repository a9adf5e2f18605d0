"""The interface every learning rule implements.

A :class:`Method` wraps a model. ``method.step(x, y, loss_fn)`` runs the forward pass, computes the
loss and fills each parameter's ``.grad`` the way ``loss.backward()`` would under backpropagation
(accumulating into existing gradients), so the caller's optimizer, scheduler, gradient clipping and
mixed precision keep working unchanged. The method's own state (feedback matrices, estimates,
random generators) lives in ``state_dict()`` and is checkpointed with the run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import options as opts

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    """What one training step returns.

    ``loss``: the scalar loss (detached); ``output``: the model output ``y`` (detached),
    ``(batch, o)`` or ``(batch, T, o)``; ``metrics``: cheap per-step numbers of the method, as
    floats or 0-d tensors (left on the device, so logging decides when to synchronise).
    """

    loss: torch.Tensor
    output: torch.Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


class Method:
    """Base class of learning rules.

    Subclasses set ``name``, a one-line ``summary``, an ``Options`` dataclass (fields made with
    :func:`bpfree.options.option`), and implement :meth:`step`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""

    @dataclass
    class Options:
        pass

    def __init__(self, model: nn.Module, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"method {self.name!r} needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.options = opts.build(self.Options, options, what=f"method {self.name!r}")
        #: Averages a tensor over data-parallel workers (identity on one process). Methods that
        #: keep batch statistics of their own (GrAPE's Jacobian estimates) pass them through it so
        #: their state stays identical on every worker; the training loop sets it under
        #: torch.distributed.
        self.average_across_workers: Callable[[torch.Tensor], torch.Tensor] = lambda t: t

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        """Forward ``x``, compute ``loss_fn(output, y)``, fill ``.grad`` of the parameters."""
        raise NotImplementedError

    def on_epoch_end(self, epoch: int) -> None:
        """Called by the training loop after each epoch (epochs count from 1)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name!r} has no state, but the checkpoint holds {sorted(state)}")

    def option_dict(self) -> dict[str, Any]:
        return opts.as_dict(self.options)

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{type(self).__name__}({fields})"


def check_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Errors that name the problem for batches the model cannot take."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} samples but y holds {y.shape[0]}")


def forward_checked(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, turning shape errors from deep inside torch into one that names the input."""
    try:
        return model(x)
    except RuntimeError as err:
        msg = str(err)
        if "shape" in msg or "size" in msg or "mat1" in msg or "dimension" in msg:
            raise ValueError(
                f"the model cannot take input of shape {tuple(x.shape)} (dtype {x.dtype}): {msg.splitlines()[0]}"
            ) from err
        raise
