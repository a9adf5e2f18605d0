"""On a CUDA device (``make test-gpu``; skipped without one): the GPU computes what the CPU computes.

Expected values:

* one DFA or GrAPE step on the GPU fills the ``.grad`` of the same step on the CPU (same
  weights, ``B_l``, batch; GrAPE's feedback update off so ``B_l`` stays the CPU's; TF32 off), to
  a relative 1e-4 of each parameter's largest gradient (float32 kernels differ in their order of
  summation, not in what they sum);
* a run stopped mid-epoch and resumed on CUDA (``deterministic=on``) ends with exactly the
  weights of an uninterrupted CUDA run, as on the CPU;
* the hot path of a step makes no host synchronisation (``torch.cuda.set_sync_debug_mode("error")``
  stops at the first one);
* ``amp=bf16`` trains BP, DFA and GrAPE (BatchNorm nets included) with float32 weights.
"""

from __future__ import annotations

import io
import json

import pytest
import torch

from bpfree import gpu_check

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize("method,model", [("dfa", "mlp"), ("grape", "mlp"), ("dfa", "cnn"), ("grape", "cnn")])
def test_a_cuda_step_fills_the_cpu_steps_grad(method, model):
    assert gpu_check.step_parity(CUDA, method, model) <= 1e-4


def test_gpu_checks_resume_of_grape_is_bit_identical(tmp_path):
    c = gpu_check.Checker(CUDA, quick=True, root=tmp_path, out=io.StringIO())
    assert "bit-identical" in gpu_check.resume_matches(c)


@pytest.mark.parametrize("method", ["bp", "grape"])
def test_resume_of_a_batchnorm_cnn_on_cuda_is_bit_identical(tmp_path, method):
    from bpfree.train import loop

    cfg = gpu_check.config("cnn", method, CUDA, True, 8, checkpoint_every=3, deterministic="on")
    full = loop.Run(cfg, tmp_path / "full", progress=False)
    full.fit()
    part = loop.Run(cfg, tmp_path / "part", progress=False)
    real, calls = part.optimizer.step, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] > 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    part.optimizer.step = step
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    summary = loop.resume(tmp_path / "part", progress=False)
    got = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["model"]
    for k, v in full.model.state_dict().items():
        assert torch.equal(got[k], v.cpu()), k
    assert summary["platform"]["gpu"] == torch.cuda.get_device_name(CUDA)
    assert summary["platform"]["deterministic"] == "on" and summary["platform"]["cudnn_benchmark"] is False


@pytest.mark.parametrize("model,method", [("mlp", "dfa"), ("mlp", "grape"), ("transformer", "grape"),
                                          ("cnn", "grape")])
def test_no_host_sync_in_the_hot_path_on_cuda(tmp_path, model, method):
    c = gpu_check.Checker(CUDA, quick=True, root=tmp_path, out=io.StringIO())
    assert "without a host sync" in gpu_check.sync_free_steps(c, model, method)


@pytest.mark.parametrize("method", ["bp", "dfa", "grape"])
@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_bf16_trains_on_cuda(tmp_path, model, method):
    c = gpu_check.Checker(CUDA, quick=True, root=tmp_path, out=io.StringIO())
    figures = gpu_check.train_steps(c, model, method, "bf16")
    assert "ms/step" in figures
    summary = json.loads((tmp_path / f"steps-{model}-{method}-bf16" / "summary.json").read_text())
    assert summary["amp"] == "bf16" and summary["platform"]["tf32"] is True


def test_cuda_bench_times_with_events(tmp_path):
    from bpfree import bench

    cfgs = bench.configs(["bp", "dfa"], {}, ["widths=256"], {"model": "mlp", "dataset": "synthetic",
                                                           "batch_size": 64, "device": "cuda"})
    rows = bench.bench(cfgs, repeats=3, warmup=1, memory=True, progress=False)
    assert all(r["median_ms"] > 0 and r["peak_mem_mb"] >= 0 and r["peak_reserved_mb"] is not None for r in rows)
    assert "CUDA-event timing" in bench.table(rows, cfgs[0], 3)
