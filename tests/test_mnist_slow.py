"""Slow tier: the demo's promise on real MNIST (one epoch, the demo MLP)."""

import pytest

from bpfree.train.config import load_toml, resolve
from bpfree.train.loop import train

THRESHOLDS = {"bp": 0.96, "dfa": 0.94, "grape": 0.94}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(THRESHOLDS))
def test_one_epoch_of_mnist_reaches_the_promised_accuracy(tmp_path, method):
    base = load_toml("experiments/demo.toml")
    summary = train(resolve(base, overrides={"method": method}), tmp_path, progress=False)
    assert summary["test_accuracy"] >= THRESHOLDS[method]
