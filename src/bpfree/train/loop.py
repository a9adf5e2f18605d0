"""The one training loop, for every method.

It builds the task, model, method and optimizer from a :class:`RunConfig`, and for each batch
calls ``method.step(x, y, loss_fn)`` and then ``optimizer.step()``. It knows nothing of any
particular method. A run directory holds::

    config.toml      the resolved configuration
    metrics.jsonl    one JSON object per logged step ("kind": "step"), per epoch ("epoch"),
                     per diagnostics probe ("diagnostics")
    checkpoint.pt    written atomically at the end of each epoch (and every checkpoint_every steps)
    summary.json     the final figures (test_accuracy, train_seconds, ...)

``train(..., resume=True)`` continues from ``checkpoint.pt`` and ends with the same weights as an
uninterrupted run: the data order of each epoch comes from ``seed`` and the epoch number, and the
global RNG states, optimizer and method states are checkpointed.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import methods, models
from .checkpoint import load_torch, save_json, save_text, save_torch
from .config import RunConfig, dumps_toml, load_toml, resolve
from .tasks import Task, load_task


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a run directory that cannot be used."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return dev


def make_optimizer(run, params) -> torch.optim.Optimizer:
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay)
    return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)


@torch.no_grad()
def evaluate(model: torch.nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean loss and accuracy of ``model`` on ``(x, y)`` in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        loss_sum += task.loss_fn(out, y[i : i + batch_size]) * len(out)
        correct += task.correct(out, y[i : i + batch_size])
    model.train(was_training)
    n = max(len(x), 1)
    return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The sample order of ``epoch`` (0-based): a permutation fixed by ``seed`` and ``epoch``."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


def _check_out_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"\0" * 4096)
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"cannot write to the run directory {out}: {err.strerror or err}") from err


class Run:
    """One training run: set up from a config, resumable, driven by :meth:`fit`."""

    def __init__(self, cfg: RunConfig, out: Path, *, data_dir: Path | None = None, progress: bool = True) -> None:
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        r = cfg.run
        self.device = resolve_device(r.device)
        torch.manual_seed(r.seed)
        self.task = load_task(r.dataset, cfg.data, data_dir, r.limit_train, r.limit_test).to(self.device)
        self.model = models.create(r.model, self.task.input_shape, self.task.num_classes, **cfg.model).to(self.device)
        self.method = methods.create(r.method, self.model, **cfg.method)
        self.optimizer = make_optimizer(r, self.model.parameters())
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "global_step": 0, "train_seconds": 0.0,
                                      "loss_sum": 0.0, "correct": 0, "seen": 0, "metrics_bytes": 0}
        self.probe = None
        if r.diagnostics_every:
            from ..metrics.alignment import Diagnostics

            k = min(r.probe_size, len(self.task.train_x))
            self.probe = Diagnostics(self.method, self.task.train_x[:k], self.task.train_y[:k], self.task.loss_fn)

    # -- persistence -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save_checkpoint(self) -> None:
        self._metrics.flush()
        self.state["metrics_bytes"] = self._metrics.tell()
        payload = {
            "config": self.cfg.to_dict(),
            "state": dict(self.state),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        }
        save_torch(payload, self.checkpoint_path)

    def load_checkpoint(self) -> None:
        ck = load_torch(self.checkpoint_path, map_location=self.device)
        if ck["config"] != self.cfg.to_dict():
            raise TrainingError(f"{self.checkpoint_path} was written by a different configuration")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.method.load_state_dict(ck["method"])
        torch.set_rng_state(ck["rng_cpu"].cpu())
        if ck["rng_cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng_cuda"]])
        self.state = dict(ck["state"])

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")

    # -- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        r = self.cfg.run
        _check_out_dir(self.out)
        metrics_path = self.out / "metrics.jsonl"
        if resume:
            self.load_checkpoint()
            with open(metrics_path, "r+b") as f:
                f.truncate(self.state["metrics_bytes"])  # drop lines logged after the checkpoint
        else:
            save_text(dumps_toml(self.cfg.to_dict()), self.out / "config.toml")
            metrics_path.write_bytes(b"")
        self._metrics = open(metrics_path, "a")
        try:
            return self._fit()
        finally:
            self._metrics.close()

    def _fit(self) -> dict[str, Any]:
        r, task, st = self.cfg.run, self.task, self.state
        n = len(task.train_x)
        if n == 0:
            raise TrainingError("the training set is empty")
        n_batches = math.ceil(n / r.batch_size)
        self.model.train()
        for epoch in range(st["epoch"], r.epochs):
            order = epoch_order(r.seed, epoch, n).to(self.device)
            bar = tqdm(total=n_batches, initial=st["batch"], desc=f"{r.method} epoch {epoch + 1}/{r.epochs}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            loss_sum = torch.tensor(st["loss_sum"], device=self.device)
            correct = torch.tensor(st["correct"], device=self.device)
            t0 = time.perf_counter()
            for b in range(st["batch"], n_batches):
                idx = order[b * r.batch_size : (b + 1) * r.batch_size]
                x, y = task.train_x[idx], task.train_y[idx]
                self.optimizer.zero_grad(set_to_none=True)
                result = self.method.step(x, y, task.loss_fn)
                self.optimizer.step()
                loss_sum += result.loss * len(idx)
                correct += task.correct(result.output, y)
                st["seen"] += len(idx)
                st["batch"] = b + 1
                st["global_step"] += 1
                bar.update(1)
                step = st["global_step"]
                if step % r.log_every == 0 or b + 1 == n_batches:
                    loss = float(result.loss)
                    if not math.isfinite(loss):
                        raise TrainingError(
                            f"the loss became {loss} at step {step} (epoch {epoch + 1}); stopping. "
                            f"The last good checkpoint is kept in {self.out}"
                        )
                    rec = {"kind": "step", "epoch": epoch + 1, "step": step, "loss": loss,
                           "train_loss": float(loss_sum) / st["seen"], "train_accuracy": float(correct) / st["seen"]}
                    rec.update({k: float(v) for k, v in result.metrics.items()})
                    self.log(rec)
                    bar.set_postfix(loss=f"{rec['train_loss']:.4f}", acc=f"{rec['train_accuracy']:.4f}")
                if self.probe is not None and step % r.diagnostics_every == 0:
                    self.log({"kind": "diagnostics", "epoch": epoch + 1, "step": step, **self.probe.measure()})
                if r.checkpoint_every and step % r.checkpoint_every == 0 and b + 1 < n_batches:
                    st["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    st["loss_sum"], st["correct"] = float(loss_sum), int(correct)
                    self.save_checkpoint()
            bar.close()
            st["train_seconds"] += time.perf_counter() - t0
            test = evaluate(self.model, task, task.test_x, task.test_y, r.eval_batch_size)
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": st["global_step"],
                   "train_loss": float(loss_sum) / st["seen"], "train_accuracy": float(correct) / st["seen"],
                   "test_loss": test["loss"], "test_accuracy": test["accuracy"], "train_seconds": st["train_seconds"]}
            self.log(rec)
            self.method.on_epoch_end(epoch + 1)
            if self.progress:
                tqdm.write(f"{r.method} epoch {epoch + 1}/{r.epochs}: train loss {rec['train_loss']:.4f} "
                           f"acc {rec['train_accuracy']:.4f} | test loss {test['loss']:.4f} acc {test['accuracy']:.4f}")
            st.update(epoch=epoch + 1, batch=0, loss_sum=0.0, correct=0, seen=0)
            self.last_epoch = rec
            self.save_checkpoint()
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        r = self.cfg.run
        lines = [json.loads(l) for l in (self.out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        last = [l for l in lines if l["kind"] == "epoch"][-1]
        summary = {
            "method": r.method, "model": r.model, "dataset": r.dataset, "epochs": r.epochs,
            "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"],
            "train_accuracy": last["train_accuracy"], "train_loss": last["train_loss"],
            "train_seconds": round(self.state["train_seconds"], 3),
            "steps": self.state["global_step"],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device), "seed": r.seed,
            "config": self.cfg.to_dict(),
        }
        save_json(summary, self.out / "summary.json")
        return summary


def train(cfg: RunConfig, out: str | os.PathLike, *, data_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Train from scratch into ``out``; returns the summary."""
    return Run(cfg, Path(out), data_dir=data_dir, progress=progress).fit(resume=False)


def resume(out: str | os.PathLike, *, data_dir: Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint; returns the summary."""
    out = Path(out)
    if not (out / "config.toml").exists():
        raise TrainingError(f"{out} holds no config.toml: it is not a bpfree run directory")
    cfg = resolve(load_toml(out / "config.toml"))
    run = Run(cfg, out, data_dir=data_dir, progress=progress)
    if not run.checkpoint_path.exists():
        return run.fit(resume=False)
    return run.fit(resume=True)
