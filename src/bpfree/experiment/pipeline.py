"""Kind ``pipeline``: predicted step time and activation memory of BP and DFA pipelines (Q6).

Each ``[[variants]]`` entry is a model (its keys are ``--set`` keys over ``[base]`` and the
scale's; ``batch_size`` is the micro-batch size). Its run step (one job per model and seed)
measures, for every *block* (the model's top-level children between two feedback points, cut
after each point; the model must be an ``nn.Sequential`` with its points at the top level, as
``mlp`` and ``vgg16`` are) and for the *head* (the children after the last point, with the loss),
on one real training micro-batch of the dataset, the median over ``repeats`` (after ``warmup``)
of

* ``F``: its forward pass (the head's includes the loss);
* ``B``: BP's backward from a fixed output gradient, weight and input gradients;
* ``W``: BP's backward without the input gradient (what the model's first block runs: the data
  needs no gradient);
* ``D``: DFA's backward: the signal ``e B_l^T`` (``e`` of shape ``(micro-batch, o)``, ``B_l`` of
  ``(n_l, o)``, drawn once) then the weight gradients, the block input detached (the head's: ``e``
  and its weight gradients by one ``autograd.grad``, no input gradient);
* the bytes its forward saves for the backward under BP and under DFA
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters left out), and how
  much of that is its input saved by the previous block too;

timing ``F, B``, ``F, W``, ``F, D`` of each block in turn, round after round (``F`` is the median of
all three forwards), with ``threads`` CPU threads (CUDA: synchronised around each timed call,
which adds a launch latency to every op). Seed ``k`` adds ``k`` to ``run.seed`` (weights, batch);
costs are the mean over seeds of the medians.

The predictions (:mod:`.pipeline_sim`, computed again by ``render`` from the stored costs): for
every ``S`` of ``stages`` and ``M`` of ``microbatches``, BP's GPipe and 1F1B and the DFA pipeline,
with ``latency_ms`` per message. Stages are the contiguous partition of the blocks that minimises
the largest stage's ``F + B`` (BP's schedules) or ``F + D`` (DFA's), the head on the last stage;
for ``S`` above the number of blocks, a model of ``S`` identical blocks each costing the mean of
the measured blocks, one per stage, plus the head (the table says "replicated"). Ratios are
throughputs, ``T_bp / T_dfa``; memory is the most loaded stage's peak: micro-batches held times
what its blocks save per micro-batch. The optimizer step (the run's optimizer over each block's
parameters, timed once per block as ``update``) ends every stage's step, in both schedules. Not
modelled: the payload of messages (every message costs ``latency_ms``), overlap of communication
with compute beyond that.

``table.md``: per model, S and M the three step times, the two ratios, bubble fractions and peak
activation MB; then the measured per-block costs. ``pipeline.png``: the ratios against S, one
line per M, and the peak memory against S at the largest M.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..options import OptionError, option
from ..plots import MARKERS, curve, method_colour, reference_line, sequential
from ..points import FeedbackPoint, Head, feedback_points
from ..train.config import resolve
from . import pipeline_sim as sim
from .common import Job, markdown_table, pyplot, save_figure, save_result, slug, split_params, stored_caption
from .spec import Scale, Spec, variant_keys
from .train import compose


@dataclass
class Params:
    stages: tuple[int, ...] = option((2, 4, 8, 16), "pipeline stages S predicted")
    microbatches: tuple[int, ...] = option((4, 8, 16, 32), "micro-batches M per optimizer step")
    latency_ms: float = option(0.0, "p2p latency c of every message between stages, ms")
    repeats: int = option(10, "timed rounds (each times every block's F, B, W and D)")
    warmup: int = option(2, "untimed rounds first")
    threads: int = option(1, "torch CPU threads during the timing (0: torch's choice)")

    def check(self) -> None:
        if not (self.stages and self.microbatches):
            raise OptionError("options 'stages' and 'microbatches' must each list at least one value")
        if min(self.stages) < 1 or min(self.microbatches) < 1 or self.repeats < 1:
            raise OptionError("stages, microbatches and repeats must be at least 1")
        if self.warmup < 0 or self.threads < 0 or self.latency_ms < 0:
            raise OptionError("warmup, threads and latency_ms must not be negative")


PARAMS = Params


def params(spec: Spec, scale: Scale) -> tuple[Params, dict[str, Any]]:
    """The ``[pipeline]`` parameters, and the scale's other keys (run configuration overrides)."""
    return split_params(Params, spec, scale.overrides)


