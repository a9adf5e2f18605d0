"""Benchmark harness: step time and peak memory of methods, measured the same way for all.

Step time: every method gets its own copy of the model (same initial weights), optimizer and
the same real batches. After ``warmup`` steps each, ``repeats`` rounds run ``group`` consecutive
steps of every method in turn (alternating, so drifts in machine load hit all methods alike); a
step is ``zero_grad + method.step + optimizer.step`` (CUDA is synchronised around it) and one
sample is the mean step time of the group. ``group`` defaults to the longest ``method.period``
(capped at 10), so a method that does extra work every K-th step (GrAPE's ``every``) is timed
over whole periods instead of a bimodal mix of cheap and dear steps. Reported: the median over
repeats and its ratio to BP's median measured in the same process.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over ``mem_steps`` steps. On CPU, each
method runs in a fresh subprocess (Linux) and the figure is the growth of its peak resident set
size (``VmHWM``, reset through ``/proc/self/clear_refs`` once the model and one batch are in
memory and the rest of the data is freed): the memory training adds (optimizer state, feedback
matrices, estimates, activations). The child runs with a fixed malloc mmap threshold, so freed
tensors leave the resident set at once and repeated measurements agree to 0.1 MB.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from . import methods, models, tasks
from .train.config import RunConfig, resolve
from .train.precision import Precision
from .train.setup import make_optimizer, resolve_device


@dataclass
class Contender:
    name: str
    model: torch.nn.Module
    method: object
    optimizer: torch.optim.Optimizer
    precision: Precision  # run option amp, as the training loop applies it


def build(cfg: RunConfig, task, device) -> Contender:
    torch.manual_seed(cfg.run.seed)
    model = models.create(cfg.run.model, task.input_shape, task.num_classes, **cfg.model).to(device)
    method = methods.create(cfg.run.method, model, **cfg.method)
    return Contender(cfg.run.method, model, method, make_optimizer(cfg.run, model.parameters()),
                     Precision(cfg.run.amp, device, method))


def one_step(c: Contender, task, x, y, device) -> float:
    """Seconds of ``zero_grad + method.step + optimizer.step``, under the run's ``amp`` as in training."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    c.optimizer.zero_grad(set_to_none=True)
    with c.precision.autocast():
        c.method.step(x, y, c.precision.loss_fn(task.loss_fn))
    c.precision.step(c.optimizer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def configs(names: list[str], base: dict, sets: list[str], overrides: dict) -> list[RunConfig]:
    for n in names:
        methods.get(n)
    return [resolve(base, sets, {**overrides, "method": n}, sibling_methods=tuple(m for m in names if m != n))
            for n in names]


def load_task(cfg: RunConfig, device, data_dir: str | os.PathLike | None = None):
    r = cfg.run
    return tasks.load(r.dataset, cfg.data, data_dir, max(r.batch_size * 4, r.limit_train), r.batch_size).to(device)


def time_methods(cfgs: list[RunConfig], repeats: int = 20, warmup: int = 5, progress: bool = True,
                 group: int | None = None, data_dir: str | os.PathLike | None = None,
                 ) -> tuple[dict[str, list[float]], int]:
    """Per-step seconds of every config's method, ``repeats`` samples each (each the mean over
    ``group`` consecutive steps; default: the longest method period, at most 10), alternating;
    and the ``group`` used. ``data_dir``: the dataset cache (default: the usual one)."""
    device = resolve_device(cfgs[0].run.device)
    task = load_task(cfgs[0], device, data_dir)
    contenders = [build(c, task, device) for c in cfgs]
    B = cfgs[0].run.batch_size
    nb = task.num_batches(B)
    batches = [task.train_batch(0, 0, i % nb, B) for i in range(4)]
    if group is None:
        group = min(10, max(getattr(c.method, "period", 1) for c in contenders))
    if group < 1:
        raise ValueError(f"group must be at least 1, got {group}")
    for c in contenders:
        for i in range(warmup * group):
            one_step(c, task, *batches[i % len(batches)], device)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    from tqdm.auto import tqdm

    for r in tqdm(range(repeats), desc="bench", disable=not progress, leave=False):
        for c in contenders:
            total = sum(one_step(c, task, *batches[(r * group + i) % len(batches)], device) for i in range(group))
            times[c.name].append(total / group)
    return times, group


def peak_memory_mb(cfg: RunConfig, steps: int = 3, data_dir: str | os.PathLike | None = None) -> float:
    """Peak memory added by ``steps`` training steps of ``cfg``'s method (see module docstring)."""
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        task = load_task(cfg, device, data_dir)
        c = build(cfg, task, device)
        x, y = task.train_batch(0, 0, 0, cfg.run.batch_size)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        for _ in range(steps):
            one_step(c, task, x, y, device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    payload = json.dumps({"config": cfg.to_dict(), "steps": steps,
                          "data_dir": None if data_dir is None else str(data_dir)})
    code = "import sys, bpfree.bench as b; b._memory_child(sys.argv[1])"
    # glibc's malloc raises its mmap threshold as large blocks are freed and then keeps freed
    # memory in the heap; a fixed threshold returns every large tensor to the system when freed,
    # so the high-water mark is the peak of live memory, the same on every run.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", code, payload], capture_output=True, text=True, check=False, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"memory measurement of {cfg.run.method} failed: {res.stderr.strip().splitlines()[-1:]}")
    return float(res.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _memory_child(payload: str) -> None:
    import gc

    spec = json.loads(payload)
    cfg = resolve(spec["config"])
    device = torch.device("cpu")
    task = load_task(cfg, device, spec.get("data_dir"))
    x, y = (t.clone() for t in task.train_batch(0, 0, 0, cfg.run.batch_size))
    for key, value in list(vars(task).items()):  # free the dataset, keep what the loss needs
        if isinstance(value, torch.Tensor) and value.numel() > 4 * x.numel():
            setattr(task, key, None)
    # A throwaway copy runs the same steps first, so that code pages of the kernels, lazily built
    # tables and the like are resident before the measurement and do not count as the method's.
    warm = build(cfg, task, device)
    for _ in range(spec["steps"]):
        one_step(warm, task, x, y, device)
    del warm
    gc.collect()
    c = build(cfg, task, device)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set size (VmHWM) to the current one
    base = _status_kib("VmRSS")
    for _ in range(spec["steps"]):
        one_step(c, task, x, y, device)
    print((_status_kib("VmHWM") - base) / 1024.0)


def bench(cfgs: list[RunConfig], repeats: int = 20, warmup: int = 5, memory: bool = True, progress: bool = True,
          group: int | None = None, data_dir: str | os.PathLike | None = None) -> list[dict]:
    """Rows ``{method, median_ms, p25_ms, p75_ms, ratio_to_bp, peak_mem_mb}`` (ratio to the first
    method when ``bp`` is not among them); ``group``, ``data_dir``: see :func:`time_methods`."""
    times, group = time_methods(cfgs, repeats, warmup, progress, group, data_dir)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ref = med.get("bp", next(iter(med.values())))
    rows = []
    for cfg in cfgs:
        name = cfg.run.method
        q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [times[name][0]] * 3
        rows.append({
            "method": name, "median_ms": round(med[name], 3), "p25_ms": round(q[0] * 1e3, 3),
            "p75_ms": round(q[2] * 1e3, 3), "ratio_to_bp": round(med[name] / ref, 3),
            "peak_mem_mb": round(peak_memory_mb(cfg, data_dir=data_dir), 1) if memory else None,
            "steps_per_sample": group,
        })
    return rows


def table(rows: list[dict], cfg: RunConfig, repeats: int) -> str:
    r = cfg.run
    device = resolve_device(r.device)
    head = (f"{r.model} on {r.dataset}-shaped batches of {r.batch_size}, {r.optimizer}, {device}, "
            f"{torch.get_num_threads()} threads, median of {repeats} samples"
            + (f" (each the mean of {rows[0]['steps_per_sample']} consecutive steps)" if rows and rows[0].get("steps_per_sample", 1) > 1 else "")
            + "\n\n"
            "| method | median ms/step | p25–p75 ms | ratio to bp | peak memory MB |\n|---|---|---|---|---|\n")
    return head + "".join(
        f"| {row['method']} | {row['median_ms']:.2f} | {row['p25_ms']:.2f}–{row['p75_ms']:.2f} | "
        f"{row['ratio_to_bp']:.3f} | {row['peak_mem_mb'] if row['peak_mem_mb'] is not None else '–'} |\n"
        for row in rows
    )
