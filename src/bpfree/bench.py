"""Benchmark harness: step time and peak memory of methods, measured the same way for all.

Step time: every method gets its own copy of the model (same initial weights), optimizer and
the same real batches. After ``warmup`` steps each, ``repeats`` rounds run ``group`` consecutive
steps of every method in turn (alternating, so drifts in machine load hit all methods alike); a
step is ``zero_grad + method.step + optimizer.step`` and one sample is the mean step time of the
group. ``group`` defaults to the longest ``method.period`` (capped at 10), so a method that does
extra work every K-th step (GrAPE's ``every``) is timed over whole periods instead of a bimodal
mix of cheap and dear steps. Reported: the median over repeats and its ratio to BP's median
measured in the same process. The run options ``amp``, ``tf32``, ``cudnn_benchmark`` and
``deterministic`` apply as in training.

The clock (:func:`clock_for`): on the CPU, wall time around each step (:class:`WallClock`). On
CUDA, events (:class:`CudaEvents`): a ``torch.cuda.Event(enable_timing=True)`` is recorded on the
stream before and after each group, with no synchronisation in between, so the steps queue as
they do in training (the host prepares the next kernels while the GPU runs the last ones) and a
sample is the GPU time from the group's first kernel to its last; the events are read after all
rounds. Timing each step with a ``torch.cuda.synchronize()`` around it would add a drained queue
and a launch latency to every step and make cheap steps look dear.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over ``mem_steps`` steps, and
``torch.cuda.max_memory_reserved`` (what the caching allocator holds from the device: the figure
that runs out first), both above what was held before the steps. On CPU, each
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
from .train import backends
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


def run_step(c: Contender, task, x, y) -> None:
    """``zero_grad + method.step + optimizer.step``, under the run's ``amp`` as in training."""
    c.optimizer.zero_grad(set_to_none=True)
    with c.precision.autocast():
        c.method.step(x, y, c.precision.loss_fn(task.loss_fn))
    c.precision.step(c.optimizer)


def one_step(c: Contender, task, x, y, device) -> float:
    """Wall seconds of :func:`run_step` (CUDA is synchronised around it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    run_step(c, task, x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


class WallClock:
    """CPU timing: the sum of :func:`one_step`'s wall times over a group of steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def group(self, c: Contender, task, batches: list, group: int) -> float:
        """Seconds of ``group`` steps on ``batches`` (taken in turn)."""
        return sum(one_step(c, task, *batches[i % len(batches)], self.device) for i in range(group))

    def seconds(self, mark: float) -> float:
        return mark


class CudaEvents:
    """CUDA timing: events recorded on the stream around a group of steps, read afterwards."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def group(self, c: Contender, task, batches: list, group: int) -> tuple:
        """Queue ``group`` steps between two recorded events; returns the pair (nothing waits)."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(group):
            run_step(c, task, *batches[i % len(batches)])
        end.record()
        return start, end

    def seconds(self, mark: tuple) -> float:
        """The GPU time between the pair's events (waits for the second one)."""
        start, end = mark
        end.synchronize()
        return start.elapsed_time(end) / 1e3


def clock_for(device: torch.device) -> WallClock | CudaEvents:
    """:class:`CudaEvents` on CUDA, :class:`WallClock` elsewhere."""
    return CudaEvents(device) if device.type == "cuda" else WallClock(device)


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
    backends.prepare_environment(cfgs[0].run, device)
    with backends.applied(cfgs[0].run, device):
        task = load_task(cfgs[0], device, data_dir)
        contenders = [build(c, task, device) for c in cfgs]
        B = cfgs[0].run.batch_size
        nb = task.num_batches(B)
        batches = [task.train_batch(0, 0, i % nb, B) for i in range(4)]
        if group is None:
            group = min(10, max(getattr(c.method, "period", 1) for c in contenders))
        if group < 1:
            raise ValueError(f"group must be at least 1, got {group}")
        clock = clock_for(device)
        for c in contenders:
            for i in range(warmup * group):
                if isinstance(clock, WallClock):
                    one_step(c, task, *batches[i % len(batches)], device)
                else:
                    run_step(c, task, *batches[i % len(batches)])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        marks: dict[str, list] = {c.name: [] for c in contenders}
        from tqdm.auto import tqdm

        for r in tqdm(range(repeats), desc="bench", disable=not progress, leave=False):
            for c in contenders:
                turn = [batches[(r * group + i) % len(batches)] for i in range(group)]
                marks[c.name].append(clock.group(c, task, turn, group))
        times = {name: [clock.seconds(m) / group for m in ms] for name, ms in marks.items()}
    return times, group


