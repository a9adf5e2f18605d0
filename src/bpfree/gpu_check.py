"""``make gpu-check`` (``python -m bpfree.gpu_check``): what a GPU run depends on, checked in one go.

On a machine with a CUDA GPU and nothing but this repository (no dataset: the data are
:mod:`~bpfree.tasks.synthetic`, of the real shapes), in a few minutes (at most 8; a check that
would start after :data:`BUDGET_S` is reported as skipped):

1. ``steps``: BP, DFA and GrAPE on mlp (3 x 1024), cnn, vgg16, resnet20 (CIFAR-shaped, augmented)
   and the Transformer (PTB-shaped), without and with ``amp=bf16``, through the training loop
   (:class:`~bpfree.train.loop.Run`): the steps of one epoch, its epoch line and a finite loss;
   ms per step (wall time of the steps after the first quarter, which pay for cuDNN's
   benchmarks and lazy set-up, the device drained at both ends), the loss of the first and last
   logged step, peak memory allocated / reserved.
2. ``parity``: one DFA step and one GrAPE step (feedback update off, so ``B_l`` stays the CPU's)
   on the GPU fill the ``.grad`` of the CPU step on the same weights, ``B_l`` and batch, with
   TF32 off, to a relative 1e-4 (mlp and cnn).
3. ``syncs``: steps of DFA and GrAPE (mlp, transformer) under
   ``torch.cuda.set_sync_debug_mode("error")``: any operation in the hot path that makes the
   host wait for the GPU stops it (the first steps, which make ``B_l``, are left out).
4. ``bench``: :func:`bpfree.bench.bench` of bp, dfa, grape on the 3 x 1024 MLP and on vgg16
   (CUDA-event timing), printed as ``bpfree bench`` prints it.
5. ``resume``: a GrAPE run stopped after 5 steps and resumed on the GPU (``deterministic=on``)
   ends with the weights of the uninterrupted run, bit for bit.
6. ``ddp``: with two GPUs, two processes (NCCL) train GrAPE: identical weights and ``B_l`` on both
   ranks, different tangents.
7. ``streams``: DFA and GrAPE with ``parallel=streams`` (every block on its own CUDA stream) fill
   the ``.grad`` of the sequential step to a relative 1e-5, and the ms per step of both (the
   median of 5 groups of 10 steps after 5, the device drained around each group) on the MLP and
   the Transformer.
8. ``pipeline``: with two GPUs, a 2-stage DFA pipeline (NCCL, one GPU per stage) ends with the
   weights of one process on the same batches (TF32 off, relative 1e-4).

Then one table of every check. Exit status 0 when every check passed (or was skipped), 1 when
one failed. Without a GPU it prints one "no GPU" line and exits 0. ``--device cpu --quick``
runs the same pieces on the CPU, small and short (the test suite does; ``ddp`` then uses gloo);
``--only``, ``--models`` and ``--methods`` pick a part.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

#: Seconds after which no further check is started (the whole script stays within 8 minutes).
BUDGET_S = 420.0

MODELS = ("mlp", "cnn", "vgg16", "resnet20", "transformer")
METHODS = ("bp", "dfa", "grape")


@dataclass
class Row:
    check: str
    setting: str
    result: str = "ok"
    seconds: float = 0.0
    figures: str = ""


@dataclass
class Checker:
    device: torch.device
    quick: bool
    root: Path
    rows: list[Row] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    out: Any = sys.stdout

    def run(self, check: str, setting: str, fn: Callable[[], str]) -> Row:
        """``fn()`` (returns the figures) as one row; an exception fails the row, not the script."""
        row = Row(check, setting)
        if time.perf_counter() - self.start > BUDGET_S:
            row.result = "skipped (time budget)"
        else:
            t0 = time.perf_counter()
            try:
                row.figures = fn() or ""
            except Exception as err:  # every check is reported; the others still run
                row.result = "FAIL"
                text = (str(err).strip().splitlines() or [type(err).__name__])[0]
                row.figures = f"{type(err).__name__}: {text[:200]}"
                traceback.print_exc(file=sys.stderr)
            row.seconds = time.perf_counter() - t0
        self.rows.append(row)
        print(f"gpu-check: {row.check} {row.setting}: {row.result} {row.figures}", file=self.out, flush=True)
        return row


# --------------------------------------------------------------------------- settings


def model_setting(model: str, quick: bool) -> tuple[dict[str, Any], dict[str, Any], int]:
    """``(data options, model options, batch size)`` of a model's check (``quick``: tiny, for the CPU)."""
    image = {"like": "cifar10"}
    if quick:
        return {
            "mlp": ({"like": "mnist"}, {"widths": [32]}, 16),
            "cnn": (image, {"channels": [4, 8], "hidden": 16}, 8),
            "vgg16": (image, {"width": 0.0625, "hidden": [16]}, 4),
            "resnet20": (image, {"width": 0.25}, 4),
            "transformer": ({"like": "ptb", "classes": 50, "context": 8}, {"d_model": 16, "heads": 2, "depth": 1}, 8),
        }[model]
    return {
        "mlp": ({"like": "mnist"}, {"widths": [1024, 1024, 1024]}, 128),
        "cnn": (image, {}, 128),
        "vgg16": (image, {}, 128),
        "resnet20": (image, {}, 128),
        "transformer": ({"like": "ptb", "context": 128}, {"d_model": 256, "heads": 4, "depth": 4}, 32),
    }[model]


