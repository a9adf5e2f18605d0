"""The training loop's data-parallel side: joining the group, reducing each step's gradients,
keeping the method's state in agreement (the scheme: :mod:`bpfree.distributed`).

One process alone (``Workers()``) makes every piece here a no-op, so the loop runs the same code
either way and never asks which method runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..distributed import OverlappedReduction, Workers, derived_seed
from .errors import as_training_error


class Parallel:
    """The data-parallel duties of one run on ``workers``, for its ``model`` and ``method``.

    ``overlap``: run option ``overlap_reduction``; with more than one process each step's
    gradients are then all-reduced bucket by bucket during the backward pass
    (:class:`~bpfree.distributed.OverlappedReduction`, installed by :meth:`overlapping`), else
    after it (:meth:`~bpfree.distributed.Workers.reduce_gradients`). The first step is always
    reduced after the backward pass, once the ranks have checked that their methods filled
    ``.grad`` of the same parameters.
    """

    def __init__(self, workers: Workers, model: torch.nn.Module, method: Any, device: torch.device,
                 overlap: bool = False) -> None:
        self.workers, self.model, self.method, self.device = workers, model, method, device
        self.stepper = method  # what the loop calls step() on
        self.overlap_wanted = bool(overlap)
        self.overlap: OverlappedReduction | None = None  # while installed (the run's fit)
        self.grads_checked = False
        self.state_warned = False

    def join(self, task: Any, r: Any) -> None:
        """Every rank gets a sample of the last batch and starts from rank 0's weights
        (``r``: the run options)."""
        W = self.workers
        with as_training_error():
            W.check_batch_size(r.batch_size)
        if not W.active:
            return
        n_batches = task.num_batches(r.batch_size)
        if n_batches:
            with as_training_error():
                W.check_last_batch(task.train_batch(r.seed, 0, n_batches - 1, r.batch_size)[0].shape[0])
        with torch.no_grad():  # identical start on every rank, whatever the initialisation did
            W.broadcast_tensors([t.detach() for t in list(self.model.parameters()) + list(self.model.buffers())])
        self.method.average_across_workers = W.average
        self.method.worker_rank = W.rank  # random probes (GrAPE's tangents): independent draws per rank
        torch.manual_seed(derived_seed(r.seed, W.rank))  # dropout etc.: independent draws per rank

    def trained_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def gather_model(self) -> None:
        """Nothing to gather: every rank holds the whole, identical model."""

    def checkpoint_parts(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        """``(model, optimizer, method)`` states for the checkpoint (identical on every rank)."""
        return self.model.state_dict(), optimizer.state_dict(), self.method.state_dict()

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def sync_method_state(self, expected: bool = False) -> None:
        """The method's state made rank 0's where it differs; warned of once unless ``expected`` (uneven batch)."""
        warn = not expected and not self.state_warned
        if self.workers.sync_state(self.method, self.device, warn=warn) and warn:
            self.state_warned = True

    @contextlib.contextmanager
    def local_method(self) -> Iterator[None]:
        """The method without its cross-rank averaging (diagnostics run on rank 0 alone)."""
        saved = self.method.average_across_workers
        self.method.average_across_workers = lambda t: t
        try:
            yield
        finally:
            self.method.average_across_workers = saved

    @contextlib.contextmanager
    def overlapping(self) -> Iterator[None]:
        """The overlapped reduction's hooks on the model for the block's duration (when asked for
        and there is more than one process)."""
        if not (self.overlap_wanted and self.workers.active):
            yield
            return
        self.overlap = OverlappedReduction(self.model)
        try:
            yield
        finally:
            self.overlap.close()

    @contextlib.contextmanager
    def reducing(self, weight: float, even: bool) -> Iterator[None]:
        """Around ``method.step`` on this rank's shard (its share ``weight`` of the batch; ``even``:
        all shards the same size): when the block ends, every ``.grad`` and floating buffer is
        ``sum_r w_r t_r``, and after an uneven batch the method's state is rank 0's."""
        W = self.workers
        if not W.active:
            yield
            return
        overlap = self.overlap if self.grads_checked else None
        if overlap is not None:
            overlap.begin(weight)
        try:
            yield
        except BaseException:
            if overlap is not None:
                overlap.abort()
            raise
        if overlap is not None:
            overlap.finish()
        else:
            if not self.grads_checked:
                with as_training_error():
                    W.check_same_grads(self.model.parameters(), self.method.name)
                self.grads_checked = True
            W.reduce_gradients(self.model, weight)
        if not even:
            self.sync_method_state(expected=True)


def parallel_for(workers: Workers, model: torch.nn.Module, method: Any, device: torch.device, r: Any) -> Any:
    """The run's parallel side: :class:`Parallel` (data parallel or one process), or with run option
    ``pipeline`` :class:`~bpfree.train.pipelined.Pipelined` (the same interface)."""
    if r.pipeline:
        from .pipelined import Pipelined

        return Pipelined(workers, model, method, device, r)
    return Parallel(workers, model, method, device, overlap=r.overlap_reduction)
