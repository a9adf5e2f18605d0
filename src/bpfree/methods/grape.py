"""GrAPE: Direct Feedback Alignment with feedback matrices aligned to forward-mode Jacobian estimates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import torch.autograd.forward_ad as fwAD

from ..feedback.estimators import (
    RunningJacobian,
    block_parameters,
    central_difference_jacobians,
    onesided_difference_jacobians,
    outer_mean,
    per_sample_forward,
    sample_jacobians,
    weight_perturbation_jacobians,
)
from ..feedback.matrices import frobenius_cos
from ..points import FeedbackPoint, Head, handled
from ..feedback.rules import RENORMS, RULES, update_feedback
from ..options import OptionError, option
from . import register
from .base import forward_checked
from .dfa import DirectFeedback


@register
class GrAPE(DirectFeedback):
    """Gradient-Aligned Projected Error: DFA whose ``B_l`` follow the network's Jacobians.

    Each step (every ``every`` steps), before the DFA weight update:

    1. estimate ``J~_l = mean_i u_i d_{l,i}^T`` (``(o, n_l)``) for every point from one pass over
       the first ``samples`` inputs of the batch, tangents ``d_l ~ N(0, I)`` injected at the points,
       ``u = sum_l J_l d_l`` by forward-mode AD or a finite difference (``tangents``)
       (activity perturbation; ``points="each"`` perturbs one point per pass);
    2. ``Jbar_l`` <- running average of the estimates (``average``: cumulative or ema);
    3. ``B_l`` <- ``rule(B_l, Jbar_l^T, eta)``, then noise and renormalisation
       (:mod:`bpfree.feedback.rules`);
    4. deliver the DFA signal ``B_l e`` as :class:`DFA` does.

    The training forward pass stays pure DFA (graph cut at every point); the estimate runs on its
    own, without autograd, on a sub-batch, and leaves buffers (BatchNorm statistics) untouched.
    """

    name = "grape"
    supports_loss_scaling = True
    summary = "DFA with B_l aligned to forward-gradient Jacobian estimates (GrAPE)"

    @dataclass
    class Options(DirectFeedback.Options):
        rule: str = option("rescale", "feedback update rule", choices=tuple(RULES))
        eta: float = option(1e-3, "feedback learning rate eta_B")
        noise: float | None = option(None, "Gaussian noise added to B per update, relative to rms(B_0); default: the rule's (rescale 1e-3, others 0)")
        renorm: str = option("auto", "renormalisation after the update; auto: the rule's (rescale/alt1/alt2 frobenius, cosine rows, regress none)", choices=("auto",) + RENORMS)
        samples: int = option(64, "inputs per estimate that carry tangents (the sub-batch: the first samples of the batch, all of a smaller batch)")
        average: str = option("cumulative", "moving average of the Jacobian estimate", choices=("cumulative", "ema"))
        beta: float = option(0.99, "decay of the exponential moving average (average=ema)")
        every: int = option(4, "update the estimate and B every this many steps (the estimate pass and the update "
                                  "have fixed costs, so 64 samples every 4 steps cost less than 32 every 2 or 16 every step)")
        points: str = option("joint", "perturb all points in one forward-mode pass, or each point in its own pass", choices=("joint", "each"))
        estimator: str = option("subbatch", "subbatch: a separate pass over `samples` inputs; train-pass: tangents ride along the training forward pass over the whole batch", choices=("subbatch", "train-pass"))
        tangents: str = option("auto", "how the sub-batch estimate gets u = sum_l J_l d_l: forward-mode AD; "
                               "central: a difference of one fused pass over [x + step d; x - step d]; "
                               "onesided: one pass over x + step d against the training pass's own output "
                               "(needs a per-sample, deterministic forward: no BatchNorm batch statistics, no dropout); "
                               "auto: onesided where valid, else central, and forward under autocast or "
                               "where differences do not apply (train-pass, weight perturbation, points=each)",
                               choices=("auto", "forward", "central", "onesided"))
        fd_step: float = option(1e-2, "perturbation size of the difference schemes (tangents=central/onesided)")
        perturb: str = option("activity", "perturb activities at the points, or the weights of each block (one pass per block)", choices=("activity", "weight"))

        def check(self) -> None:
            super().check()
            if self.samples < 1:
                raise OptionError(f"option 'samples' must be at least 1, got {self.samples}")
            if self.every < 1:
                raise OptionError(f"option 'every' must be at least 1, got {self.every}")
            if not 0.0 <= self.beta < 1.0:
                raise OptionError(f"option 'beta' must lie in [0, 1), got {self.beta}")
            if self.eta < 0:
                raise OptionError(f"option 'eta' must be non-negative, got {self.eta}")
            if self.tangents in ("central", "onesided") and (
                    self.estimator != "subbatch" or self.perturb != "activity" or self.points != "joint"):
                raise OptionError(f"tangents={self.tangents} works with estimator=subbatch, perturb=activity, "
                                  "points=joint")
            if not self.fd_step > 0:
                raise OptionError(f"option 'fd_step' must be positive, got {self.fd_step}")
            if self.estimator == "train-pass" and (self.perturb != "activity" or self.points != "joint"):
                raise OptionError("estimator=train-pass perturbs activities at all points jointly; "
                                  "use it with perturb=activity and points=joint")

    def __init__(self, model: nn.Module, **options: Any) -> None:
        super().__init__(model, **options)
        self.jacobian = RunningJacobian(self.options.average, self.options.beta)
        self.norm0: dict[str, float] = {}
        self._pending: dict[str, torch.Tensor] | None = None
        self._blocks: dict[str, list[str]] | None = None
        self._reference: torch.Tensor | None = None
        self._scheme: str | None = None  # tangent_scheme() of the current update step

    def tangent_scheme(self, device: torch.device) -> str:
        """The scheme ``tangents`` stands for now: ``auto`` resolved (see the option's text)."""
        o = self.options
        if o.tangents != "auto":
            return o.tangents
        if o.estimator != "subbatch" or o.perturb != "activity" or o.points != "joint":
            return "forward"
        if torch.is_autocast_enabled(device.type):
            return "forward"  # differences of reduced-precision outputs would be noise
        return "onesided" if per_sample_forward(self.model) else "central"

    @property
    def period(self) -> int:
        return self.options.every

    def update_due(self) -> bool:
        """Whether this step (``self.steps``, counted from 1) updates the estimate and ``B``."""
        return (self.steps - 1) % self.options.every == 0

    def estimate(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Fresh estimates ``J~_l`` (``(o, n_l)``) from the first ``samples`` inputs of ``x``."""
        xs = x[: self.options.samples]
        g = self.generator.on(xs.device)
        if self.options.perturb == "weight":
            if self._blocks is None:
                self._blocks = block_parameters(self.model, xs, self.names)
            return weight_perturbation_jacobians(self.model, xs, self.names, self._blocks, g)
        scheme, self._scheme = self._scheme or self.tangent_scheme(xs.device), None
        if scheme == "central":
            return central_difference_jacobians(self.model, xs, self.names, g, self.options.fd_step)
        if scheme == "onesided":
            if self._reference is None:
                raise RuntimeError("tangents=onesided needs the training pass's output for the sub-batch, and "
                                   "there is none: call estimate() from step(), outside autocast")
            reference, self._reference = self._reference, None
            return onesided_difference_jacobians(self.model, xs, self.names, g, reference, self.options.fd_step)
        if self.options.points == "joint":
            return sample_jacobians(self.model, xs, self.names, g)
        out: dict[str, torch.Tensor] = {}
        for name, _ in self.points:
            out.update(sample_jacobians(self.model, xs, self.names, g, only=name))
        return out

    def align(self, estimates: dict[str, torch.Tensor]) -> None:
        """Fold ``estimates`` (averaged over data-parallel workers) into ``Jbar``; move every ``B_l``."""
        self.jacobian.update({k: self.average_across_workers(v) for k, v in estimates.items()})
        o = self.options
        renorm = None if o.renorm == "auto" else o.renorm
        for name in estimates:
            B = self.feedback[name]
            if not B.t().is_contiguous():
                # B_l (n_l, o) is stored in the memory layout of Jbar_l^T (o rows of n_l), so the
                # rules' elementwise ops and row sums see two tensors of one layout, with no copy
                B = self.feedback[name] = B.t().contiguous().t()
            if name not in self.norm0:
                self.norm0[name] = float(B.norm())
            norm0 = self.norm0[name]
            G = self.jacobian.mean[name].t()  # (n_l, o), a view
            B.copy_(update_feedback(  # in place: B_l keeps its storage from step to step
                B, G, rule=o.rule, eta=o.eta, norm0=norm0, noise=o.noise, renorm=renorm,
                generator=self.generator.on(B.device),
            ))

    def forward_cut(self, x: torch.Tensor):
        """DFA's cut forward pass; with ``estimator="train-pass"`` it also carries tangents.

        On an update step under ``tangents=onesided`` it keeps the output (or the Head's input) of
        the first ``samples`` rows, detached, as the reference :meth:`estimate` differences against.
        Train-pass: inside one ``dual_level`` every point hands the next block its ``h_l`` detached
        with tangent ``(incoming tangent) + d_l``, ``d_l ~ N(0, I)``; the primal keeps its autograd
        graph for the DFA backward, and the output tangent ``u`` gives ``J~_l = mean_i u_i d_{l,i}^T``
        over the whole batch, kept for :meth:`before_delivery`.
        """
        self._pending = None
        self._reference = None
        self._scheme = self.tangent_scheme(x.device) if self.update_due() else None
        if self.options.estimator != "train-pass" or not self.update_due():
            out, records = super().forward_cut(x)
            if self._scheme == "onesided":
                if torch.is_autocast_enabled(x.device.type):
                    raise RuntimeError("tangents=onesided compares float32 outputs; under autocast (amp) use "
                                       "tangents=central or forward")
                at = self._head_input[0] if self._head_input is not None else out
                self._reference = at[: self.options.samples].detach()
            return out, records
        g = self.generator.on(x.device)
        records: list[tuple[str, torch.Tensor]] = []
        tangents: dict[str, torch.Tensor] = {}
        at_head: list[torch.Tensor | None] = []
        self._head_input = None

        def cut(point: FeedbackPoint, h: torch.Tensor) -> torch.Tensor:
            primal, tangent = fwAD.unpack_dual(h)
            if isinstance(point, Head):
                at_head.append(tangent)
                self._head_input = (primal, primal.detach().requires_grad_())
                return self._head_input[1]
            name = self.names[id(point)]
            records.append((name, primal))
            d = torch.randn(primal.shape, generator=g, device=primal.device, dtype=primal.dtype)
            tangents[name] = d
            return fwAD.make_dual(primal.detach(), d if tangent is None else tangent.detach() + d)

        with fwAD.dual_level(), handled(self.model, cut):
            out, u = fwAD.unpack_dual(forward_checked(self.model, x))
            if at_head:
                u = at_head[0]
        if u is not None:
            u = u.detach()
            self._pending = {name: outer_mean(u, d) for name, d in tangents.items()}
        return out, records

    def before_delivery(self, x, y, e, records) -> None:
        if self._pending is not None:
            self.align(self._pending)
            self._pending = None
        elif self.options.estimator == "subbatch" and self.update_due():
            self.align(self.estimate(x))

    def alignment(self) -> dict[str, torch.Tensor]:
        """Frobenius cosine of each ``B_l`` with the running estimate ``Jbar_l^T``."""
        return {
            name: frobenius_cos(B, self.jacobian.mean[name].t())
            for name, B in self.feedback.items()
            if name in self.jacobian.mean
        }

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(jacobian=self.jacobian.state_dict(), norm0=dict(self.norm0))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.jacobian.load_state_dict(state["jacobian"])
        self.norm0 = dict(state["norm0"])
