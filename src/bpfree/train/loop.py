"""The one training loop, for every method and every task.

It builds the task, model, method and optimizer from a :class:`RunConfig`, and for each batch
calls ``method.step(x, y, task.loss_fn)`` and then ``optimizer.step()``. It knows nothing of any
particular method or dataset. A run directory holds::

    config.toml      the resolved configuration
    metrics.jsonl    one JSON object per logged step ("kind": "step"), per epoch ("epoch"),
                     per diagnostics probe ("diagnostics")
    checkpoint.pt    written atomically at the end of each epoch (and every checkpoint_every steps)
    summary.json     the final figures (test_accuracy or test_ppl, train_seconds, ...)

``Run.fit(resume=True)`` continues from ``checkpoint.pt`` and ends with the same weights as an
uninterrupted run: batches are a pure function of (seed, epoch, index), and the global RNG
states, optimizer and method states and the epoch's running sums are checkpointed.
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

from .. import methods, models, tasks
from .checkpoint import load_torch, save_json, save_text, save_torch
from .config import RunConfig, dumps_toml, load_toml, resolve


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a run directory that cannot be used."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise TrainingError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} was asked for, but CUDA is not available on this machine")
    return dev


def make_optimizer(run, params) -> torch.optim.Optimizer:
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay)
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay)
    return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay)


def check_out_dir(out: Path) -> None:
    """Fail before training if ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"\0" * 65536)
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
        self.task = tasks.load(r.dataset, cfg.data, data_dir, r.limit_train, r.limit_test).to(self.device)
        self.model = models.create(r.model, self.task.input_shape, self.task.num_classes, **cfg.model).to(self.device)
        self.method = methods.create(r.method, self.model, **cfg.method)
        self.optimizer = make_optimizer(r, self.model.parameters())
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "global_step": 0, "train_seconds": 0.0,
                                      "sums": {}, "metrics_bytes": 0}
        self.diagnostics = None
        if r.diagnostics_every:
            from ..metrics.alignment import Diagnostics

            x, y = self.task.probe_batch(r.probe_size)
            self.diagnostics = Diagnostics(self.method, x, y, self.task.loss_fn)

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
        check_out_dir(self.out)
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
                x, y = task.train_batch(r.seed, epoch, b, r.batch_size)
                self.optimizer.zero_grad(set_to_none=True)
                result = self.method.step(x, y, task.loss_fn)
                self.optimizer.step()
                for k, v in task.batch_stats(result.output, y, result.loss).items():
                    sums[k] = sums[k] + v if k in sums else v.detach().clone()
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
                    running = task.summarise({k: float(v) for k, v in sums.items()})
                    rec = {"kind": "step", "epoch": epoch + 1, "step": step, "loss": loss,
                           **{f"train_{k}": v for k, v in running.items()}}
                    rec.update({k: float(v) for k, v in result.metrics.items()})
                    self.log(rec)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
                if self.diagnostics is not None and step % r.diagnostics_every == 0:
                    self.log({"kind": "diagnostics", "epoch": epoch + 1, "step": step, **self.diagnostics.measure()})
                if r.checkpoint_every and step % r.checkpoint_every == 0 and b + 1 < n_batches:
                    st["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    st["sums"] = {k: v.item() for k, v in sums.items()}
                    self.save_checkpoint()
            bar.close()
            st["train_seconds"] += time.perf_counter() - t0
            train_metrics = task.summarise({k: float(v) for k, v in sums.items()})
            test = task.evaluate(self.model, "test", r.eval_batch_size)
            rec = {"kind": "epoch", "epoch": epoch + 1, "step": st["global_step"],
                   **{f"train_{k}": v for k, v in train_metrics.items()},
                   **{f"test_{k}": v for k, v in test.items()}, "train_seconds": st["train_seconds"]}
            self.log(rec)
            self.method.on_epoch_end(epoch + 1)
            if self.progress:
                tqdm.write(f"{r.method} epoch {epoch + 1}/{r.epochs}: "
                           + " ".join(f"train {k} {v:.4f}" for k, v in train_metrics.items()) + " | "
                           + " ".join(f"test {k} {v:.4f}" for k, v in test.items()))
            st.update(epoch=epoch + 1, batch=0, sums={})
            self.save_checkpoint()
        return self.write_summary()

    def write_summary(self) -> dict[str, Any]:
        r = self.cfg.run
        lines = [json.loads(l) for l in (self.out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        last = [l for l in lines if l["kind"] == "epoch"][-1]
        summary = {"method": r.method, "model": r.model, "dataset": r.dataset, "epochs": r.epochs,
                   "primary": f"test_{self.task.primary}"}
        summary.update({k: v for k, v in last.items() if k.startswith(("test_", "train_")) and k != "train_seconds"})
        summary.update({
            "train_seconds": round(self.state["train_seconds"], 3),
            "steps": self.state["global_step"],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device), "seed": r.seed,
            "config": self.cfg.to_dict(),
        })
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
    return run.fit(resume=run.checkpoint_path.exists())
