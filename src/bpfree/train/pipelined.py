"""The training loop's pipeline-parallel side (run option ``pipeline``; the schedule: :mod:`bpfree.pipeline`).

``pipeline = S`` runs ``S`` processes, rank ``s`` training stage ``s`` of the model. The loop runs
unchanged: :class:`Pipelined` has :class:`~bpfree.train.parallel.Parallel`'s interface, and its
``workers`` are :class:`~bpfree.distributed.StageWorkers` (every stage takes the whole batch;
the step's figures, broadcast by the last stage, are the same on every rank, so nothing is summed).

* **Set-up.** Every rank builds the whole model, method and task from the same configuration and
  seed; :func:`~bpfree.pipeline.make_pipeline` splits the model (rank 0's measurement) and makes
  every ``B_l``; the optimizer holds this stage's parameters only.
* **Evaluation and checkpoints.** Before an evaluation (rank 0) and a checkpoint every stage's
  weights are gathered into every rank's copy of the whole model, so rank 0 evaluates the current
  model and writes one checkpoint in the single-process format: the whole model's ``state_dict``,
  the method's state with each point's ``B_l`` from the stage that owns it, and the optimizer's
  state keyed by parameter *name* (``{"by_name": ..., "param_groups": ...}``), which each stage
  takes its own parameters' from on resume, whatever the split then (the split follows measured
  times, and a pipeline's results do not depend on it).
* **Refused**: ``amp`` (the stages exchange float32 tensors), ``diagnostics_every`` (they probe the
  whole model on one process), a process count other than ``pipeline``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..distributed import StageWorkers, Workers
from ..pipeline import PipelineError, make_pipeline
from .errors import TrainingError


class Pipelined:
    """The pipeline duties of one run: rank ``workers.rank`` trains its stage of ``model``."""

    def __init__(self, workers: Workers, model: torch.nn.Module, method: Any, device: torch.device, r: Any) -> None:
        if workers.world != r.pipeline:
            raise TrainingError(f"pipeline = {r.pipeline} stages needs {r.pipeline} processes, this run has "
                                f"{workers.world}: use bpfree train --pipeline {r.pipeline} (it starts them)")
        if r.amp != "none":
            raise TrainingError("amp is not available with --pipeline (the stages exchange float32 tensors)")
        if r.diagnostics_every:
            raise TrainingError("diagnostics_every is not available with --pipeline (the diagnostics probe the "
                                "whole model in one process)")
        self.workers = StageWorkers(workers.rank, workers.world, workers.local_rank)
        self.model, self.method, self.device = model, method, device
        self.pipeline: Any = None
        self.stepper: Any = None

    def join(self, task: Any, r: Any) -> None:
        """Split the model (on the first batch's first micro-batch) and make this rank's stage."""
        x = task.train_batch(r.seed, 0, 0, r.batch_size)[0]
        try:
            self.pipeline = make_pipeline(self.method, self.model, r.pipeline, self.workers.rank, r.microbatches,
                                          x, self.device, r.pipeline_schedule)
        except (PipelineError, ValueError) as err:
            raise TrainingError(str(err)) from err
        self.stepper = self.pipeline

    def trained_parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.pipeline.module.parameters()

    # -- the loop's hooks: nothing to reduce or keep in agreement -----------------------------
    def sync_method_state(self, expected: bool = False) -> None:
        pass

    @contextlib.contextmanager
    def local_method(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def overlapping(self) -> Iterator[None]:
        yield

    @contextlib.contextmanager
    def reducing(self, weight: float, even: bool) -> Iterator[None]:
        yield

    # -- evaluation and checkpoints -------------------------------------------------------------
    def gather_model(self) -> None:
        """Every stage's weights and buffers into every rank's whole model (a collective)."""
        merged: dict[str, torch.Tensor] = {}
        for part in self.workers.gather(self.pipeline.module.state_dict()):
            merged.update(part)
        self.model.load_state_dict({k: v.to(self.device) for k, v in merged.items()})

    def checkpoint_parts(self, optimizer: torch.optim.Optimizer) -> tuple[dict, dict, dict]:
        """``(model, optimizer, method)`` states of the whole pipeline (collectives; every rank)."""
        self.gather_model()
        names = [n for n, _ in self.pipeline.module.named_parameters()]
        own = optimizer.state_dict()
        by_name = {names[i]: s for i, s in own["state"].items()}
        merged: dict[str, Any] = {}
        for part in self.workers.gather(by_name):
            merged.update(part)
        groups = [{k: v for k, v in g.items() if k != "params"} for g in own["param_groups"]]
        owner = self.pipeline.split.owner()
        states = self.workers.gather(self.method.state_dict())
        method = dict(states[0])
        if "feedback" in method:  # each point's B_l as its own stage keeps it (DKP moves it locally)
            method["feedback"] = {name: states[owner[name]]["feedback"][name] for name in method["feedback"]}
        return self.model.state_dict(), {"by_name": merged, "param_groups": groups}, method

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """This stage's parameters' optimizer state from a checkpoint's name-keyed one."""
        if "by_name" not in state:
            raise ValueError("the checkpoint's optimizer state was not written by a pipeline run")
        names = [n for n, _ in self.pipeline.module.named_parameters()]
        own = optimizer.state_dict()
        groups = [{**saved, "params": g["params"]} for saved, g in zip(state["param_groups"], own["param_groups"])]
        optimizer.load_state_dict({"state": {i: state["by_name"][n] for i, n in enumerate(names)
                                             if n in state["by_name"]}, "param_groups": groups})
