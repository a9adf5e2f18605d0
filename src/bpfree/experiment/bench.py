"""Kind ``bench``: time per step and peak memory of methods over MLP depth and width (Q6).

For every depth ``L`` and width ``W``: the run configuration of ``[base]`` (and the scale's keys
that are not parameters of ``[bench]``) with ``widths = [W] * L``, timed by
:func:`bpfree.bench.bench` for every method (the median over ``repeats`` alternating samples,
each the mean step time over the longest method period, after ``warmup``; the peak memory its
training adds). Seed ``k`` adds ``k`` to ``run.seed``; the
table gives the mean over seeds of the medians. ``threads`` (if not 0) sets ``torch``'s CPU
threads for the timing.

``table.md``: ms/step, ratio to BP and peak MB per (depth, width, method). ``cost.png``: the
time ratio to BP against depth (one line per width and method, in the method's colour) and the
peak memory. Both are drawn from the stored results (``bpfree experiment render``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import bench as harness
from ..options import OptionError, option
from ..plots import LINESTYLES, MARKERS, curve, method_colour, reference_line
from .common import (Job, markdown_table, mean_std, pm, pyplot, save_figure, save_result, slug, split_params,
                     stored_caption)
from .spec import Scale, Spec
from .train import compose


@dataclass
class Params:
    depths: tuple[int, ...] = option((2, 4, 8), "hidden layers of the MLP")
    widths: tuple[int, ...] = option((256, 1024), "units per hidden layer")
    methods: tuple[str, ...] = option(("bp", "dfa", "grape"), "methods timed (ratios are to bp)")
    repeats: int = option(10, "timed steps per method (alternating)")
    warmup: int = option(3, "untimed steps per method first")
    memory: bool = option(True, "measure the peak memory (CPU: one subprocess per method)")
    threads: int = option(0, "torch CPU threads during the timing (0: torch's choice)")

    def check(self) -> None:
        if not (self.depths and self.widths and self.methods):
            raise OptionError("options 'depths', 'widths' and 'methods' must each list at least one value")
        if min(self.depths) < 1 or min(self.widths) < 1 or self.repeats < 1 or self.warmup < 0 or self.threads < 0:
            raise OptionError("depths, widths and repeats must be at least 1; warmup and threads not negative")


PARAMS = Params


def params(spec: Spec, scale: Scale) -> tuple[Params, dict[str, Any]]:
    """The ``[bench]`` parameters, and the scale's other keys (run configuration overrides)."""
    return split_params(Params, spec, scale.overrides)


def jobs(spec: Spec, scale: Scale, seeds: int, root: Path) -> list[Job]:
    p, rest = params(spec, scale)
    out = []
    for depth in p.depths:
        for width in p.widths:
            label = f"depth {depth}, width {width}"
            base, over = compose(spec.base, [rest, {"widths": [width] * depth}])
            try:
                cfgs = harness.configs(list(p.methods), base, [], over)
            except (OptionError, ValueError, TypeError) as err:
                raise OptionError(f"{spec.path}: scale {scale.name!r}, {label}: {err}") from None
            for k in range(seeds):
                seeded = [dataclasses.replace(c, run=dataclasses.replace(c.run, seed=c.run.seed + k)) for c in cfgs]
                q = {"configs": [c.to_dict() for c in seeded], "repeats": p.repeats, "warmup": p.warmup,
                     "memory": p.memory, "threads": p.threads}
                out.append(Job(label, k, root / "runs" / slug(label) / f"seed{k}", q, {"depth": depth, "width": width},
                               seeded))
    return out


def execute(job: Job, state: str, ctx) -> str:
    q = job.params
    before = torch.get_num_threads()
    if q["threads"]:
        torch.set_num_threads(q["threads"])
    try:
        rows = harness.bench(job.config, repeats=q["repeats"], warmup=q["warmup"], memory=q["memory"], progress=False,
                             data_dir=ctx.data_dir)
    finally:
        torch.set_num_threads(before)
    save_result(job, {"rows": rows, "threads": q["threads"] or before, "device": job.config[0].run.device})
    return ", ".join(f"{r['method']} {r['median_ms']:.2f} ms" for r in rows)


