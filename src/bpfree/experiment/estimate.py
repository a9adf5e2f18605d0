"""Kind ``estimate``: quality of the forward-mode Jacobian estimate vs the number of samples (Q4).

For every depth ``L`` (an MLP with ``L`` hidden layers of ``width`` units), batch size ``k`` and
seed: the exact mean Jacobian ``Jbar_l`` at every feedback point, over ``reference`` held-out
inputs (:func:`bpfree.metrics.jacobians.mean_jacobians`), and the cumulative mean of ``N``
forward-mode estimates (:func:`bpfree.feedback.estimators.sample_jacobians`, all points perturbed
jointly, as GrAPE does), each on a fresh sub-batch of ``k`` training inputs. Measured: the
Frobenius cosine of the cumulative mean with ``Jbar_l`` at each ``N`` in ``samples``, per point
and averaged over points. The seed draws the weights, the inputs and the tangents.

Theory: the cumulative mean of ``N`` independent unbiased estimates has error ``|E|_F^2 ~ s^2/N``,
so ``1/cos^2 - 1 ~ a/N`` with ``a = s^2/|Jbar|_F^2``. The table gives the fitted slope of
``log(1/cos^2 - 1)`` against ``log N`` (theory: -1); the figure draws ``1/sqrt(1 + a/N)`` with
``a`` fitted to the measured curve, dashed.

Inputs: MNIST (or ``data``) from the cache; when it is not there, standard normal inputs of
MNIST's shape, and the table says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import models
from ..feedback.estimators import sample_jacobians
from ..feedback.matrices import frobenius_cos
from ..metrics.jacobians import mean_jacobians
from ..options import OptionError, option
from ..points import feedback_points
from ..plots import sequential
from .common import (Job, build_params, markdown_table, mean_std, pm, pyplot, save_figure, save_result, slug,
                     stored_caption)
from .spec import Scale, Spec

INPUT_SHAPE, CLASSES = (1, 28, 28), 10


@dataclass
class Params:
    depths: tuple[int, ...] = option((1, 2, 4, 8), "hidden layers of the MLP")
    width: int = option(256, "units per hidden layer")
    batches: tuple[int, ...] = option((16, 128), "sub-batch size k of each forward-mode estimate")
    samples: tuple[int, ...] = option((1, 2, 4, 8, 16, 32, 64, 128, 256), "numbers N of estimates averaged")
    activation: str = option("tanh", "hidden non-linearity of the MLP")
    model: str = option("mlp", "model (built with widths = [width] * depth and activation)")
    data: str = option("mnist", "inputs: mnist or fashion-mnist (from the cache), or random")
    reference: int = option(8192, "held-out inputs over which the exact mean Jacobian is taken")

    def check(self) -> None:
        if not (self.depths and self.batches and self.samples):
            raise OptionError("options 'depths', 'batches' and 'samples' must each list at least one value")
        if min(self.depths) < 1 or min(self.batches) < 1 or min(self.samples) < 1 or self.width < 1 or self.reference < 1:
            raise OptionError("depths, width, batches, samples and reference must be at least 1")
        if self.data not in ("mnist", "fashion-mnist", "random"):
            raise OptionError(f"option 'data' takes mnist, fashion-mnist or random, got {self.data!r}")


PARAMS = Params


def params(spec: Spec, scale: Scale) -> Params:
    return build_params(Params, spec, {**spec.params, **scale.overrides})


def jobs(spec: Spec, scale: Scale, seeds: int, root: Path) -> list[Job]:
    p = params(spec, scale)
    models.get(p.model)  # an unknown model fails here, before anything runs
    out = []
    for depth in p.depths:
        for batch in p.batches:
            label = f"depth {depth}, batch {batch}"
            for k in range(seeds):
                q = {"depth": depth, "batch": batch, "seed": k, "width": p.width, "samples": sorted(set(p.samples)),
                     "activation": p.activation, "model": p.model, "data": p.data, "reference": p.reference}
                out.append(Job(label, k, root / "runs" / slug(label) / f"seed{k}", q, {"depth": depth, "batch": batch}))
    return out


def _cached(name: str, data_dir: Path | None) -> bool:
    """Whether ``name``'s files are all in the cache already (nothing would be fetched)."""
    from ..data import DATASETS, default_data_dir

    root = (Path(data_dir).expanduser() if data_dir is not None else default_data_dir()) / name
    return all((root / f).exists() for f in DATASETS[name].files)


