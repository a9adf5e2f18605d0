"""GrAPE: Direct Feedback Alignment with feedback matrices aligned to forward-mode Jacobian estimates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..feedback.estimators import (
    RunningJacobian,
    block_parameters,
    central_difference_jacobians,
    first_point_child,
    flat_only,
    onesided_difference_jacobians,
    outer_mean,
    per_sample_forward,
    sample_jacobians,
    spatial_tangents,
    weight_perturbation_jacobians,
)
from ..feedback.matrices import low_rank_per_output
from ..feedback.rules import RENORMS, RULES, update_feedback
from ..options import OptionError, option
from . import register
from .dfa import CutPass, DirectFeedback, Estimator, TangentProbe


#: Named sets of defaults: ``published`` (the defaults of the options below) and ``grape2025``, every
#: default of the original (ICLR 2025 submission) GrAPE as this project first implemented it.
#: Options given explicitly win over the preset's.
PRESETS: dict[str, dict[str, Any]] = {
    "published": {},
    "grape2025": dict(rule="rescale", eta=1e-3, noise=None, renorm="auto", samples=64, average="cumulative",
                      every=4),
}


@register
class GrAPE(DirectFeedback):
    """Gradient-Aligned Projected Error: DFA whose ``B_l`` follow the network's Jacobians.

    Each step (every ``every`` steps), before the DFA weight update:

    1. estimate ``J~_l = mean_i u_i d_{l,i}^T`` (``(o, n_l)``) for every point from one pass over
       the first ``samples`` inputs of the batch, tangents ``d_l ~ N(0, I)`` injected at the points,
       ``u = sum_l J_l d_l`` by forward-mode AD or a finite difference (``tangents``)
       (activity perturbation; ``points="each"`` perturbs one point per pass);
    2. ``Jbar_l`` <- running average of the estimates (``average``: cumulative or ema);
    3. ``B_l`` <- ``rule(B_l, G_l, eta)``, then noise and renormalisation
       (:mod:`bpfree.feedback.rules`), with ``G_l = Jbar_l^T``; with ``rank = r > 0``, at image
       points ``G_l`` is the rank-``r`` truncated SVD of each output's ``(C, H*W)`` map of
       ``Jbar_l`` (:func:`bpfree.feedback.matrices.low_rank_per_output`);
    4. deliver the DFA signal ``B_l e`` as :class:`DFA` does.

    In the step's pipeline (:mod:`bpfree.methods.dfa`) that is :meth:`estimator_for_step` (the
    options resolved once into one estimator), the cut forward pass, :meth:`before_delivery`
    (estimate, then :meth:`align`) and the delivery. The training forward pass stays pure DFA
    (graph cut at every point); the default estimate runs on its own, without autograd, on a
    sub-batch, and leaves buffers (BatchNorm statistics) untouched.
    """

    name = "grape"
    supports_loss_scaling = True
    summary = "DFA with B_l aligned to forward-gradient Jacobian estimates (GrAPE)"

    @dataclass
    class Options(DirectFeedback.Options):
        rule: str = option("cosine", "feedback update rule (cosine: the published GrAPE's; rescale: the original's)",
                           choices=("cosine",) + tuple(r for r in RULES if r != "cosine"))
        eta: float = option(0.5, "feedback learning rate eta_B (for cosine: roughly the angle each row turns per update, "
                                 "in radians times sin of its angle to the estimate; rows have norm ~1)")
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
        spatial_modes: int = option(0, "activity tangents at image points (batch, C, H, W) drawn in the span of the "
                                    "modes x modes lowest spatial frequencies (DCT) per channel: the estimate targets the "
                                    "low-frequency part of Jbar with far fewer noisy dimensions (0: all frequencies)")
        align: str = option("all", "which points' B_l follow the estimate: all, or flat (points of shape (batch, n) or "
                            "(batch, T, d); image points (batch, C, H, W) keep their random B_l, as in DFA, and "
                            "are not perturbed)",
                            choices=("all", "flat"))
        rank: int = option(0, "at image points (batch, C, H, W): B_l follows the best rank-`rank` approximation of "
                           "each output's map Jbar_l[k] taken as a (C, H*W) matrix (truncated SVD of the running "
                           "estimate; far fewer numbers to estimate, most of the noise dropped); 0: the dense estimate")
        preset: str = option("published", "a named set of defaults for the options not given: published (these defaults) "
                             "or grape2025 (the original rule=rescale, eta=1e-3, cumulative average, 64 samples every 4 steps)",
                             choices=tuple(PRESETS))

        @staticmethod
        def preset_defaults(values: dict[str, Any]) -> dict[str, Any]:
            """The preset's option values (an unknown name is left to the ``preset`` check)."""
            return dict(PRESETS.get(values.get("preset", "published"), {}))

        def check(self) -> None:
            super().check()
            if self.spatial_modes < 0:
                raise OptionError(f"option 'spatial_modes' must be non-negative, got {self.spatial_modes}")
            if self.spatial_modes and self.perturb != "activity":
                raise OptionError("option 'spatial_modes' shapes activity tangents; use it with perturb=activity")
            if self.rank < 0:
                raise OptionError(f"option 'rank' must be non-negative, got {self.rank}")
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
        super().__init__(model, **options)  # a preset's defaults are filled in by bpfree.options.build
        self.state.update(
            jacobian=RunningJacobian(self.options.average, self.options.beta),  # Jbar_l per point, (o, n_l)
            norm0={},  # |B_l|_F at the first update, the target of renormalisation
        )
        self._blocks: dict[str, list[str]] | None = None  # weight perturbation: each block's parameters

    @property
    def period(self) -> int:
        return self.options.every

    def update_due(self) -> bool:
        """Whether this step (``state.steps``, counted from 1) updates the estimate and ``B``."""
        return (self.state.steps - 1) % self.options.every == 0

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

    def estimator_for_step(self, device: torch.device) -> Estimator | None:
        """The step's :meth:`estimator` on update steps (every ``every``-th), else ``None``."""
        return self.estimator(device) if self.update_due() else None

    def estimator(self, device: torch.device) -> Estimator:
        """The estimator of ``J~_l`` (``(o, n_l)``) the options ask for, resolved once per update step.

        ``subbatch``: a pass of its own over the first ``samples`` inputs (forward-mode AD, a central
        difference, or a one-sided difference against the training pass's rows of ``error_at``);
        ``train-pass``: tangents ride along the training forward pass over the whole batch;
        ``perturb=weight``: one forward-mode pass per block with tangents on its weights.
        """
        o, model, names, k, markers = self.options, self.model, self.names, self.options.samples, self.markers
        g = self.tangent_generator(device)  # per rank under data parallelism (B_l's own draws stay shared)
        if o.perturb == "weight":
            def weight(x: torch.Tensor, record: CutPass) -> dict[str, torch.Tensor]:
                if self._blocks is None:
                    self._blocks = block_parameters(model, x[:k], names)
                return weight_perturbation_jacobians(model, x[:k], names, self._blocks, g)
            return Estimator(weight)
        tangent = self.tangent_draw()
        if o.estimator == "train-pass":
            def draw(h: torch.Tensor) -> torch.Tensor:
                return tangent(tuple(h.shape), g, h.device, h.dtype)

            def carried(x: torch.Tensor, record: CutPass) -> dict[str, torch.Tensor]:
                u = record.output_tangent
                return {} if u is None else {name: outer_mean(u, d) for name, d in record.tangents.items()}
            return Estimator(carried, draw)
        scheme = self.tangent_scheme(device)
        if scheme in ("central", "onesided"):
            if scheme == "onesided" and torch.is_autocast_enabled(device.type):
                raise RuntimeError("tangents=onesided compares float32 outputs; under autocast (amp) use "
                                   "tangents=central or forward")
            # the pass may start at the first point from the training pass's own h_1 rows when each
            # sample's forward is its own (what onesided presumes) and both passes run in float32
            per_sample = scheme == "onesided" or per_sample_forward(model)
            start = first_point_child(model) if per_sample and not torch.is_autocast_enabled(device.type) else None

            def difference(x: torch.Tensor, record: CutPass) -> dict[str, torch.Tensor]:
                resume = None if start is None else (start, record.first_point[:k])
                if scheme == "central":
                    return central_difference_jacobians(model, x[:k], names, g, o.fd_step, markers, tangent, resume)
                return onesided_difference_jacobians(model, x[:k], names, g, record.error_at[:k].detach(), o.fd_step,
                                                     markers, tangent, resume)
            return Estimator(difference, from_first_point=start is not None)
        if o.points == "joint":
            return Estimator(lambda x, record: sample_jacobians(model, x[:k], names, g, points=markers, draw=tangent))
        def each(x: torch.Tensor, record: CutPass) -> dict[str, torch.Tensor]:
            out = {}
            for name, _ in self.points:
                out.update(sample_jacobians(model, x[:k], names, g, only=name, points=markers, draw=tangent))
            return out
        return Estimator(each)

    def tangent_draw(self):
        """The activity tangents: ``spatial_modes`` frequencies at image points, or none there with
        ``align=flat`` (their ``B_l`` stay fixed, so they are not perturbed and add no noise to the
        flat points' estimates)."""
        draw = spatial_tangents(self.options.spatial_modes)
        return flat_only(draw) if self.options.align == "flat" else draw

    def check_pipelined(self) -> None:
        """A pipeline stage sees only its own blocks, so the estimate is one a pipeline can carry from
        stage to stage on the sub-batch: forward mode (``h`` and its tangent) or the central
        difference (``[h + step d; h - step d]``); ``tangents=auto`` means central there (the
        one-sided difference needs the training pass's output rows before the update)."""
        super().check_pipelined()
        o = self.options
        if o.perturb != "activity" or o.points != "joint" or o.estimator != "subbatch" or \
                o.tangents not in ("auto", "forward", "central"):
            raise OptionError("a pipelined GrAPE estimates J~_l on the sub-batch with tangents carried through the "
                              "stages: use perturb=activity, points=joint, estimator=subbatch and tangents=central, "
                              "forward or auto (central)")

    def pipeline_probe(self, device: torch.device) -> TangentProbe | None:
        """On update steps: the tangent stream, draw and scheme of the sub-batch estimate."""
        if not self.update_due():
            return None
        o = self.options
        return TangentProbe(self.tangent_generator(device), self.tangent_draw(), o.samples,
                            "forward" if o.tangents == "forward" else "central", o.fd_step)

    def before_delivery(self, record: CutPass, x: torch.Tensor) -> None:
        """On update steps: ``J~_l`` from the step's estimator, then :meth:`align`."""
        if record.estimator is not None:
            estimates = record.estimator.estimate(x, record)
            record.first_point = None  # used: let it go with its block's backward, as without the estimate
            if self.options.align == "flat":
                estimates = {k: v for k, v in estimates.items() if len(record.shapes[k]) < 4}
            self.align(estimates, record.shapes)

    def align(self, estimates: dict[str, torch.Tensor], shapes: dict[str, torch.Size] | None = None) -> None:
        """Fold ``estimates`` (averaged over data-parallel workers) into ``Jbar``; move every ``B_l``
        toward its target (``shapes``: ``h_l.shape`` per point, which tells image points for ``rank``)."""
        jacobian, feedback, norm0 = self.state.jacobian, self.state.feedback, self.state.norm0
        jacobian.update({k: self.average_across_workers(v) for k, v in estimates.items()})
        o = self.options
        renorm = None if o.renorm == "auto" else o.renorm
        for name in estimates:
            B = feedback[name]  # (n_l, o), stored in the memory layout of Jbar_l^T (o rows of n_l)
            if name not in norm0:
                norm0[name] = float(B.norm())
            G = jacobian.mean[name].t()  # (n_l, o), a view
            shape = (shapes or {}).get(name)
            if o.rank and shape is not None and len(shape) == 4:
                G = low_rank_per_output(jacobian.mean[name], shape[1], o.rank).t()
            new = update_feedback(B, G, rule=o.rule, eta=o.eta, norm0=norm0[name], noise=o.noise, renorm=renorm,
                                  generator=self.state["generator"].on(B.device))
            # in place, and without a version bump: this step's link z_l = h_l B_l reads B_l when the
            # delivery runs, so the signals use the updated B_l (B_l is a constant to autograd)
            B.data.copy_(new)

    def jacobian_estimates(self) -> dict[str, torch.Tensor]:
        return self.state.jacobian.mean
