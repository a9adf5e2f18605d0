"""Direct Random Target Projection (Frenkel, Lefebvre and Bol, 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import register
from .dfa import CutPass, DirectFeedback


def one_hot_targets(y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``y* / N``: the one-hot targets of integer labels ``y``, shaped and typed like ``out``.

    ``out``: ``(batch, o)`` or ``(batch, T, o)``; ``y``: ``(batch,)`` or ``(batch, T)`` integer labels in
    ``[0, o)``. ``N`` is the number of target rows (``batch`` or ``batch * T``), so the projection is
    a per-batch average like ``e = dL/dy`` of a mean-reduced loss. Labels out of range are a
    ``ValueError`` on the CPU; on CUDA ``one_hot`` checks them with a device-side assertion (no
    wait for the device), and the training loop's tasks check their labels when they load.
    """
    o = out.shape[-1]
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.is_complex():
        raise ValueError(
            f"method 'drtp' projects one-hot class targets and needs integer labels, got a {y.dtype} "
            f"target of shape {tuple(y.shape)}; DRTP is defined for classification only"
        )
    if tuple(y.shape) != tuple(out.shape[:-1]):
        raise ValueError(
            f"method 'drtp' needs one integer label per output row: the output is {tuple(out.shape)}, "
            f"so labels of shape {tuple(out.shape[:-1])}, but they are {tuple(y.shape)}"
        )
    try:  # the range is read only when one_hot refuses it (CPU): a step does not wait for the device
        hot = F.one_hot(y, o)
    except RuntimeError:
        lo, hi = int(y.min()), int(y.max())
        raise ValueError(f"method 'drtp': labels lie in [{lo}, {hi}], outside the {o} classes [0, {o})") from None
    return hot.to(out.dtype) / y.numel()


@register
class DRTP(DirectFeedback):
    """Direct Random Target Projection: point ``l`` receives ``B_l y* / N``, the output error is not needed.

    ``y*``: one-hot targets ``(batch, o)`` of the integer labels; ``B_l``: fixed random ``(n_l, o)``
    (same options and initialisation as DFA); the signal at point ``l`` is ``delta_l = B_l y*_i / N``
    per sample ``i`` (``N``: number of samples, so that the size matches ``e = dL/dy`` of a
    mean-reduced loss), reshaped to ``h_l``; inside block ``l`` autograd turns it into weight
    gradients, i.e. for a Linear+activation block ``dW_l = (delta_l * f'(a_l))^T h_{l-1}``. The
    sign follows Frenkel et al. (the target stands in for the error; with the zero-mean ``B_l`` the
    sign of the projection is immaterial in distribution). The head (the block after the last
    point) still receives its true error ``e = dL/dy`` and its true gradient.

    Needs feedback points (``bpfree.attach`` or a zoo model) and classification targets: integer
    labels in ``[0, o)``, one per output row (``(batch,)``, or ``(batch, T)`` for sequence outputs).
    Models with a :class:`bpfree.Head` marker project the one-hot targets over the model output's
    ``o`` classes (``B_l`` is ``(n_l, o)`` with ``o`` the number of classes).
    """

    name = "drtp"
    summary = "direct random target projection: fixed random B_l y* (one-hot targets) at every point"

    def projected(self, record: CutPass) -> torch.Tensor:
        """``B_l`` projects the one-hot targets over the model output's ``o`` classes."""
        return record.output

    def link_target(self, record: CutPass, y: torch.Tensor) -> torch.Tensor:
        """``y* / N`` from the labels ``y`` (checked here, before the loss): the links project it."""
        return one_hot_targets(y, record.output)
