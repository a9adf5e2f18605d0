"""The benchmark harness: what a timed sample is, and a memory figure that means something."""

import pytest

from bpfree import bench


def _configs(methods, sets=()):
    return bench.configs(methods, {}, ["widths=32", *sets], {"model": "mlp", "dataset": "blobs-test", "batch_size": 16})


@pytest.fixture
def fake_step_times(monkeypatch):
    """one_step returns 4 s on every 3rd call of a contender (its dear step), else 1 s."""
    calls: dict[str, int] = {}

    def fake(c, task, x, y, device):
        calls[c.name] = calls.get(c.name, 0) + 1
        return 4.0 if calls[c.name] % 3 == 1 else 1.0

    monkeypatch.setattr(bench, "one_step", fake)


def test_a_sample_is_the_mean_over_the_longest_method_period(fake_step_times):
    # GrAPE with every=3 has period 3, so samples are means over 3 consecutive steps: each holds
    # exactly one dear step, (4 + 1 + 1) / 3 = 2 s, for every method (warm-up is whole periods).
    cfgs = _configs(["bp", "grape"], ["grape.every=3"])
    times, group = bench.time_methods(cfgs, repeats=5, warmup=2, progress=False)
    assert group == 3
    assert times == {"bp": [2.0] * 5, "grape": [2.0] * 5}


def test_single_steps_when_asked(fake_step_times):
    # group=1: the samples are the raw steps, 4 s once in three, else 1 s; the median is 1 s.
    cfgs = _configs(["bp", "grape"], ["grape.every=3"])
    rows = bench.bench(cfgs, repeats=6, warmup=1, memory=False, progress=False, group=1)
    assert [(r["median_ms"], r["ratio_to_bp"]) for r in rows] == [(1000.0, 1.0), (1000.0, 1.0)]
    assert all(r["steps_per_sample"] == 1 for r in rows)


@pytest.mark.slow  # the measurement runs in a fresh process, on MNIST batches (make data)
def test_peak_memory_is_repeatable_and_grows_with_the_optimizer_state():
    # Adam adds a gradient and two moment buffers per weight: 12 bytes per parameter. Going from
    # one hidden layer of 256 to one of 1024 adds (1024 - 256) * (784 + 1 + 10) parameters.
    small, again = (bench.peak_memory_mb(c) for c in _mnist_like(256) * 2)
    (big,) = (bench.peak_memory_mb(c) for c in _mnist_like(1024))
    assert abs(small - again) < 0.3
    expected = 12 * (1024 - 256) * (784 + 1 + 10) / 2**20
    assert big - small == pytest.approx(expected, rel=0.2)


def _mnist_like(width):
    return bench.configs(["bp"], {}, [f"widths={width}"], {"model": "mlp", "dataset": "mnist", "batch_size": 16})


def test_the_bench_steps_under_the_runs_amp_and_reads_its_data_dir(monkeypatch, tmp_path):
    # amp=bf16 must time what training runs: method.step inside torch.autocast in bfloat16 (the
    # loss as the loop scales it), and --data-dir must reach the dataset loader.
    import torch

    from bpfree import methods, tasks

    seen, dirs = [], []
    real_step = methods.get("bp").step

    def recording_step(self, x, y, loss_fn):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return real_step(self, x, y, loss_fn)

    real_load = tasks.load

    def recording_load(name, options, data_dir, *args, **kwargs):
        dirs.append(data_dir)
        return real_load(name, options, data_dir, *args, **kwargs)

    monkeypatch.setattr(methods.get("bp"), "step", recording_step)
    monkeypatch.setattr(tasks, "load", recording_load)
    for amp, expect in (("bf16", (True, torch.bfloat16)), ("none", (False,))):
        seen.clear()
        bench.bench(_configs(["bp"], [f"amp={amp}"]), repeats=2, warmup=1, memory=False, progress=False,
                    data_dir=tmp_path)
        assert seen and all(s[: len(expect)] == expect for s in seen), (amp, seen)
    assert dirs and all(d == tmp_path for d in dirs)
