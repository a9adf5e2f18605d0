"""The interface every learning rule implements.

A :class:`Method` wraps a model. ``method.step(x, y, loss_fn)`` runs the forward pass, computes the
loss and fills each parameter's ``.grad`` the way ``loss.backward()`` would under backpropagation
(accumulating into existing gradients), so the caller's optimizer, scheduler, gradient clipping and
mixed precision keep working unchanged.

State, in the spirit of ``torch.optim``'s ``self.state``: whatever a method keeps from one step to
the next (feedback matrices, estimates, counters, its random generator) lives in one declared
mapping, ``method.state`` (a :class:`MethodState`), filled in ``__init__``. The base class saves it
(``state_dict``), restores it (``load_state_dict``, onto the model's device) and moves it
(:meth:`Method.to`); nothing of one step is kept anywhere else on the method.

Every subclass's ``step`` is wrapped once, when the class is defined, by
:func:`bpfree.methods.guards.guarded_step` (the batch is checked, loss errors name the shapes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .. import options as opts
from .guards import LossFn, guarded_step

__all__ = ["LossFn", "Method", "MethodGenerator", "MethodState", "StepResult", "rank_seed"]


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


class MethodGenerator:
    """A method's own random generator, seeded with the method's ``seed`` option.

    ``on(device)`` returns the generator, created on the device of first use (and afresh from the
    seed when the device changes: CPU and CUDA generator states do not convert). ``state_dict`` /
    ``load_state_dict`` carry its state through the method's state; a state set before first use
    is applied then, so a resumed run draws what an uninterrupted one would.

    A saved state that does not fit the device the run resumes on (a CPU state on CUDA or the
    reverse: the two kinds of state cannot be converted) cannot continue the same stream. The
    generator is then seeded with :func:`reseed_from` of the saved state, a seed derived from its
    bytes, so the resumed run draws a fresh stream that is the same every time it is resumed, and
    a ``RuntimeWarning`` says so.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None
        self._rank: torch.Generator | None = None  # for_rank's generator, reseeded at every call

    def on(self, device: torch.device | str) -> torch.Generator:
        g = self._generator
        if g is None or g.device != torch.device(device):
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            if self._pending is not None:
                try:
                    g.set_state(self._pending)
                except RuntimeError:
                    seed = reseed_from(self._pending)
                    warnings.warn(
                        f"the method's saved random-generator state ({self._pending.numel()} bytes) was made on "
                        f"another kind of device than {torch.device(device)} and cannot be converted; the "
                        f"generator is reseeded with {seed}, derived from that state (the run continues "
                        f"reproducibly, with other random draws than an uninterrupted run)", RuntimeWarning)
                    g.manual_seed(seed)
                self._pending = None
            self._generator = g
        return g

    def for_rank(self, device: torch.device | str, rank: int, step: int) -> torch.Generator:
        """A generator of ``rank``'s own draws at ``step``, on ``device``, apart from the shared stream.

        Seeded with :func:`rank_seed` ``(seed, rank, step)``: a pure function of those numbers, so
        it needs no state of its own (a resumed run draws what an uninterrupted one would) and
        leaves the shared stream of :meth:`on` untouched; different ranks draw independent numbers.
        """
        g = self._rank
        if g is None or g.device != torch.device(device):
            g = self._rank = torch.Generator(device=device)
        return g.manual_seed(rank_seed(self.seed, rank, step))

    def state_dict(self) -> torch.Tensor | None:
        """The current state, or the one waiting for first use; ``None`` if never used nor set."""
        return self._generator.get_state() if self._generator is not None else self._pending

    def load_state_dict(self, state: torch.Tensor | None) -> None:
        """Apply ``state`` at the next :meth:`on` (``None``: start again from the seed)."""
        self._generator, self._pending = None, None if state is None else state.cpu()



def rank_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed of ``rank``'s draws at ``step``: ``blake2b("bpfree-rank:seed:rank:step")``'s first 8 bytes."""
    digest = hashlib.blake2b(f"bpfree-rank:{int(seed)}:{int(rank)}:{int(step)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def reseed_from(state: torch.Tensor) -> int:
    """A 63-bit seed derived from a generator state's bytes: ``sha256(bytes)``'s first 8 bytes."""
    digest = hashlib.sha256(bytes(state.cpu().to(torch.uint8).tolist())).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


class MethodState(dict):
    """The declared state of a method: a ``dict`` whose entries also read as attributes.

    Values are tensors, numbers, ``None``, dicts of those, or objects with ``state_dict`` /
    ``load_state_dict`` (a :class:`MethodGenerator`, a running average). The set of names is fixed
    when the method is built; ``state.feedback`` is ``state["feedback"]``.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in self:
            raise AttributeError(f"{name!r} is not a declared state entry (declared: {sorted(self)})")
        self[name] = value


def _saved(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _saved(v) for k, v in value.items()}
    if hasattr(value, "state_dict"):
        return _saved(value.state_dict())
    return value


