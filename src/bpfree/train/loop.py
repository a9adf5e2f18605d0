"""The one training loop, for every method and every task.

It builds the task, model, method and optimizer from a :class:`RunConfig`, and for each batch
calls ``method.step(x, y, task.loss_fn)`` and then ``optimizer.step()``. It knows nothing of any
particular method or dataset. A run directory holds::

    config.toml      the resolved configuration
    metrics.jsonl    one JSON object per logged step ("kind": "step"), per epoch ("epoch"),
                     per diagnostics probe ("diagnostics")
    checkpoint.pt    written atomically at the end of each epoch (and every checkpoint_every steps)
    summary.json     the final figures (test_accuracy or test_ppl, train_seconds, ...)

Resilience:

* ``Run.fit(resume=True)`` continues from ``checkpoint.pt`` and ends with the same weights as an
  uninterrupted run, however the run stopped (``SIGKILL`` included): batches are a pure function
  of (seed, epoch, index); the RNG states, optimizer, method and loss-scaler states and the epoch's
  running sums are checkpointed; ``metrics.jsonl`` is cut back to what the checkpoint had seen.
* Every file is written atomically (temporary file, ``fsync``, rename, ``fsync`` of the folder):
  a checkpoint is the old one or the new one, never half of either. Temporary files left by a
  killed run are removed when it resumes.
* A non-finite loss stops the run with a message naming the step; the loss of every step is
  watched (on the device, without synchronising) and checked before every log line and every
  checkpoint, and the weights are checked before every checkpoint, so the checkpoint left behind
  is always the last good one.
* Before training starts: the run directory must be writable and have room for a checkpoint
  (estimated from the model, optimizer and method states, plus a margin); an existing run is
  never overwritten unless asked (``overwrite=True``); a checkpoint that cannot be written later
  (disk full) stops the run with a clear error and leaves the previous checkpoint intact.

Data parallel (:mod:`bpfree.distributed`): under an initialised process group every rank trains
on its shard of each global batch; the loop averages ``.grad`` over the ranks before
``optimizer.step()``; rank 0 writes the run directory. Mixed precision: run option ``amp``
(``bf16``: ``torch.autocast`` around ``method.step``; ``fp16``: autocast and a
``torch.amp.GradScaler``, for methods whose gradients follow the loss's scale).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import methods, models, tasks
from ..distributed import DistributedError, Workers, derived_seed, state_checksum, to_device
from ..options import OptionError
from .checkpoint import load_torch, save_json, save_text, save_torch
from .config import RunConfig, dumps_toml, load_toml, resolve


class TrainingError(RuntimeError):
    """Training stopped: a non-finite loss, or a run directory that cannot be used."""


#: Files the loop writes in a run directory (their temporary copies start with ``.NAME.``).
RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoint.pt", "summary.json")
#: Free space required beyond the estimated checkpoint size.
SPACE_MARGIN_BYTES = 16 * 2**20


def resolve_device(name: str, workers: Workers | None = None) -> torch.device:
    """The device of ``name``; under data parallelism on CUDA, ``cuda:LOCAL_RANK``."""
    workers = workers or Workers()
    if name == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except RuntimeError:
            raise TrainingError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
        if dev.type not in ("cpu", "cuda"):
            raise TrainingError(f"device {name!r} is not supported; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"device {name!r} was asked for, but CUDA is not available on this machine")
        if workers.active:
            if dev.index is not None:
                raise TrainingError(f"with {workers.world} processes each uses cuda:LOCAL_RANK; "
                                    f"give device cuda (or auto), not {name!r}")
            if workers.local_rank >= torch.cuda.device_count():
                raise TrainingError(f"process LOCAL_RANK={workers.local_rank} has no GPU of its own: this machine "
                                    f"has {torch.cuda.device_count()}; start at most that many processes per machine")
            dev = torch.device("cuda", workers.local_rank)
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(f"device {name!r} was asked for, but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
    return dev


def make_optimizer(run, params) -> torch.optim.Optimizer:
    """The run's optimizer over ``params``; PyTorch's fused kernels where they apply.

    A fused optimizer updates every parameter in one kernel (on CPU about 3x faster than the
    per-parameter loop for an MLP of 3M weights); it needs floating-point parameters on CPU or
    CUDA, else the default implementation is used.
    """
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    kw = {"fused": True} if fused else {}
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=run.lr, momentum=run.momentum, weight_decay=run.weight_decay, **kw)
    if run.optimizer == "adam":
        return torch.optim.Adam(params, lr=run.lr, weight_decay=run.weight_decay, **kw)
    return torch.optim.AdamW(params, lr=run.lr, weight_decay=run.weight_decay, **kw)


def check_out_dir(out: Path) -> None:
    """Fail before training if ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"cannot write to the run directory {out}: {err.strerror or err}") from err


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def check_free_space(out: Path, needed: int) -> None:
    """Fail unless the file system of ``out`` has ``needed`` bytes plus a margin free."""
    free = shutil.disk_usage(out).free
    want = needed + needed // 4 + SPACE_MARGIN_BYTES
    if free < want:
        mb = lambda n: f"{n / 2**20:.1f} MB"
        raise TrainingError(
            f"not enough free space for {out}: a checkpoint of this run takes about {mb(needed)}, so "
            f"{mb(want)} should be free (with margin), but only {mb(free)} is. Free some space or choose another --out"
        )