def peak_memory_mb(cfg: RunConfig, steps: int = 3, data_dir: str | os.PathLike | None = None) -> float:
    """Peak memory added by ``steps`` training steps of ``cfg``'s method (see module docstring)."""
    return peak_memory(cfg, steps, data_dir)[0]


def peak_memory(cfg: RunConfig, steps: int = 3, data_dir: str | os.PathLike | None = None,
                ) -> tuple[float, float | None]:
    """``(allocated, reserved)``: MB that ``steps`` training steps add at their peak (reserved: CUDA
    only, ``None`` elsewhere)."""
    device = resolve_device(cfg.run.device)
    if device.type == "cuda":
        with backends.applied(cfg.run, device):
            task = load_task(cfg, device, data_dir)
            c = build(cfg, task, device)
            x, y = task.train_batch(0, 0, 0, cfg.run.batch_size)
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()  # blocks freed by earlier measurements leave the reserved figure
            torch.cuda.reset_peak_memory_stats(device)
            base, held = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
            for _ in range(steps):
                one_step(c, task, x, y, device)
            return ((torch.cuda.max_memory_allocated(device) - base) / 2**20,
                    (torch.cuda.max_memory_reserved(device) - held) / 2**20)
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
    return float(res.stdout.strip().splitlines()[-1]), None


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


def time_pipelined(cfgs: list[RunConfig], repeats: int = 20, warmup: int = 5, group: int | None = None,
                   data_dir: str | os.PathLike | None = None, threads: int = 0,
                   ) -> tuple[dict[str, list[float]], int, list[int]]:
    """:func:`time_methods` for pipeline-parallel steps: ``cfgs[0].run.pipeline`` processes (one stage
    each, ``threads`` torch threads each; default: the machine's cores shared out), every method on
    the same split, micro-batches and process group, alternating. A sample is the mean wall time of
    ``group`` whole optimizer steps on rank 0, started after a barrier; every step ends with the last
    stage's broadcast of the batch's output and loss, so rank 0's clock covers the whole pipeline."""
    import tempfile

    from .distributed import spawn

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        payload = json.dumps({"configs": [c.to_dict() for c in cfgs], "repeats": repeats, "warmup": warmup,
                              "group": group, "data_dir": None if data_dir is None else str(data_dir),
                              "threads": threads, "out": out})
        spawn(cfgs[0].run.pipeline, _pipeline_worker, payload, device="cpu", timeout=cfgs[0].run.dist_timeout)
        with open(out) as f:
            result = json.load(f)
    return result["times"], result["group"], result["stage_points"]


def _pipeline_worker(payload: str) -> None:
    import torch.distributed as dist

    from .pipeline import make_pipeline

    spec = json.loads(payload)
    cfgs = [resolve(c) for c in spec["configs"]]
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    rank, device = dist.get_rank(), torch.device("cpu")
    task = load_task(cfgs[0], device, spec["data_dir"])
    B = cfgs[0].run.batch_size
    batches = [task.train_batch(0, 0, i % task.num_batches(B), B) for i in range(4)]
    contenders, split = [], None
    for cfg in cfgs:
        c = build(cfg, task, device)
        r = cfg.run
        pipe = make_pipeline(c.method, c.model, r.pipeline, rank, r.microbatches, batches[0][0], device,
                             r.pipeline_schedule, split=split)
        split = pipe.split  # every method on the split measured for the first
        c.method, c.optimizer = pipe, make_optimizer(r, pipe.module.parameters())
        contenders.append(c)
    group = spec["group"] or min(10, max(getattr(c.method.method, "period", 1) for c in contenders))

    def run(c: Contender, steps: int, offset: int) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            run_step(c, task, *batches[(offset + i) % len(batches)])
        return time.perf_counter() - t0

    for c in contenders:
        run(c, spec["warmup"] * group, 0)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    for rep in range(spec["repeats"]):
        for c in contenders:
            times[c.name].append(run(c, group, rep * group) / group)
    if rank == 0:
        with open(spec["out"], "w") as f:
            json.dump({"times": times, "group": group, "stage_points": [len(p) for p in split.points]}, f)


