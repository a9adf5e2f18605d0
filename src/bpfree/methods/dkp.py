"""Direct Kolen-Pollack (Webster, Choe and Brodie, 2020): DFA whose feedback matrices learn."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..feedback.matrices import flat_features, lead_dims
from ..options import OptionError, option
from . import register
from .dfa import CutPass, DirectFeedback


def dkp_update(B: torch.Tensor, h: torch.Tensor, e: torch.Tensor, eta: float, weight_decay: float) -> torch.Tensor:
    """One DKP step on a feedback matrix: ``B - eta (h^T e + weight_decay * B)``.

    ``B``: ``(n_l, o)``; ``h``: the activity at the point, ``(batch, *features)`` (or ``(batch, T, d)``
    per token); ``e = dL/dy``: ``(batch, o)`` (or ``(batch, T, o)``). ``h`` is flattened to
    ``(N, n_l)`` and ``e`` to ``(N, o)`` over the same leading dimensions, so ``h^T e`` sums over the
    ``N`` samples (tokens); with a mean-reduced loss ``e`` already carries the ``1/N``, making it the
    batch mean of the per-sample outer products ``h_i e_i^T``. Computed in ``B``'s dtype (float32)
    with autocast off, also when the step runs under autocast (``h``, ``e`` in bfloat16 are widened
    first, as the links widen ``e``). Returns a new tensor.
    """
    lead = lead_dims(e, h)
    H = flat_features(h.detach(), lead).to(B.dtype)
    E = flat_features(e.detach(), lead).to(B.dtype)
    with torch.autocast(B.device.type, enabled=False):
        return B - eta * (H.t() @ E + weight_decay * B)


@register
class DKP(DirectFeedback):
    """Direct Kolen-Pollack: DFA signals ``B_l e`` with ``B_l`` trained by a Kolen-Pollack rule.

    The forward weights learn exactly as under DFA: point ``l`` receives ``delta_l = B_l e``
    (``B_l``: ``(n_l, o)``, ``e = dL/dy``: ``(batch, o)``) and the head its true gradient. After the
    signals are delivered, every feedback matrix takes one step of the DKP rule (Webster et al. 2020,
    ``Delta B = -eta_B delta_k^T h`` in their notation, with the weight decay of Kolen-Pollack)::

        B_l <- B_l - eta (h_l^T e + weight_decay * B_l)

    with ``h_l``: ``(batch, n_l)`` the activity at the point (the output of block ``l``, flattened)
    and ``h_l^T e``: ``(n_l, o)`` summed over the batch (a batch mean under a mean-reduced loss, whose
    ``e`` carries the ``1/batch``). This is the transpose of the gradient that a direct forward
    connection ``D_l`` (``(o, n_l)``) from ``h_l`` to the output would receive (``dL/dD_l = e^T h_l``),
    so ``B_l`` follows the same update as that connection, as Kolen-Pollack's ``B`` follows ``W^T``;
    for the last hidden point it is exactly the transposed gradient of the head's weight. The
    update is a plain SGD step of its own (``eta``), independent of the user's optimizer.

    Needs feedback points (``bpfree.attach`` or a zoo model). Options: DFA's (``init``, ``scale``,
    ``seed``) plus ``eta`` and ``weight_decay``.
    """

    name = "dkp"
    summary = "direct Kolen-Pollack: DFA whose B_l learn by B_l -= eta (h_l^T e + wd B_l)"

    @dataclass
    class Options(DirectFeedback.Options):
        eta: float = option(1.0, "learning rate of the feedback matrices (plain SGD)")
        weight_decay: float = option(1e-3, "weight decay of the feedback matrices (Kolen-Pollack's decay)")

        def check(self) -> None:
            super().check()
            if self.eta < 0:
                raise OptionError(f"option 'eta' must be non-negative, got {self.eta}")
            if self.weight_decay < 0:
                raise OptionError(f"option 'weight_decay' must be non-negative, got {self.weight_decay}")

    keeps_points = True

    def after_delivery(self, record: CutPass) -> None:
        """One DKP step of every ``B_l`` from this step's ``h_l`` and ``e`` (calibration steps leave
        ``B_l`` as it is)."""
        o, e, feedback = self.options, record.delivery.error, self.state.feedback
        with torch.no_grad():
            for name, h in record.points.items():
                feedback[name] = dkp_update(feedback[name], h, e, o.eta, o.weight_decay)