def _moved(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor copied (moved) to ``device``; dicts rebuilt, the rest as is."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device, copy=True)
    if isinstance(value, dict):
        return {k: _moved(v, device) for k, v in value.items()}
    return value


class Method:
    """Base class of learning rules.

    Subclasses set ``name``, a one-line ``summary``, an ``Options`` dataclass (fields made with
    :func:`bpfree.options.option`), declare their lasting state in ``self.state`` in ``__init__``,
    and implement :meth:`step`.

    Diagnostics (:mod:`bpfree.metrics.alignment`) ask every method the same three questions:
    :meth:`probe_signals`, :meth:`feedback_matrices` and :meth:`jacobian_estimates`; a method
    without feedback points answers with empty mappings.
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
            cls.step = guarded_step(step)

    @dataclass
    class Options:
        pass

    def __init__(self, model: nn.Module, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"method {self.name!r} needs an nn.Module, got {type(model).__name__}")
        self.model = model
        self.options = opts.build(self.Options, options, what=f"method {self.name!r}")
        #: Everything the method keeps across steps (see the module docstring).
        self.state = MethodState()
        #: Averages a tensor over data-parallel workers (identity on one process). Methods that
        #: keep batch statistics of their own (GrAPE's Jacobian estimates) pass them through it so
        #: their state stays identical on every worker; the training loop sets it under
        #: torch.distributed.
        self.average_across_workers = lambda t: t
        #: This process's rank when the training loop runs data parallel (``None``: one process).
        #: Random probes drawn per step (GrAPE's tangents) then come from the rank's own stream
        #: (:meth:`tangent_generator`), so the estimates the ranks pool are independent draws.
        self.worker_rank: int | None = None

    def tangent_generator(self, device: torch.device | str) -> torch.Generator:
        """The generator of this step's random tangents (probes whose estimates ranks average).

        One process: the method's own ``state.generator`` (``on(device)``), whose stream continues
        across steps. Data parallel (``worker_rank`` set): ``state.generator.for_rank(device, rank,
        state.steps)``, the rank's own draws for this step, so every rank perturbs with different
        tangents and the pooled estimate is an average of independent ones; ``state.generator``
        itself (the feedback matrices' initialisation, GrAPE's noise) then draws the same on every
        rank, which keeps ``B_l`` identical everywhere.
        """
        generator = self.state["generator"]
        if self.worker_rank is None:
            return generator.on(device)
        return generator.for_rank(device, self.worker_rank, self.state.get("steps", 0))

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

    # -- diagnostics protocol ------------------------------------------------------------------
    def probe_signals(self, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn) -> dict[str, torch.Tensor]:
        """The signal this method sends to each feedback point for ``(x, y)``, by point name.

        Fills ``.grad`` as a step would and leaves the method's state as it was (run it inside
        :func:`bpfree.metrics.alignment.sandbox`). This default runs one step and restores the
        state; it has no per-point signals.
        """
        saved = self.state_dict()
        self.step(x, y, loss_fn)
        self.load_state_dict(saved)
        return {}

    def feedback_matrices(self) -> dict[str, torch.Tensor]:
        """``B_l`` (``(n_l, o)``) per feedback point, for methods that project an error."""
        return {}

    def jacobian_estimates(self) -> dict[str, torch.Tensor]:
        """A running estimate ``Jbar_l`` (``(o, n_l)``) per point, for methods that keep one."""
        return {}

    # -- state ---------------------------------------------------------------------------------
    def check_state(self, state: dict[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` (as saved) does not fit this method's model."""

    def state_dict(self) -> dict[str, Any]:
        """A copy of ``self.state``: tensors cloned, stateful objects as their ``state_dict()``."""
        return {k: _saved(v) for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, tensors onto the model's device.

        Entries the checkpoint lacks keep their initial values; entries this method does not
        declare are an error.
        """
        unknown = set(state) - set(self.state)
        if unknown:
            what = f"keeps {sorted(self.state)}" if self.state else "has no state"
            raise ValueError(f"method {self.name!r} {what}, but the checkpoint holds {sorted(unknown)}")
        self.check_state(state)
        device = self._device()
        for key, saved in state.items():
            current = self.state[key]
            if hasattr(current, "load_state_dict"):
                current.load_state_dict(saved if isinstance(current, MethodGenerator) else _moved(saved, device))
            else:
                self.state[key] = _moved(saved, device)

    def to(self, device: torch.device | str) -> "Method":
        """Move every tensor of ``self.state`` to ``device`` (the model is moved by its owner)."""
        device = torch.device(device)
        for key, value in self.state.items():
            if hasattr(value, "load_state_dict"):
                if not isinstance(value, MethodGenerator):
                    value.load_state_dict(_moved(value.state_dict(), device))
            else:
                self.state[key] = _moved(value, device)
        return self

    def _device(self) -> torch.device:
        param = next(iter(self.model.parameters()), None)
        return param.device if param is not None else torch.device("cpu")

    def __repr__(self) -> str:
        fields = ", ".join(f"{f.name}={getattr(self.options, f.name)!r}" for f in dataclasses.fields(self.options))
        return f"{type(self).__name__}({fields})"
