"""Run options ``tf32``, ``cudnn_benchmark`` and ``deterministic``: torch's global switches, set for
one run and restored after it, and the platform a run records in ``summary.json``.

* ``tf32`` (default on, CUDA only): float32 matrix products (cuBLAS) and convolutions (cuDNN) run
  on TensorFloat-32 tensor cores, inputs rounded to 10 mantissa bits (unit roundoff ``2^-11``)
  and accumulated in float32: ``torch.backends.cuda.matmul.fp32_precision`` and
  ``torch.backends.cudnn.conv.fp32_precision`` = ``"tf32"`` (off: ``"ieee"``, full float32).
  On the CPU nothing is set: TF32 is a property of NVIDIA tensor cores.
* ``cudnn_benchmark`` (default on, CUDA only): cuDNN times its convolution algorithms for each
  new input shape and keeps the fastest (``torch.backends.cudnn.benchmark``); the choice can
  differ between processes, so it is off whenever ``deterministic`` is not ``off``.
* ``deterministic`` (``off``, ``warn``, ``on``): ``torch.use_deterministic_algorithms(True)``
  (``warn``: ``warn_only=True``, a non-deterministic op warns and runs), ``cudnn.deterministic``
  and, on CUDA, ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` in the environment, which cuBLAS reads when
  it starts (:func:`prepare_environment`, called before a run's first CUDA operation). With
  ``on`` an op that has no deterministic implementation stops the run with a one-line error
  naming it (:func:`refused_op`); on CUDA those include the backward of
  ``AdaptiveAvgPool2d`` (``resnet20``/``resnet56``'s global pool), of ``interpolate`` (bilinear),
  ``ReflectionPad``, ``histc``, ``bincount`` with weights, ``cumsum`` of floats, and on every
  device ``Tensor.put_`` without accumulation (torch's list:
  ``torch.use_deterministic_algorithms``). Same seed, same device, same software: the same
  weights, bit for bit, across processes and runs (also on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from typing import Any

import torch

#: What deterministic cuBLAS needs (NVIDIA: a fixed workspace per handle), set before CUDA starts.
CUBLAS_WORKSPACE = ":4096:8"
#: How torch words the refusal of an op without a deterministic implementation.
_REFUSAL = re.compile(r"^\s*(\S+) does not have a deterministic implementation, but you set "
                      r"'torch\.use_deterministic_algorithms\(True\)'")


def prepare_environment(run: Any, device: torch.device | str | None) -> None:
    """``CUBLAS_WORKSPACE_CONFIG`` for a deterministic CUDA run (left as it is when already set).

    cuBLAS reads it when its first handle is made, so it must be set before the process's first
    CUDA matrix product; the CLI and :class:`~bpfree.train.loop.Run` call this first thing.
    """
    if run.deterministic != "off" and device is not None and torch.device(device).type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)


def flags(run: Any, device: torch.device) -> dict[str, Any]:
    """The switches in effect for ``run`` on ``device``: what :func:`applied` sets and summaries record."""
    cuda = device.type == "cuda"
    return {"tf32": bool(run.tf32 and cuda),
            "cudnn_benchmark": bool(run.cudnn_benchmark and cuda and run.deterministic == "off"),
            "deterministic": run.deterministic}


@contextlib.contextmanager
def applied(run: Any, device: torch.device) -> Iterator[dict[str, Any]]:
    """Set the run's switches (:func:`flags`) for the block, then restore every one of them.

    On CUDA: TF32 for matmuls and convolutions, ``cudnn.benchmark``, ``cudnn.deterministic``; on
    every device: ``torch.use_deterministic_algorithms`` for ``deterministic`` = ``warn``/``on``.
    TF32 is set through the ``fp32_precision`` settings only (torch refuses to read its older
    ``allow_tf32`` flags once they are mixed).
    """
    b = torch.backends
    want = flags(run, device)
    saved = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if device.type == "cuda":
            prepare_environment(run, device)
            precision = "tf32" if want["tf32"] else "ieee"
            b.cuda.matmul.fp32_precision = precision
            b.cudnn.conv.fp32_precision = precision
            b.cudnn.benchmark = want["cudnn_benchmark"]
            b.cudnn.deterministic = run.deterministic != "off"
        if run.deterministic != "off":
            torch.use_deterministic_algorithms(True, warn_only=run.deterministic == "warn")
        yield want
    finally:
        matmul, conv, benchmark, cudnn_det, det, warn_only = saved
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = matmul, conv
        b.cudnn.benchmark, b.cudnn.deterministic = benchmark, cudnn_det
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


def refused_op(err: BaseException) -> str | None:
    """The op named by torch's refusal under ``use_deterministic_algorithms(True)``, else ``None``."""
    m = _REFUSAL.match(str(err))
    return m.group(1) if m else None


def refusal_message(op: str, device: torch.device) -> str:
    """The one-line error for an op that ``deterministic=on`` refused."""
    return (f"deterministic=on: {op} has no deterministic implementation on {device.type}, so the run stopped; "
            f"use deterministic=warn to run it anyway with a warning (results may then differ between runs), "
            f"or deterministic=off")


def platform(device: torch.device, run: Any) -> dict[str, Any]:
    """What a run computed on: the device, the GPU, torch/CUDA/cuDNN versions and the switches.

    On the CPU the GPU fields are ``None``; ``cuda``/``cudnn`` are the versions torch was built
    with (``None`` for a CPU-only build).
    """
    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info: dict[str, Any] = {"device": str(device), "gpu": None, "gpu_capability": None, "gpu_memory_gb": None,
                            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gb=round(props.total_memory / 2**30, 1))
    info.update(flags(run, device))
    return info