def jobs(spec: Spec, scale: Scale, seeds: int, root: Path) -> list[Job]:
    """One job per (model variant, seed); configurations resolved before anything runs."""
    p, rest = params(spec, scale)
    out = []
    for variant in spec.variants:
        label = variant["name"]
        base, over = compose(spec.base, [rest, variant_keys(variant, scale.name)])
        try:
            cfg = resolve(base, (), over)
        except (OptionError, ValueError, TypeError) as err:
            raise OptionError(f"{spec.path}: scale {scale.name!r}, row {label!r}: {err}") from None
        for k in range(seeds):
            c = copy.deepcopy(cfg)
            c.run.seed = cfg.run.seed + k
            q = {"config": c.to_dict(), "repeats": p.repeats, "warmup": p.warmup, "threads": p.threads}
            out.append(Job(label, k, root / "runs" / slug(label) / f"seed{k}", q, {"model": label}, c))
    return out


# -- measuring ---------------------------------------------------------------------------------------
def split_blocks(model: nn.Module) -> tuple[list[nn.Sequential], nn.Sequential, list[str]]:
    """``(blocks, head, names)``: the top-level children of ``model`` cut after each feedback point
    (block ``l`` ends with point ``l``), the children after the last point, and each block's
    children names (``"first..last"``)."""
    points = feedback_points(model)
    children = list(model.named_children())
    top = [i for i, (_, m) in enumerate(children) if isinstance(m, FeedbackPoint) and not isinstance(m, Head)]
    if not isinstance(model, nn.Sequential) or not points or len(top) != len(points):
        raise OptionError(f"kind 'pipeline' cuts an nn.Sequential after its feedback points, which must be its "
                          f"top-level children; {type(model).__name__} has {len(points)} point(s), {len(top)} at "
                          f"the top level")
    cuts = [0] + [i + 1 for i in top]
    blocks = [nn.Sequential(*[m for _, m in children[a:b]]) for a, b in zip(cuts, cuts[1:])]
    names = [f"{children[a][0]}..{children[b - 1][0]}" for a, b in zip(cuts, cuts[1:])]
    return blocks, nn.Sequential(*[m for _, m in children[cuts[-1]:]]), names


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def __call__(self, fn):
        """``(fn(), seconds)``."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn()
        if self.cuda:
            torch.cuda.synchronize(self.device)
        return out, time.perf_counter() - t0


def _saved(fn, skip: set[int]) -> tuple[Any, dict[int, int]]:
    """``(fn(), {storage pointer: bytes})`` of the tensors autograd saves during ``fn`` (not ``skip``)."""
    found: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            found[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, found


def _ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _memory(block: nn.Module, x: torch.Tensor, grad_input: bool, skip: set[int]) -> tuple[float, float, bool]:
    """``(bytes saved, of which the input's, whether the output is saved)`` for one forward."""
    xin = x.detach().requires_grad_(grad_input)
    out, found = _saved(lambda: block(xin), skip)
    return float(sum(found.values())), float(found.get(_ptr(xin), 0)), _ptr(out) in found


def _clear(module: nn.Module) -> None:
    for p in module.parameters():
        p.grad = None


def measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, repeats: int, warmup: int,
            generator: torch.Generator, optimizer=None) -> dict[str, Any]:
    """Per-block and head costs (ms, medians) and saved bytes of ``model`` on the micro-batch ``(x, y)``
    (see the module docstring); ``{"blocks": [...], "head": {...}}``, each a dict of
    :class:`.pipeline_sim.BlockCost` fields plus ``name``. ``optimizer``: ``params -> Optimizer``;
    when given, ``update`` is the median time of one ``step()`` over each block's parameters
    (random gradients), the once-per-step cost a stage adds after its last backward."""
    model.train()
    blocks, head, names = split_blocks(model)
    device = x.device
    clock = _Clock(device)
    skip = {_ptr(p) for p in model.parameters()} | {_ptr(b) for b in model.buffers()}
    with torch.no_grad():
        inputs, h = [], x
        for b in blocks:
            inputs.append(h)
            h = b(h)
        head_in, logits = h, head(h)
    n = x.shape[0]
    o = logits.reshape(n, -1).shape[1]
    e = torch.randn((n, o), generator=generator).to(device)
    grads = [torch.randn(t.shape, generator=generator).to(device) for t in inputs[1:] + [head_in]]
    feedback = [(torch.randn((g[0].numel(), o), generator=generator) / math.sqrt(o)).to(device) for g in grads]
    head_params = [p for p in head.parameters() if p.requires_grad]
    samples: dict[str, list[list[float]]] = {k: [[] for _ in blocks] for k in ("F", "B", "W", "D")}
    head_samples: dict[str, list[float]] = {"F": [], "B": [], "D": []}

    def block_round(l: int, keep: bool) -> None:
        b, g, B = blocks[l], grads[l], feedback[l]
        for kind in ("B", "W", "D"):
            _clear(b)
            xin = inputs[l].detach().requires_grad_(kind == "B")
            out, tf = clock(lambda: b(xin))
            if not out.requires_grad:  # a block without parameters, its input detached: nothing to do
                tb = 0.0
            elif kind == "D":
                _, tb = clock(lambda: torch.autograd.backward(out, (e @ B.T).view_as(out)))
            else:
                _, tb = clock(lambda: torch.autograd.backward(out, g))
            if keep:
                samples["F"][l].append(tf)
                samples[kind][l].append(tb)
        _clear(b)

    def head_round(keep: bool) -> None:
        for kind in ("B", "D"):
            _clear(head)
            hin = head_in.detach().requires_grad_(kind == "B" or not head_params)
            loss, tf = clock(lambda: loss_fn(head(hin), y))
            if kind == "B":
                _, tb = clock(lambda: loss.backward())
            else:
                _, tb = clock(lambda: torch.autograd.grad(loss, head_params or [hin]))
            if keep:
                head_samples["F"].append(tf)
                head_samples[kind].append(tb)
        _clear(head)

    for r in range(warmup + repeats):
        for l in range(len(blocks)):
            block_round(l, r >= warmup)
        head_round(r >= warmup)

    def ms(values: list[float]) -> float:
        return round(statistics.median(values) * 1e3, 4)

    def update_ms(module: nn.Module) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        if optimizer is None or not params:
            return 0.0
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.device)
        opt = optimizer(params)
        times = [clock(opt.step)[1] for _ in range(warmup + repeats)][warmup:]
        _clear(module)
        return ms(times)

    out_blocks = []
    previous_output = {"bp": False, "dfa": False}
    for l, b in enumerate(blocks):
        mem = {}
        for mode in ("bp", "dfa"):
            total, inp, saves_output = _memory(b, inputs[l], mode == "bp", skip)
            mem[mode] = (total, inp if previous_output[mode] else 0.0)
            previous_output[mode] = saves_output
        out_blocks.append({"name": names[l], "forward": ms(samples["F"][l]), "backward": ms(samples["B"][l]),
                           "weight_backward": ms(samples["W"][l]), "dfa_backward": ms(samples["D"][l]),
                           "activation_bytes": mem["bp"][0], "shared_bytes": mem["bp"][1],
                           "dfa_activation_bytes": mem["dfa"][0], "dfa_shared_bytes": mem["dfa"][1],
                           "update": update_ms(b)})
    head_mem = {}
    for mode in ("bp", "dfa"):
        hin = head_in.detach().requires_grad_(mode == "bp" or not head_params)
        _, found = _saved(lambda: loss_fn(head(hin), y), skip)
        inp = float(found.get(_ptr(hin), 0)) if previous_output[mode] else 0.0
        head_mem[mode] = (float(sum(found.values())), inp)
    _clear(model)
    head_cost = {"name": "head+loss", "forward": ms(head_samples["F"]), "backward": ms(head_samples["B"]),
                 "weight_backward": ms(head_samples["D"]), "dfa_backward": ms(head_samples["D"]),
                 "activation_bytes": head_mem["bp"][0], "shared_bytes": head_mem["bp"][1],
                 "dfa_activation_bytes": head_mem["dfa"][0], "dfa_shared_bytes": head_mem["dfa"][1],
                 "update": update_ms(head)}
    return {"blocks": out_blocks, "head": head_cost}


