"""The guards around every method's ``step``: a checked batch and errors that name the problem.

:func:`guarded_step` wraps each :class:`bpfree.methods.base.Method` subclass's ``step`` once, when
the class is defined: the batch is checked first (:func:`check_batch`), and an error raised inside
``loss_fn`` (targets of the wrong shape, dtype or range for the output) becomes a
:class:`BatchError`, a ``ValueError`` that names the output and target shapes, instead of a bare
error from deep inside torch. Methods call :func:`forward_checked` for their forward pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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

    def checked(out, y, *args, **kwargs):  # made once per step: no functools.wraps on the hot path
        try:
            return loss_fn(out, y, *args, **kwargs)
        except (torch.OutOfMemoryError, BatchError):
            raise
        except (RuntimeError, IndexError) as err:
            raise _loss_error(err, out, y) from err

    checked._bpfree_checked = True
    return checked


def guarded_step(step: Callable) -> Callable:
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
