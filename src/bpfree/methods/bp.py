"""Backpropagation: the reference every other method is measured against."""

from __future__ import annotations

import torch

from . import register
from .base import LossFn, Method, StepResult
from .guards import forward_checked


@register
class BP(Method):
    """End-to-end backpropagation: ``loss.backward()``.

    Every parameter receives ``dL/dtheta``; the signal at feedback point ``l`` is ``J_l^T e``.
    Feedback points stay identities. Supports every model.
    """

    name = "bp"
    supports_loss_scaling = True
    summary = "end-to-end backpropagation (the reference)"

    def step(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> StepResult:
        out = forward_checked(self.model, x)
        loss = loss_fn(out, y)
        loss.backward()
        return StepResult(loss.detach(), out.detach())