def execute(job: Job, state: str, ctx) -> str:
    from .. import bench as harness
    from .. import models
    from ..train.setup import make_optimizer, resolve_device

    cfg = job.config
    q = job.params
    device = resolve_device(cfg.run.device)
    key = f"task:{cfg.run.dataset}:{sorted(cfg.data.items())}:{device}"
    if key not in ctx.cache:
        ctx.cache[key] = harness.load_task(cfg, device, ctx.data_dir)
    task = ctx.cache[key]
    before = torch.get_num_threads()
    if q["threads"]:
        torch.set_num_threads(q["threads"])
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.run.seed)
            model = models.create(cfg.run.model, task.input_shape, task.num_classes, **cfg.model).to(device)
        x, y = task.train_batch(cfg.run.seed, 0, 0, cfg.run.batch_size)
        g = torch.Generator().manual_seed(cfg.run.seed)
        costs = measure(model, x.to(device), y.to(device), task.loss_fn, q["repeats"], q["warmup"], g,
                        optimizer=lambda params: make_optimizer(cfg.run, params))
    finally:
        threads = torch.get_num_threads()
        torch.set_num_threads(before)
    record = {**costs, "threads": threads, "device": str(device), "micro_batch": cfg.run.batch_size,
              "model": cfg.run.model, "dataset": cfg.run.dataset, "input_shape": list(task.input_shape)}
    save_result(job, record)
    F = sum(b["forward"] for b in costs["blocks"])
    B = sum(b["backward"] for b in costs["blocks"])
    D = sum(b["dfa_backward"] for b in costs["blocks"])
    return f"{len(costs['blocks'])} blocks: F {F:.1f} ms, B {B:.1f} ms, D {D:.1f} ms per micro-batch"


