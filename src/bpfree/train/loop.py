"""The one training loop, for every method and every task.

It builds the task, model, method and optimizer from a :class:`RunConfig`, and for each batch
calls ``method.step(x, y, task.loss_fn)`` and then ``optimizer.step()``. It knows nothing of any
particular method or dataset.

* The run directory (:mod:`~bpfree.train.rundir`): checked before training (writable, room for a
  checkpoint, no run there already unless ``overwrite=True``), every file written atomically.
* Resume: ``Run.fit(resume=True)`` continues from ``checkpoint.pt`` and ends with the same weights
  as an uninterrupted run, however the run stopped (``SIGKILL`` included): batches are a pure
  function of (seed, epoch, index); the RNG states, optimizer, method and loss-scaler states and
  the epoch's running sums are checkpointed; ``metrics.jsonl`` is cut back to what it had seen.
* A non-finite loss stops the run naming the step (:mod:`~bpfree.train.watch`): the checkpoint
  left behind is always the last good one; a checkpoint that cannot be written (disk full)
  stops the run and leaves the previous one intact.
* Data parallel (:mod:`bpfree.distributed`, :mod:`~bpfree.train.parallel`): every rank trains on
  its shard of each global batch; ``.grad`` is averaged over the ranks before ``optimizer.step()``
  (during the backward pass with ``overlap_reduction``); rank 0 writes the run directory.
  Pipeline parallel: run option ``pipeline`` (:mod:`~bpfree.train.pipelined`), the same loop.
  Mixed precision: run option ``amp`` (:mod:`~bpfree.train.precision`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import methods, models, tasks
from ..distributed import Workers, to_device
from . import backends, rundir
from .config import RunConfig, resolve
from .errors import TrainingError
from .parallel import parallel_for
from .precision import Precision
from .setup import make_optimizer, resolve_device, restore_rng, rng_state, rng_states
from .watch import FiniteWatch

__all__ = ["Run", "TrainingError", "resume", "train"]


class Run:
    """One training run: set up from a config, resumable, driven by :meth:`fit`.

    ``workers``: the data-parallel group (default: the initialised ``torch.distributed`` group,
    else this process alone). ``overwrite``: allow :meth:`fit` to start afresh in a directory
    that already holds a run (its checkpoint and summary are removed).
    """

    def __init__(self, cfg: RunConfig, out: Path, *, data_dir: Path | None = None, progress: bool = True,
                 workers: Workers | None = None, overwrite: bool = False, trust_checkpoint: bool = False) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.workers = W = workers or Workers.current()
        self.progress = progress and W.is_root
        self.overwrite = overwrite
        self.trust_checkpoint = trust_checkpoint
        r = cfg.run
        self.device = resolve_device(r.device, W)
        backends.prepare_environment(r, self.device)  # before the first CUDA matrix product
        torch.manual_seed(r.seed)
        self.task = tasks.load(r.dataset, cfg.data, data_dir, r.limit_train, r.limit_test).to(self.device)
        self.model = models.create(r.model, self.task.input_shape, self.task.num_classes, **cfg.model).to(self.device)
        self.method = methods.create(r.method, self.model, **cfg.method)
        self.parallel = parallel_for(W, self.model, self.method, self.device, r)  # data parallel, or a pipeline
        self.workers = W = self.parallel.workers
        self.parallel.join(self.task, r)
        self.optimizer = make_optimizer(r, self.parallel.trained_parameters())
        self.precision = Precision(r.amp, self.device, self.method)
        self.loss_fn = self.precision.loss_fn(self.task.loss_fn)
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "global_step": 0, "train_seconds": 0.0,
                                      "sums": {}, "metrics_bytes": 0}
        self.diagnostics = None
        if r.diagnostics_every and W.is_root:
            from ..metrics.alignment import Diagnostics

            x, y = self.task.probe_batch(r.probe_size)
            self.diagnostics = Diagnostics(self.method, x, y, self.task.loss_fn)
        self.watch = FiniteWatch(W, self.out, self.task.num_batches(r.batch_size))
        self._metrics: Any = rundir.NoLog()
        self._board: Any = None  # TensorBoard scalars of every metrics line (run option log)

    # -- persistence -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def checkpoint_bytes(self) -> int:
        """About how many bytes ``checkpoint.pt`` takes (model, optimizer, method; before the first step)."""
        return rundir.checkpoint_bytes(self.model, self.method, self.cfg.run)

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` (rank 0), after checking that the loss and weights are finite."""
        W = self.workers
        self.watch.check()
        self.watch.check_weights(self.model, self.state["global_step"])
        self.parallel.sync_method_state()
        rng_ranks = W.gather(rng_state(self.device)) if W.active else None
        model, optimizer, method = self.parallel.checkpoint_parts(self.optimizer)

        def write() -> None:
            self._metrics.flush()
            if self._board is not None:
                self._board.flush()
            self.state["metrics_bytes"] = self._metrics.tell()
            rundir.write_checkpoint(self.checkpoint_path, {
                "config": self.cfg.to_dict(), "state": dict(self.state), "model": model, "optimizer": optimizer,
                "method": method,
                "scaler": self.precision.state_dict(), **rng_states(), "rng_ranks": rng_ranks, "world_size": W.world,
            })

        W.on_root(write)

    def load_checkpoint(self) -> None:
        W = self.workers
        ck = to_device(W.on_root(rundir.read_checkpoint, self.out, self.cfg, self.trust_checkpoint), self.device)
        try:
            self.model.load_state_dict(ck["model"])
            self.parallel.load_optimizer(self.optimizer, ck["optimizer"])
            self.method.load_state_dict(ck["method"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainingError(f"{self.checkpoint_path} does not fit this run: {str(err).splitlines()[0]}") from err
        self.precision.load_state_dict(ck.get("scaler"))
        self.state = dict(ck["state"])
        restore_rng(ck, W, self.device, self.cfg.run.seed, self.state["global_step"])
        if not W.is_root:  # the epoch sums in the checkpoint are over all ranks: rank 0 carries them
            self.state["sums"] = {k: type(v)(0) for k, v in self.state["sums"].items()}

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        if self._board is not None:
            self._board.add(record)

    def write_summary(self) -> dict[str, Any]:
        r = self.cfg.run
        return rundir.write_summary(self.out, self.cfg, self.task.primary, {
            "train_seconds": round(self.state["train_seconds"], 3), "steps": self.state["global_step"],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device), "seed": r.seed, "processes": self.workers.world, "amp": r.amp,
            # CPU results can depend on it (convolution kernels split reductions per thread)
            "threads": torch.get_num_threads(),
            # GPU, torch/CUDA/cuDNN versions and the tf32/cudnn_benchmark/deterministic switches in effect
            "platform": backends.platform(self.device, r),
        })

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        W = self.workers
        W.on_root(rundir.prepare, self.out, self.cfg, resume=resume, overwrite=self.overwrite,
                  checkpoint_bytes=self.checkpoint_bytes())
        if resume:
            self.load_checkpoint()
        self._metrics = open(self.out / "metrics.jsonl", "a") if W.is_root else rundir.NoLog()
        try:
            if "tensorboard" in self.cfg.run.log and W.is_root:
                from .board import FOLDER, Board

                self._board = Board(self.out / FOLDER, self.state["global_step"] if resume else None)
            with backends.applied(self.cfg.run, self.device), self.parallel.overlapping():
                return self._fit()
        except RuntimeError as err:
            op = backends.refused_op(err)
            if op is None:
                raise
            raise TrainingError(backends.refusal_message(op, self.device)) from err
        finally:
            self._metrics.close()
            self._metrics = rundir.NoLog()
            if self._board is not None:
                self._board.close()
                self._board = None

    def _fit(self) -> dict[str, Any]:
        r, task, st, W = self.cfg.run, self.task, self.state, self.workers
        n_batches = task.num_batches(r.batch_size)
        if n_batches == 0:
            raise TrainingError("the training set is empty")
        self.model.train()
        for epoch in range(st["epoch"], r.epochs):
            bar = tqdm(total=n_batches, initial=st["batch"], desc=f"{r.method} epoch {epoch + 1}/{r.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            sums = {k: torch.tensor(v, device=self.device) for k, v in st["sums"].items()}
            t0 = time.perf_counter()
            for b in range(st["batch"], n_batches):
                result, y, loss, weight = self._step(*task.train_batch(r.seed, epoch, b, r.batch_size))
                st["batch"] = b + 1
                st["global_step"] += 1
                step = st["global_step"]
                self.watch.track(loss, step)
                for k, v in task.batch_stats(result.output, y, loss).items():
                    sums[k] = sums[k] + v if k in sums else v.detach().clone()
                bar.update(1)
                if step % r.log_every == 0 or b + 1 == n_batches:
                    bar.set_postfix(self._log_step(epoch, step, sums, loss * weight, result.metrics))
                if self.diagnostics is not None and step % r.diagnostics_every == 0:
                    with self.parallel.local_method():
                        self.log({"kind": "diagnostics", "epoch": epoch + 1, "step": step, **self.diagnostics.measure()})
                if r.checkpoint_every and step % r.checkpoint_every == 0 and b + 1 < n_batches:
                    self._drain()
                    st["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    st["sums"] = {k: v.item() for k, v in W.sum_dict(sums).items()}
                    self.save_checkpoint()
            bar.close()
            self._drain()
            st["train_seconds"] += time.perf_counter() - t0
            self._end_epoch(epoch, sums)
        self._metrics.flush()
        return W.on_root(self.write_summary)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[Any, torch.Tensor, torch.Tensor, float]:
        """One step on this rank's shard of a global batch: ``(result, shard targets, true loss, share)``."""
        x, y, weight, even = self.workers.shard(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        with self.parallel.reducing(weight, even), self.precision.autocast():  # .grad summed over ranks at the end
            result = self.parallel.stepper.step(x, y, self.loss_fn)
        loss = self.precision.true_loss(result.loss)
        self.precision.step(self.optimizer)
        return result, y, loss, weight

    def _drain(self) -> None:
        """Wait for the device's queued work (CUDA), so that a time taken now covers it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _log_step(self, epoch: int, step: int, sums: dict[str, torch.Tensor], loss: torch.Tensor,
                  metrics: dict[str, Any]) -> dict[str, str]:
        """A step line of ``metrics.jsonl`` (``loss``: this rank's share); the progress bar's figures.

        The running sums, the loss and the method's tensor metrics reach the host in one copy
        (one ``.tolist()`` of their stack), after the watch's check (one more).
        """
        self.watch.check()
        reduced = self.workers.sum_dict({**sums, " loss": loss.detach()})
        tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
        keys = list(reduced) + [f" metric {k}" for k in tensors]
        stacked = [(v if v.device == self.device else v.to(self.device)).detach().reshape(()).to(torch.float64)
                   for v in list(reduced.values()) + list(tensors.values())]
        values = dict(zip(keys, torch.stack(stacked).tolist()))
        loss_value = values.pop(" loss")
        running = self.task.summarise({k: values[k] for k in reduced if k != " loss"})
        method_metrics = {k: values[f" metric {k}"] if k in tensors else float(v) for k, v in metrics.items()}
        self.log({"kind": "step", "epoch": epoch + 1, "step": step, "loss": loss_value,
                  **{f"train_{k}": v for k, v in running.items()}, **method_metrics})
        return {k: f"{v:.4g}" for k, v in running.items()}

    def _end_epoch(self, epoch: int, sums: dict[str, torch.Tensor]) -> None:
        """The epoch line (train sums over ranks, test metrics from rank 0), then a checkpoint."""
        r, st, W = self.cfg.run, self.state, self.workers
        self.watch.check()
        train_metrics = self.task.summarise({k: float(v) for k, v in W.sum_dict(sums).items()})
        self.parallel.gather_model()  # a pipeline's stages into the whole model
        test = W.on_root(self._evaluate)
        self.log({"kind": "epoch", "epoch": epoch + 1, "step": st["global_step"],
                  **{f"train_{k}": v for k, v in train_metrics.items()},
                  **{f"test_{k}": v for k, v in test.items()}, "train_seconds": st["train_seconds"]})
        self.method.on_epoch_end(epoch + 1)
        if self.progress:
            tqdm.write(f"{r.method} epoch {epoch + 1}/{r.epochs}: "
                       + " ".join(f"train {k} {v:.4f}" for k, v in train_metrics.items()) + " | "
                       + " ".join(f"test {k} {v:.4f}" for k, v in test.items()))
        st.update(epoch=epoch + 1, batch=0, sums={})
        self.save_checkpoint()

    def _evaluate(self) -> dict[str, float]:
        with self.precision.autocast():
            return self.task.evaluate(self.model, "test", self.cfg.run.eval_batch_size)


def train(cfg: RunConfig, out: str | os.PathLike, *, data_dir: Path | None = None, progress: bool = True,
          workers: Workers | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train from scratch into ``out`` (which must not hold a run already, unless ``overwrite``);
    returns the summary. Under a process group (or ``workers``) every rank calls it alike."""
    return Run(cfg, Path(out), data_dir=data_dir, progress=progress, workers=workers, overwrite=overwrite).fit(resume=False)


def resume(out: str | os.PathLike, *, data_dir: Path | None = None, progress: bool = True,
           device: str | None = None, workers: Workers | None = None, trust_checkpoint: bool = False) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint (checked against its sha256 and loaded
    without running code, unless ``trust_checkpoint``: see ``train.checkpoint``); returns the summary.

    ``device`` runs it elsewhere than its configuration says (cpu, cuda...): the device is where a
    run computes, not what it computes, so the checkpoint still fits. Any number of processes
    may resume a run, whatever number started it.
    """
    out = Path(out)
    W = workers or Workers.current()
    raw, has_checkpoint = W.on_root(rundir.read_config, out)
    cfg = resolve(raw)
    if device is not None:
        cfg.run.device = device
    # without a checkpoint the run had not finished its first one: start it again in place
    run = Run(cfg, out, data_dir=data_dir, progress=progress, workers=W, overwrite=not has_checkpoint,
              trust_checkpoint=trust_checkpoint)
    return run.fit(resume=has_checkpoint)
