"""The interface every learning rule implements.

A :class:`Method` wraps a model. ``method.step(x, y, loss_fn)`` runs the forward pass, computes the
loss and fills each parameter's ``.grad`` the way ``loss.backward()`` would under backpropagation
(accumulating into existing gradients), so the caller's optimizer, scheduler, gradient clipping and
mixed precision keep working unchanged. The method's own state (feedback matrices, estimates,
random generators) lives in ``state_dict()`` and is checkpointed with the run.

Every subclass's ``step`` is wrapped once, when the class is defined (:meth:`Method.__init_subclass__`):
the batch is checked first (:func:`check_batch`), and an error raised inside ``loss_fn`` (targets of
the wrong shape, dtype or range for the output) becomes a ``ValueError`` that names the output and
target shapes, instead of a bare error from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import functools
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
    #: True when the ``.grad`` a step fills is linear in the loss: ``step(x, y, c * loss_fn)`` fills
    #: ``c`` times the gradients of ``step(x, y, loss_fn)``. The training loop's ``amp = "fp16"``
    #: scales the loss (``torch.amp.GradScaler``) and needs it; BP and the DFA family qualify,
    #: a method whose update does not follow the loss's scale (targets projected directly, errors
    #: added to the input) does not.
    supports_loss_scaling: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        step = cls.__dict__.get("step")
        if step is not None and not getattr(step, "_bpfree_guarded", False):
            cls.step = _guarded(step)

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

    @property
    def period(self) -> int:
        """Steps after which the method's per-step work repeats (1: every step costs the same).

        A method that does extra work every K-th step says K, so that a benchmark times whole
        periods rather than a mix of cheap and dear steps.
        """
        return 1

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


class MethodGenerator:
    """A method's own random generator, seeded with the method's ``seed`` option.

    ``on(device)`` returns the generator, created on the device of first use (and afresh from the
    seed when the device changes: CPU and CUDA generator states do not convert). ``get_state`` /
    ``set_state`` carry its state through the method's ``state_dict``; a state set before first use
    is applied then, so a resumed run draws what an uninterrupted one would.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None

    def on(self, device: torch.device | str) -> torch.Generator:
        if self._generator is None or self._generator.device != torch.device(device):
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            if self._pending is not None:
                g.set_state(self._pending)
                self._pending = None
            self._generator = g
        return self._generator

    def get_state(self) -> torch.Tensor | None:
        """The current state, or the one waiting for first use; ``None`` if never used nor set."""
        return self._generator.get_state() if self._generator is not None else self._pending

    def set_state(self, state: torch.Tensor | None) -> None:
        """Apply ``state`` at the next :meth:`on` (``None``: start again from the seed)."""
        self._generator, self._pending = None, state


def check_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Errors that name the problem for batches the model cannot take."""
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}")
    if x.dim() == 0:
        raise ValueError("x is a 0-d tensor: a batch needs a leading batch dimension")
    if x.shape[0] == 0:
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)}")
    if y.dim() == 0:
        raise ValueError(f"y is a 0-d tensor: it needs one target per sample, a leading dimension of {x.shape[0]}")
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x holds {x.shape[0]} samples but y holds {y.shape[0]}")
    for what, t in (("x", x), ("y", y)):
        if t.is_complex():
            raise ValueError(f"{what} is complex ({t.dtype}); bpfree trains on real-valued data")
    param = next(iter(model.parameters()), None)
    if param is not None and x.device != param.device:
        raise ValueError(f"x is on device {x.device} but the model is on device {param.device}; move the batch with .to()")
    if y.device != x.device:
        raise ValueError(f"x is on device {x.device} but y is on device {y.device}; put both on the model's device")


class BatchError(ValueError):
    """A batch ``(x, y)`` the model or the loss cannot take; the message names shapes and dtypes.

    Raised as :class:`BatchIndexError` or :class:`BatchRuntimeError` when torch raised an
    ``IndexError`` or ``RuntimeError``, so code that caught those still does.
    """


class BatchIndexError(BatchError, IndexError):
    pass


class BatchRuntimeError(BatchError, RuntimeError):
    pass


def _batch_error(err: Exception, text: str) -> BatchError:
    return (BatchIndexError if isinstance(err, IndexError) else BatchRuntimeError)(text)


def _loss_error(err: Exception, out: Any, y: Any) -> BatchError:
    shape = lambda t: f"{tuple(t.shape)} ({t.dtype})" if isinstance(t, torch.Tensor) else type(t).__name__
    msg = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
    hint = ""
    if isinstance(out, torch.Tensor) and isinstance(y, torch.Tensor) and out.dim() >= 1 and "out of bounds" in msg:
        hint = f"; class labels must lie in [0, {out.shape[-1]})"
    return _batch_error(err, f"the loss cannot take the model output {shape(out)} with targets {shape(y)}: {msg}{hint}")


def checked_loss(loss_fn: LossFn) -> LossFn:
    """``loss_fn`` whose errors about its arguments become a ``ValueError`` naming both shapes.

    A ``RuntimeError`` or ``IndexError`` raised inside ``loss_fn`` (wrong target dtype, shape or
    class range) is re-raised that way; out-of-memory errors pass through unchanged. (Class labels
    out of range on a CUDA device trip a device-side assertion that no Python code can catch; the
    training loop's tasks check their labels when they load.)
    """
    if getattr(loss_fn, "_bpfree_checked", False):
        return loss_fn

    @functools.wraps(loss_fn)
    def checked(out, y, *args, **kwargs):
        try:
            return loss_fn(out, y, *args, **kwargs)
        except (torch.OutOfMemoryError, BatchError):
            raise
        except (RuntimeError, IndexError) as err:
            raise _loss_error(err, out, y) from err

    checked._bpfree_checked = True
    return checked


def _guarded(step: Callable) -> Callable:
    """``step`` with :func:`check_batch` first and ``loss_fn`` wrapped by :func:`checked_loss`.

    An ``IndexError`` escaping the step (a dimension the input lacks) becomes a ``ValueError``
    naming the input's shape.
    """

    @functools.wraps(step)
    def guarded(self, x, y, loss_fn, *args, **kwargs):
        check_batch(self.model, x, y)
        try:
            return step(self, x, y, checked_loss(loss_fn), *args, **kwargs)
        except IndexError as err:
            if isinstance(err, BatchError):
                raise
            raise _batch_error(err,
                f"method {self.name!r} cannot take x of shape {tuple(x.shape)} ({x.dtype}) with y of shape "
                f"{tuple(y.shape)}: {str(err).splitlines()[0] if str(err) else 'IndexError'}"
            ) from err

    guarded._bpfree_guarded = True
    return guarded


def forward_checked(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``model(x)``, turning shape errors from deep inside torch into one that names the input."""
    try:
        return model(x)
    except (RuntimeError, IndexError) as err:
        msg = str(err)
        if (isinstance(err, IndexError) or "shape" in msg or "size" in msg or "mat1" in msg or "dimension" in msg
                or "dtype" in msg):
            raise (BatchIndexError if isinstance(err, IndexError) else BatchError)(
                f"the model cannot take input of shape {tuple(x.shape)} (dtype {x.dtype}): {msg.splitlines()[0]}"
            ) from err
        raise