# -- results -----------------------------------------------------------------------------------------
COST_KEYS = ("forward", "backward", "weight_backward", "dfa_backward", "activation_bytes", "shared_bytes",
             "dfa_activation_bytes", "dfa_shared_bytes", "update")


def _mean_costs(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"name": items[0]["name"], **{k: statistics.fmean(float(i.get(k, 0.0)) for i in items) for k in COST_KEYS}}


def block_cost(d: dict[str, Any]) -> sim.BlockCost:
    """A stored cost dict (ms, bytes) as a :class:`.pipeline_sim.BlockCost` (``update``: 0 when not stored)."""
    return sim.BlockCost(**{k: float(d.get(k, 0.0)) for k in COST_KEYS})


def write(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict], root: Path) -> dict[str, Any]:
    p, _ = params(spec, scale)
    models: dict[str, dict[str, Any]] = {}
    for job, rec in zip(jobs, records):
        m = models.setdefault(job.label, {"label": job.label, "model": rec["model"], "dataset": rec["dataset"],
                                          "input_shape": rec["input_shape"], "micro_batch": rec["micro_batch"],
                                          "seeds": []})
        m["seeds"].append({"blocks": rec["blocks"], "head": rec["head"], "threads": rec["threads"],
                           "device": rec["device"]})
    for m in models.values():
        m["blocks"] = [_mean_costs([s["blocks"][l] for s in m["seeds"]]) for l in range(len(m["seeds"][0]["blocks"]))]
        m["head"] = _mean_costs([s["head"] for s in m["seeds"]])
    threads = sorted({rec["threads"] for rec in records})
    devices = sorted({rec["device"] for rec in records})
    sizes = "; ".join(f"{m['label']}: {m['dataset']}-shaped {tuple(m['input_shape'])}, micro-batches of "
                      f"{m['micro_batch']}" for m in models.values())
    caption = (f"Predicted by bpfree.experiment.pipeline_sim from per-block costs measured on {', '.join(devices)} "
               f"with {'/'.join(map(str, threads))} thread(s) ({sizes}; median of {p.repeats} rounds after "
               f"{p.warmup}, mean over {seeds} seed(s)); p2p latency {p.latency_ms:g} ms per message. Stages: the "
               f"contiguous cut of the blocks minimising the largest stage's F+B (BP) or F+D (DFA), head on the last "
               f"stage; 'replicated': S above the number of blocks, S identical blocks of the measured mean cost. "
               f"ms: one optimizer step: M forward and backward passes, then each stage's optimizer step over its "
               f"blocks' parameters (the run's optimizer, timed per block). Ratios: throughput of "
               f"the DFA pipeline over BP's (T_bp / T_dfa). Bubble: 1 − busy / (S × step time). Peak MB: the most "
               f"loaded stage's peak activations (micro-batches held × what its blocks save per micro-batch).")
    doc = {"caption": caption, "stages": list(p.stages), "microbatches": list(p.microbatches),
           "latency_ms": p.latency_ms, "models": list(models.values())}
    return {**doc, **render(spec, scale, doc, root)}


