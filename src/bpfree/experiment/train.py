"""Kind ``train``: a table of training runs, one row per variant (and grid point), over seeds.

Every (grid point x variant x seed) is one run of the training loop in
``results/NAME/SCALE/runs/<row-slug>/seed<k>/``. Its configuration is, in increasing precedence:
the experiment's ``[base]``, the scale's overrides, the grid point, the variant's keys (then its
keys under the scale's name). Keys of methods other than the row's (``rule`` on a BP row) are
skipped, as ``bpfree compare`` does. Seed ``k`` adds ``k`` to ``run.seed`` and to the method's own
``seed`` option when it has one (the seed of its feedback matrices or tangents), so seeds differ
in weights, data order and feedback.

A run whose ``summary.json`` exists (with the same configuration) is kept; one with a checkpoint
is resumed; others start afresh. A run whose loss diverged leaves ``error.txt`` and counts as done
(its row says so); delete the folder to try it again. A run folder whose ``config.toml`` differs
from the experiment's configuration (the file was edited) is trained again.

Written to ``results/NAME/SCALE/``: ``table.md`` (per row the primary test metric, mean ± std
over seeds, test loss, training seconds, seeds, and with diagnostics the final Frobenius cosine of
``B_l`` with the exact mean Jacobian and of the signal with BP's, each averaged over points),
``metric.png`` (the test metric per row with std error bars) and, with diagnostics,
``alignment.png`` (both cosines over training, mean over seeds).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any

from .. import methods
from ..options import OptionError
from ..train import loop
from ..train.checkpoint import save_text
from ..train.config import SECTIONS, RunOptions, load_toml, resolve
from .common import (DONE, FAILED, NEW, RESUME, STALE, Job, markdown_table, mean_std, pm, pyplot, save_figure,
                     show, slug)
from .spec import Scale, Spec, variant_keys

PARAMS = None
RUN_FIELDS = {f.name for f in dataclasses.fields(RunOptions)}
DIAGNOSTICS = {"b_jacobian_cos": "cos(B_l, exact mean J_l^T), Frobenius, mean over points",
               "signal_cos": "cos(B_l e, BP signal J_l^T e), mean over points"}


def compose(base: dict[str, Any], layers: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(base, run overrides)`` for :func:`bpfree.train.config.resolve` from ``base`` and flat ``layers``.

    Run options (``epochs``, ``run.epochs``...) of every layer, and the base's flat ones, become
    overrides (later layers win); every other flat key stays a flat key of the base, after the
    base's own, so that later layers win there too.
    """
    sections = {k: dict(v) for k, v in base.items() if k in SECTIONS and isinstance(v, dict)}
    flat = {k: v for k, v in base.items() if k not in sections}
    run: dict[str, Any] = {}
    other: dict[str, Any] = {}
    for layer in [flat, *layers]:
        for key, value in layer.items():
            name = key[4:] if key.startswith("run.") else key
            if name in RUN_FIELDS:
                run[name] = value
            else:
                other.pop(key, None)  # re-insert: a later layer's key comes after the earlier ones
                other[key] = value
    return {**sections, **other}, run


def _methods_named(spec: Spec, grid: dict[str, list[Any]]) -> tuple[str, ...]:
    """Every method the experiment may run (for keys that belong to some of them only)."""
    names = [v.get("method") for v in spec.variants] + list(grid.get("method", []))
    names += [spec.base.get("method"), spec.base.get("run", {}).get("method") if isinstance(spec.base.get("run"), dict) else None]
    known = set(methods.available())
    return tuple(sorted({n for n in names if isinstance(n, str) and n in known}))


def jobs(spec: Spec, scale: Scale, seeds: int, root: Path) -> list[Job]:
    """One job per (grid point, variant, seed); configurations resolved (errors before any training)."""
    grid = spec.grid_at(scale)
    siblings = _methods_named(spec, grid)
    out: list[Job] = []
    slugs: dict[str, str] = {}
    for values in itertools.product(*grid.values()):
        point = dict(zip(grid, values))
        for variant in spec.variants:
            name = variant["name"]
            label = name + "".join(f", {k}={show(v)}" for k, v in point.items())
            keys = variant_keys(variant, scale.name)
            base, over = compose(spec.base, [scale.overrides, point, keys])
            try:
                cfg = resolve(base, (), over, sibling_methods=siblings)
            except (OptionError, ValueError, TypeError) as err:
                raise OptionError(f"{spec.path}: scale {scale.name!r}, row {label!r}: {err}") from None
            s = slug(label)
            if s in slugs:
                raise OptionError(f"{spec.path}: rows {slugs[s]!r} and {label!r} share the folder name {s!r}; rename one")
            slugs[s] = label
            row = {"variant": name, **{k: show(v) for k, v in point.items()}}
            for k in range(seeds):
                c = copy.deepcopy(cfg)
                c.run.seed = cfg.run.seed + k
                if isinstance(c.method.get("seed"), int):
                    c.method["seed"] = cfg.method["seed"] + k
                out.append(Job(label, k, root / "runs" / s / f"seed{k}", c.to_dict(), row, c))
    return out


