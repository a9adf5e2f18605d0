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
  ``optimizer.step()`` on identical gradients. With the run option ``overlap_reduction`` the
  buckets (smaller ones, in the order backward fills them) are all-reduced asynchronously as soon
  as backward has produced their gradients, while it still runs for the blocks before them
  (:class:`OverlappedReduction`): the same sums, and a step whose method changes ``.grad`` after
  its bucket left (a second backward call, an in-place rescale) is reduced again from the final
  gradients.
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
#: Bucket size of the overlapped reduction (run option ``overlap_reduction``), in bytes: small
#: enough that the first buckets are ready while most of the backward pass is still to run.
OVERLAP_BUCKET_BYTES = 4 * 2**20
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
                flat = flatten(group, weight)
                dist.all_reduce(flat)
                unflatten(flat, group)

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


def flatten(tensors: list[torch.Tensor], weight: float = 1.0) -> torch.Tensor:
    """``weight * cat(t.reshape(-1) for t in tensors)``: a new ``(sum numel,)`` tensor."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    return flat.mul_(weight) if weight != 1.0 else flat


def unflatten(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """In place: each of ``tensors`` takes its slice of ``flat`` (the inverse of :func:`flatten`)."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


class OverlappedReduction:
    """``.grad`` all-reduced bucket by bucket while the backward pass still runs (run option
    ``overlap_reduction``), to the same result as :meth:`Workers.reduce_gradients`.

    Every ``.grad`` becomes ``sum_r w_r g_r`` (``g_r`` rank ``r``'s gradient, ``w_r = n_r / m``
    its share of the batch, given to :meth:`begin`), every floating buffer the same weighted sum.

    **Buckets.** The parameters that require grad, in reverse registration order (the order
    backward usually produces their gradients), cut into runs of one device and dtype of at most
    ``bucket_bytes`` bytes (a larger parameter alone; default :data:`OVERLAP_BUCKET_BYTES`). A
    post-accumulate-grad hook on each parameter marks it done; when every parameter of a bucket
    is done and every bucket before it has been launched, the bucket is flattened
    (``flat = w_r * cat(g.reshape(-1))``, shape ``(sum numel,)``) and ``all_reduce(flat,
    async_op=True)`` is launched. Buckets leave strictly in index order, so every rank issues the
    same collectives in the same order whatever order its hooks fire in.

    **A step** is ``begin(weight)``, the method's step, :meth:`finish`. ``finish`` launches the
    buckets not launched yet with the gradients that are there (a method that assigns ``.grad``
    fires no hook; a parameter without ``.grad`` is left out, as ``reduce_gradients`` leaves it),
    waits for every bucket and writes the sums back into ``.grad``; then the gradients of
    parameters that do not require grad (if any have one) and the floating buffers are reduced
    synchronously. Outside ``begin`` ... ``finish`` the hooks do nothing (diagnostics run
    backward on rank 0 alone); :meth:`abort` ends a step whose method raised.

    **Gradients that change after their bucket left** (a second backward call adding to a
    launched bucket's ``.grad``: its hook fires again; a gradient assigned anew or scaled in place
    after backward: another tensor, or its version counter moved) make that bucket's sum stale.
    The ranks agree on whether any of them saw such a change (a one-element all-reduce, on the CPU
    where the group has gloo, after every bucket has left), so no rank's collectives can get out
    of step with another's; if one did, the buckets' sums are dropped and every gradient is
    reduced again from its final value, synchronously: a step that is not overlappable is still
    exact. ``stats``: ``steps``, ``buckets`` launched, ``early`` (launched by a hook, during
    backward) and ``fallbacks``.

    ``all_reduce``: the collective, called as ``all_reduce(t)`` (in place, synchronous) or
    ``all_reduce(t, async_op=True)`` (returns a handle with ``wait()``); default
    :func:`torch.distributed.all_reduce` (tests give a fake one). The hooks are registered here
    and removed by :meth:`close` (or at the end of a ``with`` block).
    """

    def __init__(self, model: torch.nn.Module, bucket_bytes: int | None = None,
                 all_reduce: Callable[..., Any] | None = None, flag_device: torch.device | str | None = None) -> None:
        self.model = model
        self.bucket_bytes = int(bucket_bytes or OVERLAP_BUCKET_BYTES)
        self._all_reduce = all_reduce or dist.all_reduce
        trained = [p for p in model.parameters() if p.requires_grad]
        self.buckets: list[list[torch.Tensor]] = []
        size = 0
        for p in reversed(trained):
            last = self.buckets[-1] if self.buckets else None
            nbytes = p.numel() * p.element_size()
            if last is None or (p.device, p.dtype) != (last[0].device, last[0].dtype) or size + nbytes > self.bucket_bytes:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += nbytes
        self._bucket_of = {id(p): i for i, bucket in enumerate(self.buckets) for p in bucket}
        self._untrained = [p for p in model.parameters() if not p.requires_grad]
        if flag_device is None:
            flag_device = "cpu" if all_reduce is not None or "gloo" in str(dist.get_backend()) else (
                trained[0].device if trained else "cpu")
        self._flag_device = torch.device(flag_device)
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in trained]
        self.stats = {"steps": 0, "buckets": 0, "early": 0, "fallbacks": 0}
        self.weight, self._active = 1.0, False
        self._reset()

    def _reset(self) -> None:
        self._done: list[set[int]] = [set() for _ in self.buckets]
        #: per launched bucket: (its (param, grad, grad version) triples, flat, work handle)
        self._launched: list[tuple[list[tuple[torch.Tensor, torch.Tensor, int]], torch.Tensor | None, Any] | None] = \
            [None] * len(self.buckets)
        self._next = 0
        self._stale = False

    def begin(self, weight: float) -> None:
        """Start a step in which this rank's gradients count with ``weight`` (its share of the batch)."""
        self._reset()
        self.weight = float(weight)
        self._active = True

    def _on_grad(self, p: torch.Tensor) -> None:
        if not self._active:
            return
        b = self._bucket_of.get(id(p))
        if b is None:
            return
        if self._launched[b] is not None:  # a later backward call adds to a sum already on its way
            self._stale = True
            return
        self._done[b].add(id(p))
        while self._next < len(self.buckets) and len(self._done[self._next]) == len(self.buckets[self._next]):
            self._launch(self._next)
            self.stats["early"] += 1

    def _launch(self, b: int) -> None:
        with torch.no_grad():
            entries = [(p, p.grad, p.grad._version) for p in self.buckets[b] if p.grad is not None]
            flat = work = None
            if entries:
                flat = flatten([g for _, g, _ in entries], self.weight)
                work = self._all_reduce(flat, async_op=True)
                self.stats["buckets"] += 1
        self._launched[b] = (entries, flat, work)
        self._next = b + 1

    def finish(self) -> None:
        """Launch what is left, wait, and write ``sum_r w_r g_r`` into every ``.grad`` (and buffer)."""
        if not self._active:
            raise RuntimeError("OverlappedReduction.finish() without begin()")
        self._active = False
        while self._next < len(self.buckets):
            self._launch(self._next)
        stale = self._stale
        for b, (entries, _, work) in enumerate(self._launched):
            if work is not None:
                work.wait()
            have = {id(p) for p, _, _ in entries}
            stale = stale or any(p.grad is not g or g._version != v for p, g, v in entries) \
                or any(p.grad is not None for p in self.buckets[b] if id(p) not in have)
        flag = torch.tensor([float(stale)], device=self._flag_device)
        self._all_reduce(flag)
        with torch.no_grad():
            if bool(flag.item()):  # some rank's gradients moved after they left: reduce them all again
                self.stats["fallbacks"] += 1
                for bucket in self.buckets:
                    self._reduce_now([p.grad for p in bucket if p.grad is not None])
            else:
                for entries, flat, _ in self._launched:
                    if entries:
                        unflatten(flat, [g for _, g, _ in entries])
            rest = [p.grad for p in self._untrained if p.grad is not None]
            rest += [t for t in self.model.buffers() if t.is_floating_point()]
            self._reduce_now(rest)
        self.stats["steps"] += 1
        self._reset()

    def _reduce_now(self, tensors: list[torch.Tensor]) -> None:
        """Synchronously, in place: ``t <- sum_r w_r t_r``, one collective per (device, dtype)
        group of at most ``bucket_bytes`` bytes."""
        groups: dict[tuple, list[list[torch.Tensor]]] = {}
        for t in tensors:
            runs = groups.setdefault((t.device, t.dtype), [[]])
            if runs[-1] and sum(x.numel() * x.element_size() for x in runs[-1]) + t.numel() * t.element_size() \
                    > self.bucket_bytes:
                runs.append([])
            runs[-1].append(t)
        for runs in groups.values():
            for run in runs:
                if run:
                    flat = flatten(run, self.weight)
                    self._all_reduce(flat)
                    unflatten(flat, run)

    def abort(self) -> None:
        """End a step without reducing (its method raised); buckets on their way are waited for."""
        self._active = False
        for launched in self._launched:
            if launched is not None and launched[2] is not None:
                with contextlib.suppress(Exception):
                    launched[2].wait()
        self._reset()

    def close(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._active = False

    def __enter__(self) -> "OverlappedReduction":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StageWorkers(Workers):
    """The processes of a pipeline, one stage each (:mod:`bpfree.pipeline`): every stage takes the
    whole batch, no gradient is reduced (each rank steps its own parameters), and a step's figures
    (the last stage's, broadcast) are the same on every rank, so sums over ranks are the values."""

    def check_batch_size(self, batch_size: int) -> None:
        pass

    def check_last_batch(self, last: int) -> None:
        pass

    def shard(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, bool]:
        return x, y, 1.0, True

    def sum_dict(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return dict(values)

    def reduce_gradients(self, model: torch.nn.Module, weight: float) -> None:
        pass

    def sync_state(self, method: Any, device: torch.device | str, *, warn: bool = False) -> bool:
        return False


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
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
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
        # every rank is done before any tears its connections down: a peer that closes them while
        # another still finishes its last messages can make that one's transport threads abort
        if dist.is_initialized():
            dist.barrier()
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