def config(model: str, method: str, device: torch.device, quick: bool, steps: int, **run: Any):
    """The run configuration of a check: ``steps`` training steps of one epoch on synthetic data."""
    from .train.config import resolve

    data, model_opts, batch = model_setting(model, quick)
    base = {"run": {"method": method, "model": model, "dataset": "synthetic", "epochs": 1, "batch_size": batch,
                    "limit_train": steps * batch, "limit_test": 2 * batch, "eval_batch_size": 2 * batch,
                    "log_every": max(1, steps // 4), "device": str(device), **run},
            "model": model_opts, "data": data}
    return resolve(base)


@contextlib.contextmanager
def memory(device: torch.device):
    """Peak memory allocated / reserved (MB) by the block, in ``out`` (CUDA; ``None`` elsewhere)."""
    out: dict[str, float | None] = {"allocated": None, "reserved": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    yield out
    if device.type == "cuda":
        out["allocated"] = torch.cuda.max_memory_allocated(device) / 2**20
        out["reserved"] = torch.cuda.max_memory_reserved(device) / 2**20


# --------------------------------------------------------------------------- the checks


def _now(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has run everything queued."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_steps(c: Checker, model: str, method: str, amp: str) -> str:
    """Check 1: one epoch of a few steps through the training loop; its figures."""
    import json

    from .train.loop import Run

    steps = 4 if c.quick else 20
    skip = steps // 4
    cfg = config(model, method, c.device, c.quick, steps, amp=amp)
    out = c.root / f"steps-{model}-{method}-{amp}"
    with memory(c.device) as mem:
        run = Run(cfg, out, progress=False, overwrite=True)
        real, count, stamps = run._step, [0], []

        def timed(*args):
            count[0] += 1
            if count[0] == skip + 1:
                stamps.append(_now(c.device))
            result = real(*args)
            if count[0] == steps:
                stamps.append(_now(c.device))
            return result

        run._step = timed
        summary = run.fit()
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [l["loss"] for l in lines if l["kind"] == "step"]
    if summary["steps"] != steps or not losses or not all(math.isfinite(v) for v in losses + [summary["test_loss"]]):
        raise RuntimeError(f"expected {steps} steps with finite losses, got {summary['steps']} steps, losses {losses}")
    ms = 1e3 * (stamps[1] - stamps[0]) / (steps - skip)
    peak = f", {mem['allocated']:.0f}/{mem['reserved']:.0f} MB" if mem["allocated"] is not None else ""
    return f"{ms:.1f} ms/step, loss {losses[0]:.3f} -> {losses[-1]:.3f}{peak}"


def step_parity(device: torch.device, method: str, model: str, quick: bool = True, tol: float = 1e-4) -> float:
    """Check 2: the largest relative ``.grad`` difference between a step on ``device`` and on the CPU.

    Same weights, buffers, ``B_l`` (made by a first CPU step) and batch; GrAPE with its feedback
    update off (``eta=0``, ``noise=0``) and an estimate every step, so the estimate runs on the
    device but ``B_l`` stays the CPU's; TF32 off. Raises when the difference exceeds ``tol``.
    """
    from . import methods, models, tasks
    from .train import backends
    from .train.config import resolve

    data, model_opts, batch = model_setting(model, True)
    opts = {"eta": 0.0, "noise": 0.0, "every": 1} if method == "grape" else {}
    torch.manual_seed(0)
    task = tasks.load("synthetic", data, None, 4 * batch, batch)
    net = models.create(model, task.input_shape, task.num_classes, **model_opts)
    ref = methods.create(method, net, **opts)
    x, y = task.train_batch(0, 0, 0, batch)
    ref.step(x, y, task.loss_fn)  # makes B_l (and moves BatchNorm statistics)
    net_dev = copy.deepcopy(net).to(device)
    dev = methods.create(method, net_dev, **opts)
    dev.load_state_dict(ref.state_dict())
    x2, y2 = task.train_batch(0, 0, 1, batch)
    net.zero_grad(set_to_none=True)
    ref.step(x2, y2, task.loss_fn)
    with backends.applied(resolve({}, ["tf32=false"]).run, device), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a CPU generator state reseeds on CUDA (tangents only: B_l is fixed)
        dev.step(x2.to(device), y2.to(device), task.loss_fn)
    worst = 0.0
    for (name, p), q in zip(net.named_parameters(), net_dev.parameters()):
        if p.grad is None:
            continue
        scale = float(p.grad.abs().max()) or 1.0
        worst = max(worst, float((q.grad.cpu() - p.grad).abs().max()) / scale)
    if worst > tol:
        raise RuntimeError(f"{method} on {model}: .grad on {device} differs from the CPU's by {worst:.2e} (relative)")
    return worst


def sync_free_steps(c: Checker, model: str, method: str) -> str:
    """Check 3: the hot path of a run's steps under ``torch.cuda.set_sync_debug_mode("error")``."""
    from .train.loop import Run

    cfg = config(model, method, c.device, c.quick, 8)
    run = Run(cfg, c.root / f"syncs-{model}-{method}", progress=False, overwrite=True)
    steps = [0]

    def guarded(fn, count=False):
        def call(*args, **kwargs):
            if count:
                steps[0] += 1
            if steps[0] <= 2:  # the first steps make B_l, GrAPE's first norm, cuDNN's choices
                return fn(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return call

    run._step = guarded(run._step, count=True)
    run.task.train_batch = guarded(run.task.train_batch)
    run.task.batch_stats = guarded(run.task.batch_stats)
    run.watch.track = guarded(run.watch.track)
    run.fit()
    return f"{steps[0] - 2} steps without a host sync"


def bench_rows(c: Checker, model: str) -> str:
    """Check 4: ``bpfree bench`` of bp, dfa, grape on ``model``; prints its table."""
    from . import bench
    from .train.config import resolve

    data, model_opts, batch = model_setting(model, c.quick)
    base = {"run": {"model": model, "dataset": "synthetic", "batch_size": batch, "device": str(c.device)},
            "model": model_opts, "data": data}
    cfgs = [resolve(base, [], {"method": m}) for m in METHODS]
    repeats = 3 if c.quick else 10
    rows = bench.bench(cfgs, repeats=repeats, warmup=1 if c.quick else 3, memory=c.device.type == "cuda",
                       progress=False)
    print(bench.table(rows, cfgs[0], repeats), file=c.out, flush=True)
    return ", ".join(f"{r['method']} {r['median_ms']:.2f} ms ({r['ratio_to_bp']:.2f}x)" for r in rows)


def resume_matches(c: Checker) -> str:
    """Check 5: stopped after 5 steps and resumed, a GrAPE run ends bit-identical to an uninterrupted one."""
    from .train import loop
    from .train.checkpoint import load_checkpoint

    cfg = config("mlp", "grape", c.device, c.quick, 10, checkpoint_every=3, deterministic="on")
    full = loop.Run(cfg, c.root / "resume-full", progress=False, overwrite=True)
    full.fit()
    part = loop.Run(cfg, c.root / "resume-part", progress=False, overwrite=True)
    real, calls = part.optimizer.step, [0]

    def stop_after_five(*a, **k):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    part.optimizer.step = stop_after_five
    try:
        part.fit()
    except KeyboardInterrupt:
        pass
    loop.resume(c.root / "resume-part", progress=False)
    got = load_checkpoint(c.root / "resume-part" / "checkpoint.pt", map_location="cpu")["model"]
    want = {k: v.cpu() for k, v in full.model.state_dict().items()}
    diff = max(float((got[k].float() - want[k].float()).abs().max()) for k in want)
    if diff != 0.0:
        raise RuntimeError(f"the resumed run's weights differ from the uninterrupted run's by {diff:.3e}")
    return "weights bit-identical to the uninterrupted run (deterministic=on)"


def _ddp_worker(root: str, device: str, quick: bool) -> None:
    """One rank of check 6: GrAPE on the MLP; its weights, B_l and a tangent draw saved."""
    from .distributed import Workers
    from .train.loop import Run

    W = Workers.current()
    cfg = config("mlp", "grape", torch.device(device), quick, 8, **{"dist_timeout": 120.0})
    run = Run(cfg, Path(root) / "ddp", progress=False, overwrite=True)
    run.fit()
    g = run.method.tangent_generator(run.device)
    probe = torch.randn(8, generator=g, device=g.device).cpu()
    torch.save({"model": {k: v.cpu() for k, v in run.model.state_dict().items()},
                "feedback": {k: v.cpu() for k, v in run.method.state.feedback.items()}, "tangents": probe},
               Path(root) / f"rank{W.rank}.pt")


def ddp_agrees(c: Checker) -> str:
    """Check 6: two processes (NCCL on two GPUs; gloo on the CPU): same weights and B_l, own tangents."""
    from . import distributed

    backend = distributed.backend(str(c.device))
    distributed.spawn(2, _ddp_worker, str(c.root), "cuda" if c.device.type == "cuda" else "cpu", c.quick,
                      device="cuda" if c.device.type == "cuda" else "cpu", timeout=120.0)
    a, b = (torch.load(c.root / f"rank{r}.pt") for r in (0, 1))
    if any(not torch.equal(a["model"][k], b["model"][k]) for k in a["model"]):
        raise RuntimeError("the two ranks ended with different weights")
    if any(not torch.equal(a["feedback"][k], b["feedback"][k]) for k in a["feedback"]):
        raise RuntimeError("the two ranks ended with different feedback matrices")
    if torch.equal(a["tangents"], b["tangents"]):
        raise RuntimeError("the two ranks drew the same tangents")
    return f"{backend}: identical weights and B_l on both ranks, different tangents"


def streams_agree(c: Checker, model: str, method: str) -> str:
    """Check 7: ``parallel=streams`` against the sequential step: the same ``.grad``, and the step times."""
    from . import methods, models, tasks
    from .train import backends
    from .train.config import resolve

    data, model_opts, batch = model_setting(model, c.quick)
    task = tasks.load("synthetic", data, None, 4 * batch, batch).to(c.device)
    x, y = task.train_batch(0, 0, 0, batch)
    grads, times = {}, {}
    with backends.applied(resolve({}, ["tf32=false"]).run, c.device):
        for parallel in ("none", "streams"):
            torch.manual_seed(0)
            net = models.create(model, task.input_shape, task.num_classes, **model_opts).to(c.device)
            m = methods.create(method, net, parallel=parallel, **({"eta": 0.0, "every": 1} if method == "grape" else {}))
            for _ in range(2):  # the first step makes B_l
                net.zero_grad(set_to_none=True)
                m.step(x, y, task.loss_fn)
            grads[parallel] = [p.grad.detach().clone() for p in net.parameters() if p.grad is not None]
            steps, samples = (2 if c.quick else 10), []
            for _ in range(10):  # 5 groups of warm-up, 5 timed
                t0 = _now(c.device)
                for _ in range(steps):
                    net.zero_grad(set_to_none=True)
                    m.step(x, y, task.loss_fn)
                samples.append((_now(c.device) - t0) / steps)
            times[parallel] = statistics.median(samples[5:]) * 1e3
    worst = max(float((a - b).abs().max()) / (float(a.abs().max()) or 1.0)
                for a, b in zip(grads["none"], grads["streams"]))
    if worst > 1e-5:
        raise RuntimeError(f"parallel=streams fills .grad {worst:.2e} (relative) away from the sequential step")
    return (f"same .grad ({worst:.1e}); ms/step sequential {times['none']:.2f}, streams {times['streams']:.2f} "
            f"({times['streams'] / times['none']:.2f}x)")


def _pipeline_worker(root: str, device: str, quick: bool) -> None:
    """One stage of check 8: a 2-stage DFA pipeline through the training loop."""
    from .train.loop import Run

    cfg = config("mlp", "dfa", torch.device(device), quick, 8, pipeline=2, microbatches=4, tf32=False,
                 dist_timeout=120.0)
    Run(cfg, Path(root) / "pipeline", progress=False, overwrite=True).fit()


def pipeline_agrees(c: Checker) -> str:
    """Check 8: a 2-stage DFA pipeline (NCCL on two GPUs; gloo on the CPU) against one process."""
    from . import distributed
    from .train.checkpoint import load_checkpoint
    from .train.loop import Run

    kind = "cuda" if c.device.type == "cuda" else "cpu"
    distributed.spawn(2, _pipeline_worker, str(c.root), kind, c.quick, device=kind, timeout=120.0)
    single = Run(config("mlp", "dfa", c.device, c.quick, 8, tf32=False), c.root / "pipeline-single", progress=False,
                 overwrite=True)
    single.fit()
    got = load_checkpoint(c.root / "pipeline" / "checkpoint.pt", map_location="cpu")["model"]
    want = {k: v.cpu() for k, v in single.model.state_dict().items()}
    worst = max(float((got[k] - want[k]).abs().max()) / (float(want[k].abs().max()) or 1.0) for k in want)
    if worst > 1e-4:
        raise RuntimeError(f"the pipeline's weights differ from one process's by {worst:.2e} (relative)")
    return f"{distributed.backend(kind)}: the weights of one process ({worst:.1e} relative)"


# --------------------------------------------------------------------------- the script


def header(device: torch.device) -> str:
    from .train import backends
    from .train.config import resolve

    p = backends.platform(device, resolve({}).run)
    gpu = f"{p['gpu']} (compute {p['gpu_capability']}, {p['gpu_memory_gb']} GB), " if p["gpu"] else ""
    return (f"gpu-check on {p['device']}: {gpu}torch {p['torch']}, CUDA {p['cuda']}, cuDNN {p['cudnn']}, "
            f"{torch.cuda.device_count() if device.type == 'cuda' else 0} GPU(s)")


def table(rows: list[Row]) -> str:
    lines = ["| check | setting | result | s | figures |", "|---|---|---|---|---|"]
    lines += [f"| {r.check} | {r.setting} | {r.result} | {r.seconds:.1f} | {r.figures} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None, out=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bpfree.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="run the checks here instead (cpu: the pieces, no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="tiny models and few steps (for the CPU and tests)")
    parser.add_argument("--only", default="", help="comma-separated checks to run (steps, parity, syncs, bench, "
                                                   "resume, ddp, streams, pipeline); default all")
    parser.add_argument("--models", default=",".join(MODELS), help="models of the steps check (default: all)")
    parser.add_argument("--methods", default=",".join(METHODS), help="methods of the steps check (default: all)")
    args = parser.parse_args(argv)
    out = out or sys.stdout
    if args.device is None:
        if not torch.cuda.is_available():
            print("gpu-check: no GPU (torch.cuda.is_available() is False): nothing to check on this machine", file=out)
            return 0
        device = torch.device("cuda", 0)
    else:
        device = torch.device(args.device)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    want = lambda name: not only or name in only
    print(header(device), file=out, flush=True)
    with tempfile.TemporaryDirectory(prefix="bpfree-gpu-check-") as tmp:
        c = Checker(device, args.quick, Path(tmp), out=out)
        if want("steps"):
            for model in [m.strip() for m in args.models.split(",") if m.strip()]:
                for amp in ("none", "bf16"):
                    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
                        c.run("steps", f"{model} {method} amp={amp}", lambda: train_steps(c, model, method, amp))
        if want("parity"):
            for model, method in (("mlp", "dfa"), ("mlp", "grape"), ("cnn", "dfa")):
                c.run("parity", f"{model} {method}", lambda: f"max relative .grad difference "
                                                           f"{step_parity(device, method, model):.1e}")
        if want("syncs"):
            for model, method in (("mlp", "dfa"), ("mlp", "grape"), ("transformer", "grape")):
                if device.type != "cuda":
                    c.rows.append(Row("syncs", f"{model} {method}", "skipped (CUDA only)"))
                    continue
                c.run("syncs", f"{model} {method}", lambda: sync_free_steps(c, model, method))
        if want("bench"):
            for model in ("mlp", "vgg16"):
                c.run("bench", model, lambda: bench_rows(c, model))
        if want("resume"):
            c.run("resume", "mlp grape", lambda: resume_matches(c))
        if want("ddp"):
            if device.type == "cuda" and torch.cuda.device_count() < 2:
                c.rows.append(Row("ddp", "2 processes", "skipped (needs 2 GPUs)"))
            else:
                c.run("ddp", "2 processes", lambda: ddp_agrees(c))
        if want("streams"):
            for model, method in (("mlp", "dfa"), ("mlp", "grape"), ("transformer", "dfa")):
                c.run("streams", f"{model} {method}", lambda: streams_agree(c, model, method))
        if want("pipeline"):
            if device.type == "cuda" and torch.cuda.device_count() < 2:
                c.rows.append(Row("pipeline", "2 stages", "skipped (needs 2 GPUs)"))
            else:
                c.run("pipeline", "2 stages", lambda: pipeline_agrees(c))
    total = time.perf_counter() - c.start
    print(f"\n{header(device)}; {total:.0f} s in all\n\n{table(c.rows)}", file=out, flush=True)
    return 1 if any(r.result == "FAIL" for r in c.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