def predictions(model: dict[str, Any], stages: list[int], microbatches: list[int], latency_ms: float) -> list[dict]:
    """One row per (S, M): the three schedules' step times (ms), ratios, bubbles and peak memory."""
    blocks = [block_cost(b) for b in model["blocks"]]
    head = block_cost(model["head"])
    rows = []
    for S in stages:
        bp_costs, bp_bytes, bp_bounds, replicated = sim.model_stages(blocks, S, head, "bp")
        dfa_costs, dfa_bytes, dfa_bounds, _ = sim.model_stages(blocks, S, head, "dfa")
        for M in microbatches:
            res = {**sim.predict(bp_costs, M, latency_ms, ("gpipe", "1f1b")),
                   "dfa": sim.predict(dfa_costs, M, latency_ms, ("dfa",))["dfa"]}
            per_micro = {"gpipe": bp_bytes, "1f1b": bp_bytes, "dfa": dfa_bytes}
            rows.append({
                "model": model["label"], "S": S, "M": M, "replicated": replicated,
                "layout_bp": [b - a for a, b in bp_bounds], "layout_dfa": [b - a for a, b in dfa_bounds],
                "ms": {k: r.total for k, r in res.items()},
                "ratio_1f1b": res["1f1b"].total / res["dfa"].total,
                "ratio_gpipe": res["gpipe"].total / res["dfa"].total,
                "bubble": {k: r.bubble_fraction for k, r in res.items()},
                "peak_micro": {k: max(r.peak_activations) for k, r in res.items()},
                "peak_mb": {k: max(sim.activation_bytes(r, per_micro[k])) / 2**20 for k, r in res.items()},
            })
    return rows


def _layout(row: dict[str, Any]) -> str:
    if row["replicated"]:
        return f"replicated ({row['S']} × mean block)"
    bp, dfa = "+".join(map(str, row["layout_bp"])), "+".join(map(str, row["layout_dfa"]))
    return bp if bp == dfa else f"{bp} / {dfa}"


def render(spec: Spec, scale: Scale, doc: dict[str, Any], root: Path, jobs: list[Job] | None = None) -> dict[str, Any]:
    """``table.md`` and ``pipeline.png`` from the results ``doc`` (or a ``results.json``); the
    predictions are computed again from the stored costs."""
    rows = [r for m in doc["models"] for r in predictions(m, doc["stages"], doc["microbatches"], doc["latency_ms"])]
    head = ["model", "S", "M", "blocks per stage (BP / DFA)", "GPipe ms", "1F1B ms", "DFA ms", "DFA / 1F1B",
            "DFA / GPipe", "bubble 1F1B", "bubble DFA", "peak MB GPipe / 1F1B / DFA"]
    table_rows = [[r["model"], str(r["S"]), str(r["M"]), _layout(r), f"{r['ms']['gpipe']:.1f}",
                   f"{r['ms']['1f1b']:.1f}", f"{r['ms']['dfa']:.1f}", f"{r['ratio_1f1b']:.2f}",
                   f"{r['ratio_gpipe']:.2f}", f"{r['bubble']['1f1b']:.0%}", f"{r['bubble']['dfa']:.0%}",
                   " / ".join(f"{r['peak_mb'][k]:.1f}" for k in ("gpipe", "1f1b", "dfa"))] for r in rows]
    cost_head = ["model", "block", "children", "F ms", "B ms (BP)", "W ms (BP, no input grad)", "D ms (DFA)",
                 "D / B", "update ms", "saved MB (BP / DFA)"]
    cost_rows = []
    for m in doc["models"]:
        for i, b in enumerate(m["blocks"] + [m["head"]]):
            cost_rows.append([m["label"], "head" if i == len(m["blocks"]) else str(i + 1), b["name"],
                              f"{b['forward']:.2f}", f"{b['backward']:.2f}", f"{b['weight_backward']:.2f}",
                              f"{b['dfa_backward']:.2f}",
                              f"{b['dfa_backward'] / b['backward']:.2f}" if b["backward"] else "–",
                              f"{b.get('update', 0.0):.2f}",
                              f"{b['activation_bytes'] / 2**20:.2f} / {b['dfa_activation_bytes'] / 2**20:.2f}"])
    caption = stored_caption(doc, root)
    table = (f"{spec.title} — scale {scale.name}: {caption}\n\n" + markdown_table(head, table_rows)
             + "\nMeasured costs per micro-batch (medians; the head includes the loss; the first block's BP "
               "backward is W):\n\n" + markdown_table(cost_head, cost_rows))
    (root / "table.md").write_text(table)
    plot = _plot(rows, root / "pipeline.png")
    return {"table": "table.md", "plots": [plot.name], "caption": caption, "rows": rows}


