"""Where a run computes, what updates its weights, and its random streams: device, optimizer, RNG states."""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import Workers, derived_seed
from .errors import TrainingError, as_training_error


def resolve_device(name: str, workers: Workers | None = None) -> torch.device:
    """The device of ``name``; under data parallelism on CUDA, ``cuda:LOCAL_RANK``.

    A CUDA device with an index becomes the process's current CUDA device
    (``torch.cuda.set_device``), so that whatever allocates on "the" GPU without naming it (cuBLAS
    and cuDNN handles, ``torch.cuda.synchronize()``, memory statistics, kernels of libraries) uses
    this one and not ``cuda:0``.
    """
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
            with as_training_error():
                dev = workers.cuda_device()
        elif dev.index is not None and dev.index >= torch.cuda.device_count():
            raise TrainingError(f"device {name!r} was asked for, but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s)")
        if dev.index is not None:
            torch.cuda.set_device(dev)
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


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's random states: the CPU's and, on CUDA, ``device``'s (one rank's, in a checkpoint)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def rng_states() -> dict[str, Any]:
    """The CPU's and every CUDA device's random states, as a checkpoint holds them."""
    return {"rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(ck: dict[str, Any], workers: Workers, device: torch.device, seed: int, step: int) -> None:
    """The random states of checkpoint ``ck`` back in place for this rank.

    Resumed on another number of processes than saved it: fresh, reproducible streams per rank
    (from ``seed``, the rank and the ``step`` reached).
    """
    W, ranks = workers, ck.get("rng_ranks")
    if not W.active:
        torch.set_rng_state(ck["rng_cpu"].cpu())
        if ck.get("rng_cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in ck["rng_cuda"]][: torch.cuda.device_count()])
    elif ranks is not None and len(ranks) == W.world:
        torch.set_rng_state(ranks[W.rank]["cpu"].cpu())
        if ranks[W.rank]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(ranks[W.rank]["cuda"].cpu(), device)
    else:
        torch.manual_seed(derived_seed(seed, W.rank, step))
