"""Shared fixtures: small synthetic tasks, so the fast tier needs no downloaded dataset."""

from __future__ import annotations

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