def _plot(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    labels = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(labels), figsize=(5.6 * len(labels), 8.2), squeeze=False)
    Ms = sorted({r["M"] for r in rows})
    Ss = sorted({r["S"] for r in rows})
    colours = sequential(len(Ms))
    for j, label in enumerate(labels):
        ax, mem = axes[0, j], axes[1, j]
        mine = [r for r in rows if r["model"] == label]
        for i, M in enumerate(Ms):
            pts = sorted((r["S"], r) for r in mine if r["M"] == M)
            xs = [s for s, _ in pts]
            curve(ax, xs, [r["ratio_1f1b"] for _, r in pts], color=colours[i], ls="-", marker=MARKERS[i % len(MARKERS)],
                  ms=4, label=f"M={M}, over 1F1B")
            curve(ax, xs, [r["ratio_gpipe"] for _, r in pts], color=colours[i], ls="--", marker=MARKERS[i % len(MARKERS)],
                  ms=3, mfc="white", label=f"M={M}, over GPipe")
        reference_line(ax, 1.0, "BP's throughput", colour=method_colour("bp"), ls=":")
        replicated = {r["S"] for r in mine if r["replicated"]}
        xlabel = "stages S" + (" (*: S identical mean blocks, more stages than blocks)" if replicated else "")
        ax.set(title=f"{label}: DFA pipeline throughput / BP's", xlabel=xlabel,
               ylabel="T_bp / T_dfa (axis from 0)")
        ax.set_ylim(bottom=0)
        M = Ms[-1]
        pts = sorted((r["S"], r) for r in mine if r["M"] == M)
        xs = [s for s, _ in pts]
        styles = (("gpipe", "BP GPipe", method_colour("bp"), "--", 1.2, 4), ("1f1b", "BP 1F1B", method_colour("bp"), "-", 3.0, 7),
                  ("dfa", "DFA pipeline", method_colour("dfa"), "-", 1.2, 4))  # 1F1B drawn wide: DFA often lies on it
        for k, (name, text, colour, ls, lw, size) in enumerate(styles):
            curve(mem, xs, [r["peak_mb"][name] for _, r in pts], color=colour, ls=ls, lw=lw, marker=MARKERS[k],
                  ms=size, alpha=0.55 if name == "1f1b" else 1.0, label=text)
        mem.set(title=f"{label}: peak activations of the most loaded stage, M={M}", xlabel=xlabel,
                ylabel="MB (axis from 0)")
        mem.set_ylim(bottom=0)
        for a in (ax, mem):
            a.set_xscale("log", base=2)
            a.set_xticks(Ss, [f"{s}*" if s in replicated else str(s) for s in Ss])
            a.minorticks_off()
            a.grid(alpha=0.3)
            a.legend(fontsize=7, ncol=2 if a is ax else 1)
    fig.suptitle("How much faster would a DFA pipeline train than BP's GPipe and 1F1B, and with how much "
                 "activation memory, as stages and micro-batches grow? (predicted from measured block costs)",
                 fontsize=10)
    return save_figure(fig, path)
