"""Data-parallel training over ``torch.distributed``: the scheme, the process group, the collectives.

The scheme
----------
``W`` processes ("workers", ranks ``0..W-1``) train one model together; every method trains this
way unchanged, because the loop works on ``.grad`` and never asks which method runs:

* **Same start.** Every rank builds the task, model, method and optimizer from the same
  configuration and seed; rank 0's weights and buffers are then broadcast once, so all ranks
  start from bit-identical weights whatever the initialisation did.
* **Disjoint shards of one global batch.** ``batch_size`` is the *global* batch: each rank takes
  the same global batch ``(seed, epoch, index)`` from the task (a pure function of those three
  numbers) and keeps its own contiguous slice, ``batch_size / W`` samples (``batch_size`` must be
  divisible by ``W``). A shorter last batch of ``m`` samples is split as evenly as possible
  (sizes differ by at most one; ``m < W`` is refused before training).
* **One step.** Each rank runs ``method.step`` on its shard (the loss is the mean over the shard),
  then the loop all-reduces every parameter's ``.grad`` in flattened buckets, each rank's
  gradient weighted by its share ``n_r / m`` of the batch: ``sum_r (n_r / m) g_r`` is exactly
  the gradient of the mean loss over the global batch (for equal shards: the plain average).
  This holds for BP and for the DFA family: DFA's ``e = dL/dy`` carries ``1/n_r`` per sample,
  so ``B_l e`` and every weight gradient are shard means, and their weighted sum is the
  global-batch mean. Floating-point buffers (BatchNorm running statistics) are averaged the
  same way, so the model stays identical on every rank. Then every rank runs
  ``optimizer.step()`` on identical gradients.
* **Method state.** The loop sets ``method.average_across_workers`` to an all-reduce mean; a
  method that keeps batch statistics of its own passes them through it (GrAPE's Jacobian
  estimates: each rank estimates on its own shard's sub-batch, the estimates are averaged, so
  ``Jbar`` and hence every ``B_l`` stay identical on all ranks; the estimate pools
  ``W x samples`` inputs instead of ``samples``). Every rank draws its own tangents
  (``method.worker_rank``, :meth:`bpfree.methods.base.Method.tangent_generator`: a stream seeded
  from the method's seed, the rank and the step), so the pooled estimate averages ``W``
  independent draws; the method's shared generator, which makes ``B_l`` and GrAPE's noise, draws
  the same on every rank. At every checkpoint and after an uneven last batch the ranks compare a
  fingerprint of the method's state and, where it differs, take rank 0's: after an uneven batch
  that may be expected (a method whose state follows its shard's size); at a checkpoint it means
  the method keeps shard statistics it does not average (DKP's feedback matrices, today), and a
  warning names it.
  Such a method still trains (its weights stay identical on all ranks, since gradients are
  averaged), but its state between checkpoints is each rank's own.
* **Rank 0 writes.** ``config.toml``, ``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json``
  are written by rank 0 alone; logged losses and epoch metrics are reduced over all ranks
  (they describe the global batch). Evaluation runs on rank 0 and its result is broadcast;
  diagnostics run on rank 0 (with ``average_across_workers`` the identity meanwhile).
* **Resume anywhere.** A checkpoint holds one copy of the (identical) model, optimizer and
  method states, the epoch sums reduced over ranks and every rank's RNG state; it resumes on
  any number of processes (rank 0 reads it and broadcasts it). On the same number it continues
  bit-identically; on another number the shards, and so the floating-point sums, differ.

Errors that one rank detects before or between collectives (an unwritable run directory, a
corrupt checkpoint, a non-finite loss) are agreed on by all ranks, so every process stops with
the same message instead of waiting forever. A rank that dies leaves the others waiting in a
collective for at most the run option ``dist_timeout`` (default :data:`TIMEOUT_S` seconds; NCCL's own
default is ten minutes), after which their process group fails.

Launching: ``torchrun --nproc_per_node W -m bpfree.cli train ...`` (the CLI joins the group
that torchrun describes in the environment), or ``bpfree train --nproc W ...``, which spawns
the ``W`` processes itself on this machine (:func:`spawn`, a free port on 127.0.0.1). Backends:
gloo for a CPU run; ``cpu:gloo,cuda:nccl`` for a CUDA run, where each process uses
``cuda:LOCAL_RANK`` (at most one process per GPU), set as its current device before the group
is made and given to ``init_process_group`` as ``device_id`` (NCCL binds its communicator to it
at once instead of guessing a device at the first collective).

What equals what: BP and DFA on ``W`` processes end with the weights of one process on the same
global batches, to float rounding (``tests/test_distributed.py`` checks ``atol=1e-5``). GrAPE
keeps ``B_l`` identical on every rank, but its estimate pools the ranks' sub-batches, so its
feedback matrices (hence weights) follow another trajectory than one process's; with the
feedback update off (``eta=0, noise=0``) it, too, ends with the single-process weights.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import socket
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist

#: Gradient bucket size for the all-reduce, in bytes.
BUCKET_BYTES = 32 * 2**20
#: Seconds a collective waits for the other ranks before the process group fails (run option dist_timeout).
TIMEOUT_S = 300.0


class DistributedError(RuntimeError):
    """A data-parallel set-up that cannot work (batch size, device, launch)."""


class Workers:
    """The data-parallel group this process belongs to.

    ``Workers()`` is one process alone (rank 0 of 1): every collective is the identity, so the
    single-process loop runs the very same code. :meth:`current` describes the initialised
    default process group, if any.
    """

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world, self.local_rank = int(rank), int(world), int(local_rank)

    @classmethod
    def current(cls) -> "Workers":
        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
            return cls(rank, world, int(os.environ.get("LOCAL_RANK", rank)))
        return cls()

    @property
    def active(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Workers(rank={self.rank}, world={self.world}, local_rank={self.local_rank})"

    # -- sharding ---------------------------------------------------------------------------
    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise DistributedError(
                f"batch_size {batch_size} is the global batch and must divide evenly over the {self.world} "
                f"processes; choose a multiple of {self.world}"
            )

    def check_last_batch(self, last: int) -> None:
        """Refuse an epoch whose last batch (of ``last`` samples) would leave some rank without a sample."""
        if self.active and last < self.world:
            raise DistributedError(
                f"the last batch of each epoch holds {last} sample(s), fewer than the {self.world} processes: "
                f"some would get none. Change limit_train or batch_size"
            )

    def cuda_device(self) -> torch.device:
        """``cuda:LOCAL_RANK``, this process's own GPU; refused when the machine has too few."""
        if self.local_rank >= torch.cuda.device_count():
            raise DistributedError(f"process LOCAL_RANK={self.local_rank} has no GPU of its own: this machine has "
                                   f"{torch.cuda.device_count()}; start at most that many processes per machine")
        return torch.device("cuda", self.local_rank)

    def shard_range(self, n: int) -> tuple[int, int]:
        """``[start, stop)`` of this rank's slice of a batch of ``n`` (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        """``(x_r, y_r, weight, even)``: this rank's slice, its share ``n_r / n``, whether all are equal."""
        if not self.active:
            return x, y, 1.0, True
        n = x.shape[0]
        start, stop = self.shard_range(n)
        return x[start:stop], y[start:stop], (stop - start) / n, n % self.world == 0

    # -- collectives --------------------------------------------------------------------------
    def all_reduce_weighted(self, tensors: Iterable[torch.Tensor], weight: float) -> None:
        """In place: every tensor becomes ``sum_r weight_r * tensor_r`` (flattened buckets)."""
        if not self.active:
            return
        buckets: dict[tuple, list[list[torch.Tensor]]] = {}
        for t in tensors:
            key = (t.device, t.dtype)
            groups = buckets.setdefault(key, [[]])
            size = sum(x.numel() * x.element_size() for x in groups[-1])
            if groups[-1] and size + t.numel() * t.element_size() > BUCKET_BYTES:
                groups.append([])
            groups[-1].append(t)
        for groups in buckets.values():
            for group in groups:
                flat = torch.cat([t.reshape(-1) for t in group])
                if weight != 1.0:
                    flat.mul_(weight)
                dist.all_reduce(flat)
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def average(self, t: torch.Tensor) -> torch.Tensor:
        """The mean of ``t`` over ranks (a new tensor of ``t``'s dtype; reduced in float32 or wider)."""
        if not self.active:
            return t
        wide = t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32).clone()
        dist.all_reduce(wide)
        return wide.div_(self.world).to(t.dtype)

    def sum_dict(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sums over ranks of 0-d tensors (one collective; same keys on every rank)."""
        if not self.active or not values:
            return dict(values)
        keys = sorted(values)
        device = values[keys[0]].device
        stacked = torch.stack([values[k].detach().to(device=device, dtype=torch.float64) for k in keys])
        dist.all_reduce(stacked)
        return {k: stacked[i].to(values[k].dtype) for i, k in enumerate(keys)}

    def gather_tensor(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``[t from rank 0, t from rank 1, ...]`` (same shape and dtype on every rank)."""
        if not self.active:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t.contiguous())
        return out

    def broadcast_tensors(self, tensors: Iterable[torch.Tensor]) -> None:
        """In place: every tensor takes rank 0's value."""
        if not self.active:
            return
        for t in tensors:
            dist.broadcast(t, 0)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; tensors arrive on the CPU)."""
        if not self.active:
            return obj
        box = [to_device(obj, "cpu") if self.is_root else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """``[obj from rank 0, obj from rank 1, ...]`` on every rank (pickled)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, to_device(obj, "cpu"))
        return out

    def on_root(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on rank 0 only; every rank returns its result or raises its exception.

        Other ranks re-raise the very exception rank 0 raised (marked ``replica = True``, so the
        CLI prints it once).
        """
        if not self.active:
            return fn(*args, **kwargs)
        outcome: tuple[bool, Any] = (True, None)
        if self.is_root:
            try:
                outcome = (True, fn(*args, **kwargs))
            except Exception as err:  # handed to every rank below
                outcome = (False, err)
        try:
            ok, value = self.broadcast(outcome)
        except Exception:  # rank 0's exception (or result) could not be pickled
            if self.is_root and not outcome[0]:
                raise outcome[1]
            raise
        if ok:
            return value
        if self.is_root:
            raise outcome[1]
        try:
            value.replica = True
        except Exception:
            pass
        raise value

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # -- the training step ----------------------------------------------------------------------
    def check_same_grads(self, params: Iterable[torch.Tensor], method: str) -> None:
        """Refuse a method that fills ``.grad`` of different parameters on different ranks."""
        params = list(params)
        if not self.active or not params:
            return
        mask = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
        self.all_reduce_weighted([mask], 1.0)
        if bool(((mask != 0) & (mask != self.world)).any()):
            raise DistributedError(
                f"method {method!r} filled .grad of different parameters on different processes; "
                f"data parallel training needs the same set on every rank"
            )

    def reduce_gradients(self, model: torch.nn.Module, weight: float) -> None:
        """``.grad`` and floating buffers of ``model`` become the batch-share-weighted sums over ranks."""
        tensors = [p.grad for p in model.parameters() if p.grad is not None]
        tensors += [b for b in model.buffers() if b.is_floating_point()]
        self.all_reduce_weighted(tensors, weight)

    def sync_state(self, method: Any, device: torch.device | str, *, warn: bool = False) -> bool:
        """Make ``method``'s state rank 0's if it differs anywhere (one fingerprint gather); whether it differed.

        ``warn``: say so (rank 0, as a ``RuntimeWarning``): a method whose state should agree keeps
        batch statistics it does not pass through ``average_across_workers``.
        """
        if not self.active:
            return False
        sums = self.gather_tensor(state_checksum(method.state_dict()).to(device))
        if all(bool(s == sums[0]) for s in sums):
            return False
        if warn and self.is_root:
            warnings.warn(
                f"method {method.name!r} keeps state that differs across the {self.world} processes (batch "
                f"statistics not passed through average_across_workers); rank 0's state is broadcast at every "
                f"checkpoint and after uneven batches", RuntimeWarning,
            )
        state = self.broadcast(method.state_dict() if self.is_root else None)
        if not self.is_root:
            method.load_state_dict(to_device(state, device))
        return True


def to_device(obj: Any, device: torch.device | str) -> Any:
    """``obj`` (nested dicts, lists, tuples) with every tensor moved to ``device``.

    ``uint8`` tensors (random generator states) always go to the CPU, where ``set_state`` wants them.
    """
    if isinstance(obj, torch.Tensor):
        return obj.cpu() if obj.dtype == torch.uint8 else obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_device(v, device) for v in obj]
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(to_device(v, device) for v in obj)
    return obj


def state_checksum(obj: Any) -> torch.Tensor:
    """A float64 fingerprint of the tensors and numbers in a (nested) state, to compare across ranks."""
    h = hashlib.blake2b(digest_size=8)

    def walk(o: Any) -> None:
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())

    walk(obj)
    return torch.tensor(float(int.from_bytes(h.digest()[:6], "little")), dtype=torch.float64)


def derived_seed(seed: int, *parts: int) -> int:
    """A 63-bit seed from ``seed`` and ``parts`` (stable across processes and runs)."""
    text = ":".join(str(int(p)) for p in (seed, *parts))
    return int.from_bytes(hashlib.blake2b(f"bpfree-worker:{text}".encode(), digest_size=8).digest(), "little") >> 1


# ----------------------------------------------------------------------------- process group


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def uses_cuda(device: str | None) -> bool:
    """Whether a run on ``device`` (``None`` or ``"auto"``: CUDA when present) computes on CUDA."""
    if device in (None, "auto"):
        return torch.cuda.is_available()
    return str(device).startswith("cuda")


def backend(device: str | None = None) -> str:
    """gloo for a CPU run; gloo for CPU tensors plus NCCL for CUDA tensors for a CUDA run."""
    if uses_cuda(device) and torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


@contextlib.contextmanager
def from_environment(device: str | None = None, timeout: float | None = None) -> Iterator[Workers]:
    """Join the process group described by ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``.

    What torchrun (and :func:`spawn`) set. Without them, or with ``WORLD_SIZE=1``, or when a group
    is already initialised, nothing is set up (and nothing torn down). ``device``: the run's device
    option; a CUDA run gets NCCL for its CUDA tensors and ``cuda:LOCAL_RANK`` as current device
    and as the group's ``device_id``. ``timeout``: seconds a collective (and joining the group)
    waits for the other ranks before failing (default :data:`TIMEOUT_S`).
    """
    world = env_world_size()
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        yield Workers.current()
        return
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise DistributedError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: launch with torchrun or --nproc")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    chosen = backend(device)
    options: dict[str, Any] = {"timeout": datetime.timedelta(seconds=TIMEOUT_S if timeout is None else timeout)}
    if "nccl" in chosen:
        gpu = Workers(int(os.environ["RANK"]), world, local_rank).cuda_device()
        torch.cuda.set_device(gpu)
        options["device_id"] = gpu
    dist.init_process_group(backend=chosen, init_method="env://", **options)
    try:
        yield Workers.current()
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, nproc: int, port: int, device: str | None, timeout: float | None,
             fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    with from_environment(device, timeout):
        fn(*args)


def spawn(nproc: int, fn: Callable[..., Any], *args: Any, device: str | None = "cpu",
          timeout: float | None = None) -> None:
    """Run ``fn(*args)`` in ``nproc`` new processes joined in one process group on this machine.

    ``fn`` must be importable by name (a module-level function); ``device`` picks the backend
    (:func:`backend`); ``timeout``: see :func:`from_environment`. Raises
    ``torch.multiprocessing.ProcessExitedException`` / ``ProcessRaisedException`` when a process
    fails (the others are stopped).
    """
    if nproc < 1:
        raise DistributedError(f"--nproc must be at least 1, got {nproc}")
    torch.multiprocessing.spawn(_spawned, args=(nproc, free_port(), device, timeout, fn, args), nprocs=nproc,
                                join=True)