def _comparable(cfg: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A configuration without the device (where a run computes, not what it computes)."""
    out = json.loads(json.dumps(cfg))
    out["run"].pop("device", None)
    return out


def status(job: Job) -> str:
    d = job.dir
    if not (d / "config.toml").exists():
        return NEW
    try:
        same = _comparable(resolve(load_toml(d / "config.toml")).to_dict()) == _comparable(job.config.to_dict())
    except (OptionError, ValueError, TypeError):
        same = False
    if not same:
        return STALE
    if (d / "summary.json").exists():
        return DONE
    if (d / "error.txt").exists():
        return FAILED
    if (d / "checkpoint.pt").exists():
        return RESUME
    return NEW


def diverged(err: Exception) -> bool:
    """Whether a training error is a divergence (non-finite loss or weights), a result of the run."""
    text = str(err)
    return "the loss became" in text or "weights became non-finite" in text


def execute(job: Job, state: str, ctx) -> str:
    """Train (or resume) the run; returns one line saying how it ended."""
    try:
        if state == RESUME:
            s = loop.resume(job.dir, data_dir=ctx.data_dir, progress=False, trust_checkpoint=ctx.trust_checkpoints)
        else:
            (job.dir / "error.txt").unlink(missing_ok=True)
            s = loop.train(job.config, job.dir, data_dir=ctx.data_dir, progress=False, overwrite=True)
    except loop.TrainingError as err:
        if not diverged(err):
            raise
        save_text(str(err) + "\n", job.dir / "error.txt")
        return f"diverged: {err}"
    key = s["primary"]
    return f"{key.replace('_', ' ')} {s[key]:.4f}, {s['train_seconds']:.1f} s"


def diagnostics_curves(path: Path) -> dict[str, Any]:
    """Per diagnostics line of ``metrics.jsonl``: step and each cosine averaged over points."""
    curves: dict[str, Any] = {"step": []}
    points: dict[str, dict[str, float]] = {}
    if not path.exists():
        return {}
    lines = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    diag = [l for l in lines if l.get("kind") == "diagnostics"]
    if not diag:
        return {}
    for key in DIAGNOSTICS:
        curves[key] = []
    for line in diag:
        curves["step"].append(line["step"])
        for key in DIAGNOSTICS:
            vals = {k.split("/", 1)[1]: v for k, v in line.items() if k.startswith(key + "/")}
            curves[key].append(sum(vals.values()) / len(vals) if vals else None)
            if vals:
                points[key] = vals
    final = {key: curves[key][-1] for key in DIAGNOSTICS}
    return {"curves": curves, "final": final, "final_points": points}


def record(job: Job) -> dict[str, Any]:
    """The run's figures: from ``summary.json`` (or ``error.txt``) and ``metrics.jsonl``."""
    d = job.dir
    rec: dict[str, Any] = {"seed": job.seed, "run_seed": job.config.run.seed, "method": job.config.run.method}
    if (d / "summary.json").exists():
        s = json.loads((d / "summary.json").read_text())
        rec.update(primary=s["primary"], value=s[s["primary"]], test_loss=s["test_loss"],
                   train_seconds=s["train_seconds"], steps=s["steps"])
    else:
        rec["failed"] = (d / "error.txt").read_text().strip() if (d / "error.txt").exists() else "no result"
    rec.update(diagnostics_curves(d / "metrics.jsonl"))
    return rec


def _metric_format(primary: str) -> tuple[str, float, int]:
    """Header, scale and decimals of the primary metric (accuracy in %)."""
    name = primary.replace("_", " ")
    if primary.endswith("accuracy"):
        return f"{name} (%)", 100.0, 2
    if primary.endswith("ppl"):
        return name, 1.0, 2
    return name, 1.0, 4


def _caption(jobs: list[Job], seeds: int) -> str:
    """The run settings every row shares."""
    keys = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr", "limit_train", "limit_test")
    parts = []
    for key in keys:
        vals = {json.dumps(getattr(j.config.run, key)) for j in jobs}
        if len(vals) == 1:
            v = getattr(jobs[0].config.run, key)
            if key.startswith("limit") and not v:
                continue
            parts.append(f"{key.replace('_', ' ')} {v}")
    return f"{', '.join(parts)}; {seeds} seed(s) per row, mean ± std (n − 1)."


def write(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict], root: Path) -> dict[str, Any]:
    """``table.md``, ``metric.png``, ``alignment.png`` (with diagnostics); returns the results."""
    grid_keys = list(spec.grid_at(scale))
    rows: dict[str, dict[str, Any]] = {}
    for job, rec in zip(jobs, records):
        row = rows.setdefault(job.label, {"label": job.label, **job.row, "method": job.config.run.method, "runs": []})
        row["runs"].append(rec)
    primary = next((r["primary"] for r in records if "primary" in r), "test_accuracy")
    header, factor, digits = _metric_format(primary)
    has_diag = any("final" in r for r in records)
    table_rows = []
    for row in rows.values():
        ok = [r for r in row["runs"] if "value" in r]
        row["n"] = len(ok)
        row["failed"] = [r["failed"] for r in row["runs"] if "failed" in r]
        row["mean"], row["std"] = mean_std([r["value"] for r in ok])
        row["test_loss"] = mean_std([r["test_loss"] for r in ok])
        row["train_seconds"] = mean_std([r["train_seconds"] for r in ok])
        cells = [row.get(k, "") for k in grid_keys] + [row["variant"], row["method"]]
        metric = pm(row["mean"], row["std"], digits, factor) if ok else "–"
        if row["failed"]:
            metric += f" ({len(row['failed'])} diverged)"
        cells += [metric, pm(*row["test_loss"], 4), pm(row["train_seconds"][0], None, 1), str(row["n"])]
        if has_diag:
            for key in DIAGNOSTICS:
                vals = [r["final"][key] for r in row["runs"] if r.get("final", {}).get(key) is not None]
                row[key] = mean_std(vals)
                cells.append(pm(*row[key], 3) if vals else "–")
        table_rows.append(cells)
    head = grid_keys + ["variant", "method", header, "test loss", "train s", "seeds"]
    if has_diag:
        head += ["final cos(B, J̄)", "final cos(signal, BP)"]
    table = (f"{spec.title} — scale {scale.name}: {_caption(jobs, seeds)}\n\n" + markdown_table(head, table_rows))
    if has_diag:
        table += ("\nfinal cos(B, J̄): Frobenius cosine of each feedback matrix with the exact mean Jacobian of "
                  "the probe batch; final cos(signal, BP): cosine of the method's signal with the BP signal "
                  "J^T e; both at the last diagnostics probe, averaged over feedback points.\n")
    (root / "table.md").write_text(table)
    plots = [_plot_metric(list(rows.values()), header, factor, root / "metric.png")]
    if has_diag:
        plots.append(_plot_alignment(list(rows.values()), root / "alignment.png"))
    return {"table": "table.md", "plots": [p.name for p in plots], "primary": primary, "grid": grid_keys,
            "rows": list(rows.values())}