def inputs(q: dict[str, Any], ctx, n_pool: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, str]:
    """``(pool, reference, description)``: ``n_pool`` training inputs in random order and
    ``reference`` held-out ones (test split), or standard normal inputs when the data is absent."""
    name = q["data"]
    if name != "random" and _cached(name, ctx.data_dir):
        key = f"task:{name}"
        if key not in ctx.cache:
            from .. import tasks

            ctx.cache[key] = tasks.load(name, {}, ctx.data_dir)
        task = ctx.cache[key]
        n_train = len(task.train_x)
        idx = torch.randperm(n_train, generator=generator)
        idx = idx.repeat(-(-n_pool // n_train))[:n_pool]  # with repetition only if the pool exceeds the split
        ref = task.prepare(task.test_x[: q["reference"]])
        return task.prepare(task.train_x[idx]), ref, f"{name} ({len(ref)} test inputs for the exact Jacobian)"
    why = "random N(0, 1) inputs" + ("" if name == "random" else f" ({name} is not in the cache)")
    pool = torch.randn((n_pool,) + INPUT_SHAPE, generator=generator)
    return pool, torch.randn((q["reference"],) + INPUT_SHAPE, generator=generator), why


def exact_mean_jacobians(model: torch.nn.Module, x: torch.Tensor, chunk: int = 2048) -> dict[str, torch.Tensor]:
    """The exact mean Jacobian per point over all of ``x`` (in chunks, weighted by their sizes)."""
    total: dict[str, torch.Tensor] = {}
    for i in range(0, len(x), chunk):
        part = x[i : i + chunk]
        for name, J in mean_jacobians(model, part).items():
            J = J.double() * len(part)
            total[name] = total[name] + J if name in total else J
    return {name: J / len(x) for name, J in total.items()}


def measure(model: torch.nn.Module, pool: torch.Tensor, reference: torch.Tensor, batch: int, samples: list[int],
            generator: torch.Generator) -> dict[str, Any]:
    """Per point, the Frobenius cosine of the cumulative mean of ``N`` estimates (each on the next
    ``batch`` inputs of ``pool``) with the exact mean Jacobian over ``reference``, at each ``N``."""
    names = {id(p): n for n, p in feedback_points(model)}
    exact = exact_mean_jacobians(model, reference)
    running: dict[str, torch.Tensor] = {}
    cos: dict[str, list[float]] = {n: [] for n in exact}
    wanted = set(samples)
    for i in range(max(samples)):
        est = sample_jacobians(model, pool[i * batch : (i + 1) * batch], names, generator)
        for name, J in est.items():
            J = J.double()
            running[name] = J if i == 0 else running[name] + (J - running[name]) / (i + 1)
        if i + 1 in wanted:
            for name in exact:
                cos[name].append(float(frobenius_cos(running[name], exact[name])))
    return {"exact": exact, "cos": cos}


def execute(job: Job, state: str, ctx) -> str:
    q = job.params
    samples = q["samples"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(q["seed"])
        model = models.create(q["model"], INPUT_SHAPE, CLASSES, widths=[q["width"]] * q["depth"], activation=q["activation"])
    g = torch.Generator().manual_seed(q["seed"])
    pool, ref, what = inputs(q, ctx, max(samples) * q["batch"], g)
    result = measure(model, pool, ref, q["batch"], samples, g)
    points = result["cos"]
    mean = [sum(v[i] for v in points.values()) / len(points) for i in range(len(samples))]
    save_result(job, {"samples": samples, "cos": mean, "points": points, "inputs": what})
    return f"cosine {mean[0]:.3f} at N={samples[0]}, {mean[-1]:.3f} at N={samples[-1]}"


def fit(samples: list[int], cos: list[float]) -> tuple[float | None, float | None]:
    """``(slope, a)``: the least-squares slope of ``log(1/cos^2 - 1)`` on ``log N``, and ``a`` of the
    fixed-slope law ``1/cos^2 - 1 = a/N`` (geometric mean of ``N (1/cos^2 - 1)``); points with a
    cosine outside (0, 1) are left out."""
    pts = [(math.log(n), math.log(1 / c**2 - 1)) for n, c in zip(samples, cos) if 0 < c < 1]
    if not pts:
        return None, None
    a = math.exp(sum(x + y for x, y in pts) / len(pts))
    if len(pts) < 2:
        return None, a
    mx, my = sum(x for x, _ in pts) / len(pts), sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None
    return slope, a


def write(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict], root: Path) -> dict[str, Any]:
    p = params(spec, scale)
    samples = sorted(set(p.samples))
    rows: dict[str, dict[str, Any]] = {}
    for job, rec in zip(jobs, records):
        r = rows.setdefault(job.label, {"label": job.label, **job.row, "seeds": []})
        r["seeds"].append(rec)
    for r in rows.values():
        r["cos"] = [mean_std([s["cos"][i] for s in r["seeds"]]) for i in range(len(samples))]
        r["slope"], r["a"] = fit(samples, [m for m, _ in r["cos"]])
    inputs_used = sorted({s["inputs"] for r in rows.values() for s in r["seeds"]})
    caption = (f"Frobenius cosine of the mean of N forward-mode estimates with the exact mean Jacobian, averaged "
               f"over feedback points; {p.model} of width {p.width}, {p.activation}; inputs: {'; '.join(inputs_used)}; "
               f"{seeds} seed(s), mean ± std (n − 1). Slope: least-squares slope of log(1/cos² − 1) on log N.")
    doc = {"caption": caption, "samples": samples, "inputs": inputs_used, "rows": list(rows.values())}
    return {**doc, **render(spec, scale, doc, root)}


def render(spec: Spec, scale: Scale, doc: dict[str, Any], root: Path, jobs: list[Job] | None = None) -> dict[str, Any]:
    """``table.md`` and ``estimate.png`` from the results ``doc`` (or a ``results.json``)."""
    samples, rows = doc["samples"], doc["rows"]
    table_rows = [[str(r["depth"]), str(r["batch"])] + [pm(m, s, 3) for m, s in r["cos"]]
                  + ["–" if r["slope"] is None else f"{r['slope']:.2f}"] for r in rows]
    head = ["depth", "batch k"] + [f"N={n}" for n in samples] + ["slope (theory −1)"]
    caption = stored_caption(doc, root)
    table = f"{spec.title} — scale {scale.name}: {caption}\n\n" + markdown_table(head, table_rows)
    (root / "table.md").write_text(table)
    plot = _plot(rows, samples, root / "estimate.png")
    return {"table": "table.md", "plots": [plot.name], "caption": caption}


def _plot(rows: list[dict], samples: list[int], path: Path) -> Path:
    plt = pyplot()
    batches = list(dict.fromkeys(r["batch"] for r in rows))
    fig, axes = plt.subplots(1, len(batches), figsize=(5.5 * len(batches), 4.3), squeeze=False)
    depths = list(dict.fromkeys(r["depth"] for r in rows))
    colours = sequential(len(depths))
    for ax, batch in zip(axes.ravel(), batches):
        for r in (r for r in rows if r["batch"] == batch):
            colour = colours[depths.index(r["depth"])]
            means = [m for m, _ in r["cos"]]
            errs = [s or 0.0 for _, s in r["cos"]]
            ax.errorbar(samples, means, yerr=errs, color=colour, marker="o", ms=3, capsize=2, label=f"depth {r['depth']}")
            if r["a"] is not None:
                grid = [samples[0] * (samples[-1] / samples[0]) ** (i / 60) for i in range(61)]
                ax.plot(grid, [1 / math.sqrt(1 + r["a"] / n) for n in grid], color=colour, ls="--", lw=0.9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(samples, [str(n) for n in samples], fontsize=8)
        ax.set(title=f"sub-batch k = {batch} (dashed: fitted 1/sqrt(1 + a/N))", xlabel="N (estimates averaged)",
               ylabel="Frobenius cosine with the exact J̄ (axis from 0)", ylim=(0, 1.05))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("How fast does the forward-mode Jacobian estimate approach the exact mean Jacobian as samples "
                 "are averaged? (mean ± std over seeds)", fontsize=10)
    return save_figure(fig, path)