def bench(cfgs: list[RunConfig], repeats: int = 20, warmup: int = 5, memory: bool = True, progress: bool = True,
          group: int | None = None, data_dir: str | os.PathLike | None = None, threads: int = 0) -> list[dict]:
    """Rows ``{method, median_ms, p25_ms, p75_ms, ratio_to_bp, peak_mem_mb, peak_reserved_mb,
    samples_per_s}`` (ratio to the first method when ``bp`` is not among them; reserved: CUDA only);
    ``group``, ``data_dir``: see :func:`time_methods`. With run option ``pipeline`` the steps are
    pipeline-parallel (:func:`time_pipelined`, ``threads`` per process) and memory is not measured."""
    pipelined, stage_points = cfgs[0].run.pipeline > 1, None
    if pipelined:
        times, group, stage_points = time_pipelined(cfgs, repeats, warmup, group, data_dir, threads)
        memory = False
    else:
        times, group = time_methods(cfgs, repeats, warmup, progress, group, data_dir)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ref = med.get("bp", next(iter(med.values())))
    rows = []
    for cfg in cfgs:
        name = cfg.run.method
        q = statistics.quantiles(times[name], n=4) if len(times[name]) > 1 else [times[name][0]] * 3
        allocated, reserved = peak_memory(cfg, data_dir=data_dir) if memory else (None, None)
        rows.append({
            "method": name, "median_ms": round(med[name], 3), "p25_ms": round(q[0] * 1e3, 3),
            "p75_ms": round(q[2] * 1e3, 3), "ratio_to_bp": round(med[name] / ref, 3),
            "peak_mem_mb": None if allocated is None else round(allocated, 1),
            "peak_reserved_mb": None if reserved is None else round(reserved, 1),
            "steps_per_sample": group,
            "samples_per_s": round(cfg.run.batch_size / (med[name] / 1e3), 1),
            **({"stage_points": stage_points, "microbatches": cfg.run.microbatches} if pipelined else {}),
        })
    return rows


def table(rows: list[dict], cfg: RunConfig, repeats: int) -> str:
    r = cfg.run
    device = resolve_device(r.device)
    where = f"{device}"
    if device.type == "cuda":
        p = backends.platform(device, r)
        where = (f"{device} ({p['gpu']}, CUDA {p['cuda']}, tf32 {'on' if p['tf32'] else 'off'}, "
                 f"cudnn_benchmark {'on' if p['cudnn_benchmark'] else 'off'}, CUDA-event timing)")
    elif r.pipeline > 1:
        where += (f", pipeline of {r.pipeline} processes (stages) with {r.microbatches} micro-batches, bp on "
                  f"torch.distributed.pipelining {r.pipeline_schedule}; memory not measured")
    else:
        where += f", {torch.get_num_threads()} threads"
    reserved = any(row.get("peak_reserved_mb") is not None for row in rows)
    dash = lambda v: v if v is not None else "–"
    head = (f"{r.model} on {r.dataset}-shaped batches of {r.batch_size}, {r.optimizer}"
            + (f", amp {r.amp}" if r.amp != "none" else "") + f", {where}, median of {repeats} samples"
            + (f" (each the mean of {rows[0]['steps_per_sample']} consecutive steps)" if rows and rows[0].get("steps_per_sample", 1) > 1 else "")
            + "\n\n"
            "| method | median ms/step | p25–p75 ms | ratio to bp | "
            + ("samples/s |\n|---|---|---|---|---|\n" if r.pipeline > 1 else "peak memory MB |"
               + (" peak reserved MB |\n|---|---|---|---|---|---|\n" if reserved else "\n|---|---|---|---|---|\n")))
    return head + "".join(
        f"| {row['method']} | {row['median_ms']:.2f} | {row['p25_ms']:.2f}–{row['p75_ms']:.2f} | "
        f"{row['ratio_to_bp']:.3f} | "
        + (f"{row['samples_per_s']:.0f} |" if r.pipeline > 1 else f"{dash(row['peak_mem_mb'])} |"
           + (f" {dash(row.get('peak_reserved_mb'))} |" if reserved else "")) + "\n"
        for row in rows
    )