def _plot_metric(rows: list[dict], header: str, factor: float, path: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.9 + 0.32 * len(rows)))
    y = list(range(len(rows)))[::-1]
    means = [r["mean"] * factor if r["n"] else 0.0 for r in rows]
    errs = [(r["std"] or 0.0) * factor for r in rows]
    ax.barh(y, means, xerr=errs, color="#4c72b0", ecolor="black", capsize=3)
    ax.set_yticks(y, [r["label"] for r in rows], fontsize=8)
    ax.set_xlabel(header + " (mean ± std over seeds)")
    finite = [m for r, m in zip(rows, means) if r["n"]]
    if finite:
        lo = min(finite)
        ax.set_xlim(left=max(0.0, lo - 0.15 * (max(finite) - lo + 1e-9) - max(errs, default=0)))
    return save_figure(fig, path)


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Mean over seeds of a diagnostics curve at the steps every seed measured."""
    curves = [r["curves"] for r in runs if r.get("curves")]
    if not curves:
        return [], []
    steps = sorted(set.intersection(*(set(c["step"]) for c in curves)))
    xs, ys = [], []
    for s in steps:
        vals = [c[key][c["step"].index(s)] for c in curves]
        if all(v is not None for v in vals):
            xs.append(s)
            ys.append(sum(vals) / len(vals))
    return xs, ys


def _plot_alignment(rows: list[dict], path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for ax, (key, title) in zip(axes, DIAGNOSTICS.items()):
        for i, row in enumerate(rows):
            xs, ys = _mean_curve(row["runs"], key)
            if xs:
                ax.plot(xs, ys, color=colours[i % len(colours)], ls=styles[(i // len(colours)) % len(styles)],
                        label=row["label"], lw=1.2)
        ax.set(title=title, xlabel="step", ylim=(-0.1, 1.05))
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    if handles:
        axes[1].legend(handles, labels, fontsize=7, ncol=2 if len(labels) > 8 else 1, loc="best")
    return save_figure(fig, path)
