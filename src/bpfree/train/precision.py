"""Run option ``amp``: autocast around ``method.step`` and, for fp16, a gradient scaler."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from .errors import TrainingError


class Precision:
    """Mixed precision for one run.

    ``bf16``: ``torch.autocast(device, torch.bfloat16)``; the weights, ``.grad`` and the optimizer
    stay float32. ``fp16``: ``torch.autocast(device, torch.float16)`` and a
    ``torch.amp.GradScaler``: the loss the method differentiates is multiplied by the scale, the
    gradients are unscaled before the optimizer step, and steps with inf/NaN gradients are skipped
    (the scale then shrinks). Scaling the loss scales the gradients only for methods that declare
    ``supports_loss_scaling``; for others fp16 is refused. ``none``: a plain context and a disabled
    scaler, which passes the loss, the optimizer step and its state through unchanged.
    """

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, amp: str, device: torch.device, method) -> None:
        if amp == "fp16" and not getattr(method, "supports_loss_scaling", False):
            raise TrainingError(
                f"amp=fp16 scales the loss (gradient scaling), and method {method.name!r} does not declare that its "
                f"gradients follow the loss's scale (supports_loss_scaling); use amp=bf16 or amp=none"
            )
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError(f"amp=bf16 was asked for, but {torch.cuda.get_device_name(device)} does not support bfloat16")
        self.kind, self.device, self.dtype = amp, device, self.DTYPES.get(amp)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_fn(self, loss_fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """``loss_fn`` times the loss scale (what the method differentiates)."""
        scaler = self.scaler
        return lambda output, target: scaler.scale(loss_fn(output, target))

    def true_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss without the scale (call before :meth:`step`, which may change it)."""
        return loss / self.scaler.scale(torch.ones((), device=loss.device))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        self.scaler.step(optimizer)
        self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        """The scaler's state; ``None`` without one (what a checkpoint holds then)."""
        return self.scaler.state_dict() or None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:
            self.scaler.load_state_dict(state)