class _NoLog:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


class Precision:
    """Run option ``amp``: autocast around ``method.step`` and, for fp16, a gradient scaler.

    ``bf16``: ``torch.autocast(device, torch.bfloat16)``; the weights, ``.grad`` and the optimizer
    stay float32. ``fp16``: ``torch.autocast(device, torch.float16)`` and a
    ``torch.amp.GradScaler``: the loss the method differentiates is multiplied by the scale, the
    gradients are unscaled before the optimizer step, and steps with inf/NaN gradients are skipped
    (the scale then shrinks). Scaling the loss scales the gradients only for methods that declare
    ``supports_loss_scaling``; for others fp16 is refused.
    """

    DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

    def __init__(self, amp: str, device: torch.device, method) -> None:
        self.kind, self.device = amp, device
        self.dtype = self.DTYPES.get(amp)
        self.scaler: torch.amp.GradScaler | None = None
        if amp == "fp16":
            if not getattr(method, "supports_loss_scaling", False):
                raise TrainingError(
                    f"amp=fp16 scales the loss (gradient scaling), and method {method.name!r} does not declare that its "
                    f"gradients follow the loss's scale (supports_loss_scaling); use amp=bf16 or amp=none"
                )
            self.scaler = torch.amp.GradScaler(device.type)
        if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError(f"amp=bf16 was asked for, but {torch.cuda.get_device_name(device)} does not support bfloat16")

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def loss_fn(self, loss_fn):
        if self.scaler is None:
            return loss_fn
        scaler = self.scaler
        return lambda output, target: scaler.scale(loss_fn(output, target))

    def true_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """The step's loss without the scale (call before :meth:`step`, which may change it)."""
        if self.scaler is None:
            return loss
        return loss / self.scaler.scale(torch.ones((), device=loss.device))

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def state_dict(self) -> dict[str, Any] | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def _config_diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        keys += [f"{section}.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return keys


def _without_device(cfg: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {k: dict(v) for k, v in cfg.items()}
    out.get("run", {}).pop("device", None)
    return out


class Run:
    """One training run: set up from a config, resumable, driven by :meth:`fit`.

    ``workers``: the data-parallel group (default: the initialised ``torch.distributed`` group,
    else this process alone). ``overwrite``: allow :meth:`fit` to start afresh in a directory
    that already holds a run (its checkpoint and summary are removed).
    """

    def __init__(self, cfg: RunConfig, out: Path, *, data_dir: Path | None = None, progress: bool = True,
                 workers: Workers | None = None, overwrite: bool = False) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.workers = W = workers or Workers.current()
        self.progress = progress and W.is_root
        self.overwrite = overwrite
        r = cfg.run
        self.device = resolve_device(r.device, W)
        try:
            W.check_batch_size(r.batch_size)
        except DistributedError as err:
            raise TrainingError(str(err)) from None
        torch.manual_seed(r.seed)
        self.task = tasks.load(r.dataset, cfg.data, data_dir, r.limit_train, r.limit_test).to(self.device)
        self.model = models.create(r.model, self.task.input_shape, self.task.num_classes, **cfg.model).to(self.device)
        self.method = methods.create(r.method, self.model, **cfg.method)
        self.optimizer = make_optimizer(r, self.model.parameters())
        self.precision = Precision(r.amp, self.device, self.method)
        self.loss_fn = self.precision.loss_fn(self.task.loss_fn)
        if W.active:
            n_batches = self.task.num_batches(r.batch_size)
            if n_batches:
                last = self.task.train_batch(r.seed, 0, n_batches - 1, r.batch_size)[0].shape[0]
                if last < W.world:
                    raise TrainingError(
                        f"the last batch of each epoch holds {last} sample(s), fewer than the {W.world} processes: "
                        f"some would get none. Change limit_train or batch_size"
                    )
            with torch.no_grad():  # identical start on every rank, whatever the initialisation did
                W.broadcast_tensors([t.detach() for t in list(self.model.parameters()) + list(self.model.buffers())])
            self.method.average_across_workers = W.average
            torch.manual_seed(derived_seed(r.seed, W.rank))  # dropout etc.: independent draws per rank
        self.state: dict[str, Any] = {"epoch": 0, "batch": 0, "global_step": 0, "train_seconds": 0.0,
                                      "sums": {}, "metrics_bytes": 0}
        self.diagnostics = None
        if r.diagnostics_every and W.is_root:
            from ..metrics.alignment import Diagnostics

            x, y = self.task.probe_batch(r.probe_size)
            self.diagnostics = Diagnostics(self.method, x, y, self.task.loss_fn)
        self._bad_step: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None
        self._grads_checked = False
        self._state_warned = False
        self._metrics: Any = _NoLog()

    # -- persistence -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def checkpoint_bytes(self) -> int:
        """About how many bytes ``checkpoint.pt`` takes (model, optimizer, method; before the first step)."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        per_param = {"adam": 2, "adamw": 2}.get(self.cfg.run.optimizer, 1 if self.cfg.run.momentum else 0)
        return (tensor_bytes(self.model.state_dict()) + per_param * params
                + tensor_bytes(self.method.state_dict()) + 2**20)

    def _rng_state(self) -> dict[str, Any]:
        cuda = None
        if self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state(self.device)
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def save_checkpoint(self) -> None:
        """Write ``checkpoint.pt`` (rank 0), after checking that the loss and weights are finite."""
        W = self.workers
        self._check_finite()
        self._check_weights()
        self._sync_method_state()
        rng_ranks = W.gather(self._rng_state()) if W.active else None

        def write() -> None:
            self._metrics.flush()
            self.state["metrics_bytes"] = self._metrics.tell()
            payload = {
                "config": self.cfg.to_dict(),
                "state": dict(self.state),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "method": self.method.state_dict(),
                "scaler": self.precision.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "rng_ranks": rng_ranks,
                "world_size": W.world,
            }
            try:
                save_torch(payload, self.checkpoint_path)
            except OSError as err:
                raise TrainingError(
                    f"cannot write the checkpoint {self.checkpoint_path}: {err.strerror or err}; "
                    f"the previous checkpoint is intact"
                ) from err

        W.on_root(write)

    def _read_checkpoint(self) -> dict[str, Any]:
        """Rank 0: the checkpoint, checked against this configuration; ``metrics.jsonl`` cut back to it."""
        path = self.checkpoint_path
        ck = load_torch(path, map_location="cpu")
        needed = {"config", "state", "model", "optimizer", "method"}
        if not isinstance(ck, dict) or not needed <= set(ck):
            raise TrainingError(f"{path} is not a bpfree checkpoint")
        try:
            saved = resolve(ck["config"]).to_dict()
        except (OptionError, ValueError) as err:
            raise TrainingError(f"{path} was written by a configuration this version cannot use: {err}") from None
        diff = _config_diff(_without_device(saved), _without_device(self.cfg.to_dict()))
        if diff:
            raise TrainingError(f"{path} was written by a different configuration (differs in {', '.join(diff)})")
        metrics = self.out / "metrics.jsonl"
        keep = int(ck["state"].get("metrics_bytes", 0))
        size = metrics.stat().st_size if metrics.exists() else 0
        if size >= keep:
            with open(metrics, "ab") as f:
                f.truncate(keep)  # drop lines logged after the checkpoint
        else:
            warnings.warn(f"{metrics} is shorter than the checkpoint recorded; its earlier lines are lost", RuntimeWarning)
        return ck

    def load_checkpoint(self) -> None:
        W = self.workers
        ck = to_device(W.on_root(self._read_checkpoint), self.device)
        try:
            self.model.load_state_dict(ck["model"])
            self.optimizer.load_state_dict(ck["optimizer"])
            self.method.load_state_dict(ck["method"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise TrainingError(f"{self.checkpoint_path} does not fit this run: {str(err).splitlines()[0]}") from err
        self.precision.load_state_dict(ck.get("scaler"))
        self.state = dict(ck["state"])
        ranks = ck.get("rng_ranks")
        if not W.active:
            torch.set_rng_state(ck["rng_cpu"].cpu())
            if ck.get("rng_cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng_cuda"]][: torch.cuda.device_count()])
        elif ranks is not None and len(ranks) == W.world:
            torch.set_rng_state(ranks[W.rank]["cpu"].cpu())
            if ranks[W.rank]["cuda"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(ranks[W.rank]["cuda"].cpu(), self.device)
        else:  # another number of processes: fresh, reproducible streams per rank
            torch.manual_seed(derived_seed(self.cfg.run.seed, W.rank, self.state["global_step"]))
        if not W.is_root:  # the epoch sums in the checkpoint are over all ranks: rank 0 carries them
            self.state["sums"] = {k: type(v)(0) for k, v in self.state["sums"].items()}

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")

    # -- checks ------------------------------------------------------------------------------
    def _track_finite(self, loss: torch.Tensor, step: int) -> None:
        """Remember (on the device, no synchronisation) the first step whose loss was not finite."""
        loss = loss.detach().float().reshape(-1)[:1].reshape(())
        if self._bad_step is None:
            self._bad_step = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float64, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step == 0)
        self._bad_step.masked_fill_(first, float(step))
        self._bad_loss.copy_(torch.where(first, loss.double(), self._bad_loss))

    def _check_finite(self) -> None:
        """Stop (on every rank) if any rank saw a non-finite loss."""
        if self._bad_step is None:
            return
        rows = self.workers.gather_tensor(torch.stack([self._bad_step, self._bad_loss]))
        bad = sorted((int(r[0]), float(r[1])) for r in (r.cpu() for r in rows) if r[0] > 0)
        if bad:
            step, value = bad[0]
            n = max(self.task.num_batches(self.cfg.run.batch_size), 1)
            kept = (f"The last good checkpoint is kept in {self.out}" if self.checkpoint_path.exists()
                    else f"No checkpoint had been written to {self.out} yet")
            raise TrainingError(
                f"the loss became {value} at step {step} (epoch {(step - 1) // n + 1}); stopping. {kept}"
            )

    def _check_weights(self) -> None:
        params = [p.detach() for p in self.model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingError(
                f"the weights became non-finite by step {self.state['global_step']}; stopping without writing "
                f"a checkpoint. The last good checkpoint is kept in {self.out}"
            )

    # -- data parallel ---------------------------------------------------------------------------
    def _reduce_gradients(self, weight: float) -> None:
        """``.grad`` and floating buffers become the batch-share-weighted sums over ranks."""
        W = self.workers
        params = list(self.model.parameters())
        if not self._grads_checked:
            mask = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
            W.all_reduce_weighted([mask], 1.0)
            if bool(((mask != 0) & (mask != W.world)).any()):
                raise TrainingError(
                    f"method {self.method.name!r} filled .grad of different parameters on different processes; "
                    f"data parallel training needs the same set on every rank"
                )
            self._grads_checked = True
        tensors = [p.grad for p in params if p.grad is not None]
        tensors += [b for b in self.model.buffers() if b.is_floating_point()]
        W.all_reduce_weighted(tensors, weight)

    def _sync_method_state(self, expected: bool = False) -> None:
        """Make the method's state rank 0's if it differs anywhere (one fingerprint gather).

        ``expected``: after an uneven batch, where shards of different sizes may consume a method's
        random generator differently; otherwise a difference is worth a warning (once).
        """
        W = self.workers
        if not W.active:
            return
        sums = W.gather_tensor(state_checksum(self.method.state_dict()).to(self.device))
        if all(bool(s == sums[0]) for s in sums):
            return
        if not expected and not self._state_warned and W.is_root:
            warnings.warn(
                f"method {self.method.name!r} keeps state that differs across the {W.world} processes (batch "
                f"statistics not passed through average_across_workers); rank 0's state is broadcast at every "
                f"checkpoint and after uneven batches", RuntimeWarning,
            )
            self._state_warned = True
        state = W.broadcast(self.method.state_dict() if W.is_root else None)
        if not W.is_root:
            self.method.load_state_dict(to_device(state, self.device))

    @contextlib.contextmanager
    def _local_method(self):
        """The method without its cross-rank averaging (diagnostics run on rank 0 alone)."""
        saved = self.method.average_across_workers
        self.method.average_across_workers = lambda t: t
        try:
            yield
        finally:
            self.method.average_across_workers = saved

    # -- the loop ----------------------------------------------------------------------------
    def _prepare_dir(self, resume: bool) -> None:
        """Rank 0, before training: a writable directory with room; a fresh run never clobbers an old one."""
        check_out_dir(self.out)
        for name in RUN_FILES:  # temporary files of a killed run
            for tmp in self.out.glob(f".{name}.*.tmp"):
                tmp.unlink(missing_ok=True)
        if not resume:
            existing = [n for n in ("checkpoint.pt", "summary.json", "config.toml") if (self.out / n).exists()]
            if existing and not self.overwrite:
                raise TrainingError(
                    f"{self.out} already holds a run ({', '.join(existing)}): continue it with --resume {self.out}, "
                    f"or choose another --out, or pass --overwrite to replace it"
                )
            for n in ("checkpoint.pt", "summary.json"):
                (self.out / n).unlink(missing_ok=True)
        check_free_space(self.out, self.checkpoint_bytes())
        if not resume:
            save_text(dumps_toml(self.cfg.to_dict()), self.out / "config.toml")
            (self.out / "metrics.jsonl").write_bytes(b"")

    def fit(self, resume: bool = False) -> dict[str, Any]:
        W = self.workers
        W.on_root(self._prepare_dir, resume)
        if resume:
            self.load_checkpoint()
        self._metrics = open(self.out / "metrics.jsonl", "a") if W.is_root else _NoLog()
        try:
            return self._fit()
        finally:
            self._metrics.close()
            self._metrics = _NoLog()

    def _evaluate(self) -> dict[str, float]:
        with self.precision.autocast():
            return self.task.evaluate(self.model, "test", self.cfg.run.eval_batch_size)

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
                x, y = task.train_batch(r.seed, epoch, b, r.batch_size)
                x, y, weight, even = W.shard(x, y)
                self.optimizer.zero_grad(set_to_none=True)
                with self.precision.autocast():
                    result = self.method.step(x, y, self.loss_fn)
                loss = self.precision.true_loss(result.loss)
                if W.active:
                    self._reduce_gradients(weight)
                    if not even:
                        self._sync_method_state(expected=True)
                self.precision.step(self.optimizer)
                st["batch"] = b + 1
                st["global_step"] += 1
                step = st["global_step"]
                self._track_finite(loss, step)
                for k, v in task.batch_stats(result.output, y, loss).items():
                    sums[k] = sums[k] + v if k in sums else v.detach().clone()
                bar.update(1)
                if step % r.log_every == 0 or b + 1 == n_batches:
                    self._check_finite()
                    reduced = W.sum_dict({**sums, " loss": loss.detach() * weight})
                    loss_value = float(reduced.pop(" loss"))
                    running = task.summarise({k: float(v) for k, v in reduced.items()})
                    rec = {"kind": "step", "epoch": epoch + 1, "step": step, "loss": loss_value,
                           **{f"train_{k}": v for k, v in running.items()}}
                    rec.update({k: float(v) for k, v in result.metrics.items()})
                    self.log(rec)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in running.items()})
                if self.diagnostics is not None and step % r.diagnostics_every == 0:
                    with self._local_method():
                        self.log({"kind": "diagnostics", "epoch": epoch + 1, "step": step, **self.diagnostics.measure()})
                if r.checkpoint_every and step % r.checkpoint_every == 0 and b + 1 < n_batches:
                    st["train_seconds"] += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    st["sums"] = {k: v.item() for k, v in W.sum_dict(sums).items()}
                    self.save_checkpoint()
            bar.close()
            st["train_seconds"] += time.perf_counter() - t0
            self._check_finite()
            train_metrics = task.summarise({k: float(v) for k, v in W.sum_dict(sums).items()})
            test = W.on_root(self._evaluate)
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
        self._metrics.flush()
        return W.on_root(self.write_summary)

    def write_summary(self) -> dict[str, Any]:
        r = self.cfg.run
        lines = [json.loads(l) for l in (self.out / "metrics.jsonl").read_text().splitlines() if l.strip()]
        epochs = [l for l in lines if l["kind"] == "epoch"]
        if not epochs:
            raise TrainingError(f"{self.out / 'metrics.jsonl'} holds no epoch line: the run directory is damaged")
        last = epochs[-1]
        summary = {"method": r.method, "model": r.model, "dataset": r.dataset, "epochs": r.epochs,
                   "primary": f"test_{self.task.primary}"}
        summary.update({k: v for k, v in last.items() if k.startswith(("test_", "train_")) and k != "train_seconds"})
        summary.update({
            "train_seconds": round(self.state["train_seconds"], 3),
            "steps": self.state["global_step"],
            "parameters": sum(p.numel() for p in self.model.parameters()),
            "device": str(self.device), "seed": r.seed,
            "processes": self.workers.world, "amp": r.amp,
            # CPU results can depend on it (convolution kernels split reductions per thread)
            "threads": torch.get_num_threads(),
            "config": self.cfg.to_dict(),
        })
        save_json(summary, self.out / "summary.json")
        return summary


def train(cfg: RunConfig, out: str | os.PathLike, *, data_dir: Path | None = None, progress: bool = True,
          workers: Workers | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Train from scratch into ``out``; returns the summary.

    ``out`` must not hold a run already, unless ``overwrite``. Under an initialised
    ``torch.distributed`` group (or with ``workers``) every rank calls this with the same arguments.
    """
    return Run(cfg, Path(out), data_dir=data_dir, progress=progress, workers=workers, overwrite=overwrite).fit(resume=False)


def resume(out: str | os.PathLike, *, data_dir: Path | None = None, progress: bool = True,
           device: str | None = None, workers: Workers | None = None) -> dict[str, Any]:
    """Continue the run in ``out`` from its last checkpoint; returns the summary.

    ``device`` runs it elsewhere than its configuration says (cpu, cuda...): the device is where a
    run computes, not what it computes, so the checkpoint still fits. Any number of processes
    may resume a run, whatever number started it.
    """
    out = Path(out)
    W = workers or Workers.current()

    def read() -> tuple[dict[str, Any], bool]:
        if not (out / "config.toml").exists():
            raise TrainingError(f"{out} holds no config.toml: it is not a bpfree run directory")
        return load_toml(out / "config.toml"), (out / "checkpoint.pt").exists()

    raw, has_checkpoint = W.on_root(read)
    cfg = resolve(raw)
    if device is not None:
        cfg.run.device = device
    # without a checkpoint the run had not finished its first one: start it again in place
    run = Run(cfg, out, data_dir=data_dir, progress=progress, workers=W, overwrite=not has_checkpoint)
    return run.fit(resume=has_checkpoint)
