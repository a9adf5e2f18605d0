"""Shared fixtures: small synthetic tasks, so the fast tier needs no downloaded dataset.

Tests pin their device. Unless the run selects the ``gpu`` tests (``-m gpu``: ``make test-gpu``),
``CUDA_VISIBLE_DEVICES`` is emptied before anything starts CUDA, so this process and every one a
test launches (CLI subprocesses, the spawned data-parallel workers, which then use gloo) compute
on the CPU: device ``auto`` resolves to ``cpu`` and the expected values (bit-identical resumes,
single-process references) are the CPU's, whatever GPUs the machine has. In a run that does
select ``gpu`` tests, every test not marked ``gpu`` still sees ``torch.cuda.is_available()``
return False (the autouse fixture below). GPU tests are marked ``gpu`` and skip without CUDA.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest
import torch

from bpfree import tasks
from bpfree.options import option
from bpfree.tasks.vision import ClassificationTask


@dataclass
class BlobOptions:
    noise: float = option(0.5, "noise of the synthetic clusters")


def make_blobs(n: int, seed: int, noise: float = 0.5, dim: int = 16, classes: int = 4):
    """``n`` samples of ``dim`` features around ``classes`` fixed random centres."""
    g = torch.Generator().manual_seed(1234)
    centres = torch.randn(classes, dim, generator=g) * 2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = centres[y] + noise * torch.randn(n, dim, generator=g)
    return x, y


@tasks.register("blobs-test", "synthetic Gaussian clusters (tests only)", BlobOptions)
def _load_blobs(o: BlobOptions, data_dir, limit_train: int, limit_test: int) -> ClassificationTask:
    xtr, ytr = make_blobs(limit_train or 512, seed=1, noise=o.noise)
    xte, yte = make_blobs(limit_test or 256, seed=2, noise=o.noise)
    return ClassificationTask("blobs-test", (16,), 4, xtr, ytr, xte, yte)


def selects_gpu(markexpr: str) -> bool:
    """Whether ``-m EXPR`` asks for the ``gpu`` tests (``gpu``, ``gpu or slow``; not ``not gpu``)."""
    return re.search(r"(?<!not )\bgpu\b", markexpr) is not None


def pytest_configure(config):
    if not selects_gpu(config.getoption("markexpr") or ""):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this process and its children: the CPU
    else:  # deterministic cuBLAS for the GPU tests' bit-identical resumes, before CUDA starts
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """A test not marked ``gpu`` runs where CUDA is not available (``auto`` means the CPU)."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def blobs():
    return make_blobs(64, seed=3)


# The fast tier's tensors are tiny: one thread avoids thread start-up and contention costs (and
# gives bit for bit the kernels the tests' subprocesses use).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test (``--threads``) set."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)