def write(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict], root: Path) -> dict[str, Any]:
    p, _ = params(spec, scale)
    cells: dict[tuple[int, int, str], dict[str, Any]] = {}
    for job, rec in zip(jobs, records):
        for r in rec["rows"]:
            c = cells.setdefault((job.row["depth"], job.row["width"], r["method"]),
                                 {"depth": job.row["depth"], "width": job.row["width"], "method": r["method"], "seeds": []})
            c["seeds"].append(r)
    for c in cells.values():
        c["median_ms"] = mean_std([r["median_ms"] for r in c["seeds"]])
        c["ratio_to_bp"] = mean_std([r["ratio_to_bp"] for r in c["seeds"]])
        mem = [r["peak_mem_mb"] for r in c["seeds"] if r.get("peak_mem_mb") is not None]
        c["peak_mem_mb"] = mean_std(mem) if mem else (None, None)
    cfg = jobs[0].config[0].run
    threads = sorted({rec["threads"] for rec in records})
    group = sorted({r.get("steps_per_sample", 1) for rec in records for r in rec["rows"]})
    caption = (f"{cfg.model} ({p.depths} hidden layers x {p.widths} units) on "
               f"{cfg.dataset}-shaped batches of {cfg.batch_size}, {cfg.optimizer}, device {cfg.device}, "
               f"{'/'.join(map(str, threads))} thread(s); median of {p.repeats} alternating samples, each the mean of "
               f"{'/'.join(map(str, group))} consecutive step(s) (GrAPE's period), after {p.warmup} warm-up "
               f"samples; {seeds} seed(s), mean ± std (n − 1) of the medians. Peak MB: memory the training "
               f"steps add (CUDA: max allocated; CPU: peak RSS growth in a subprocess).")
    doc = {"caption": caption, "rows": list(cells.values())}
    return {**doc, **render(spec, scale, doc, root)}


def render(spec: Spec, scale: Scale, doc: dict[str, Any], root: Path, jobs: list[Job] | None = None) -> dict[str, Any]:
    """``table.md`` and ``cost.png`` from the results ``doc`` (or a ``results.json``)."""
    cells = doc["rows"]
    table_rows = [[str(c["depth"]), str(c["width"]), c["method"], pm(*c["median_ms"], 2), pm(*c["ratio_to_bp"], 2),
                   pm(*c["peak_mem_mb"], 1) if c["peak_mem_mb"][0] is not None else "–"] for c in cells]
    head = ["depth", "width", "method", "ms/step", "ratio to bp", "peak MB"]
    caption = stored_caption(doc, root)
    table = f"{spec.title} — scale {scale.name}: {caption}\n\n" + markdown_table(head, table_rows)
    (root / "table.md").write_text(table)
    plot = _plot(cells, root / "cost.png")
    return {"table": "table.md", "plots": [plot.name], "caption": caption}


def _plot(cells: list[dict], path: Path) -> Path:
    plt = pyplot()
    has_mem = any(c["peak_mem_mb"][0] is not None for c in cells)
    fig, axes = plt.subplots(1, 2 if has_mem else 1, figsize=(11 if has_mem else 6, 4.4), squeeze=False)
    axes = axes.ravel()
    depths = sorted({c["depth"] for c in cells})
    widths = sorted({c["width"] for c in cells})
    methods = list(dict.fromkeys(c["method"] for c in cells))
    for wi, width in enumerate(widths):
        for method in methods:
            pts = sorted((c["depth"], c) for c in cells if c["width"] == width and c["method"] == method)
            if not pts:
                continue
            xs = [d for d, _ in pts]
            style = dict(color=method_colour(method), ls=LINESTYLES[wi % len(LINESTYLES)], marker=MARKERS[wi % len(MARKERS)],
                         ms=4, label=f"{method}, width {width}")
            if method != "bp":
                curve(axes[0], xs, [c["ratio_to_bp"][0] for _, c in pts], **style)
            if has_mem:
                curve(axes[1], xs, [c["peak_mem_mb"][0] for _, c in pts], **style)
    reference_line(axes[0], 1.0, "bp (ratio 1)", colour=method_colour("bp"), ls="-")
    axes[0].set(title="time per step / BP's", xlabel="depth (hidden layers)", ylabel="ratio to BP (axis from 0)")
    axes[0].set_ylim(bottom=0)
    if has_mem:
        axes[1].set(title="peak memory training adds", xlabel="depth (hidden layers)", ylabel="MB (axis from 0)")
        axes[1].set_ylim(bottom=0)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(depths, [str(d) for d in depths])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle("What does each method cost per step against BP, and how does it grow with depth and width?",
                 fontsize=10)
    return save_figure(fig, path)
