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

Written to ``results/NAME/SCALE/`` (by :func:`render`, from the per-seed records of
``results.json``, so ``bpfree experiment render`` redraws them without training): ``table.md``
(per row the primary test metric, mean ± std over seeds; the published number of the same row
(:mod:`.published`); for direct-feedback rows the fraction of the DFA→BP gap it closes, ours and
published; test loss, training seconds, seeds, and with diagnostics the final Frobenius cosine of
``B_l`` with the exact mean Jacobian and of the signal with BP's, each averaged over points),
``metric.png`` (the metric as bars grouped by grid point, one colour per method, std error bars,
published markers, chance level), ``gap.png`` (the gap closed, ours as bars and published as
markers) and, with diagnostics, ``alignment.png`` (both cosines over training, mean over seeds).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

from .. import methods
from ..options import OptionError
from ..train import loop
from ..train.checkpoint import save_text
from ..train.config import PLACEMENT, SECTIONS, RunOptions, load_toml, resolve
from ..plots import Bar, cosine_limits, curve, grouped_bars, integer_ticks, method_colour, reference_line, styles
from . import published as pub
from .common import (DONE, FAILED, NEW, RESUME, STALE, Job, markdown_table, mean_std, pm, pyplot, save_figure,
                     show, slug, stored_caption)
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
    """A configuration without the device and the other placement options (where a run computes,
    not what it computes)."""
    out = json.loads(json.dumps(cfg))
    for key in PLACEMENT:
        out["run"].pop(key, None)
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


def chance_level(cfg) -> float | None:
    """The accuracy of guessing (1 / classes) on the run's dataset, when its class count is known
    without loading it (the vision datasets); ``None`` otherwise."""
    from ..data.cifar import CIFAR
    from ..data.vision import DATASETS

    name = cfg.run.dataset
    if name in DATASETS:
        return 1.0 / DATASETS[name].num_classes
    if name in CIFAR:
        info = CIFAR[name]
        coarse = cfg.data.get("labels") == "coarse" and getattr(info, "coarse_classes", None)
        return 1.0 / (info.coarse_classes if coarse else info.num_classes)
    return None


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


def summarise(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict]) -> dict[str, Any]:
    """The results to store: per row (in job order) its label, grid values, method, dataset, chance
    level and per-seed records; the primary metric, the grid keys and the caption."""
    rows: dict[str, dict[str, Any]] = {}
    for job, rec in zip(jobs, records):
        row = rows.setdefault(job.label, {"label": job.label, **job.row, "method": job.config.run.method,
                                          "dataset": job.config.run.dataset, "chance": chance_level(job.config),
                                          "runs": []})
        row["runs"].append(rec)
    primary = next((r["primary"] for r in records if "primary" in r), "test_accuracy")
    return {"primary": primary, "grid": list(spec.grid_at(scale)), "caption": _caption(jobs, seeds),
            "rows": list(rows.values())}


def write(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict], root: Path) -> dict[str, Any]:
    """``table.md`` and the figures (see :func:`render`); returns the results."""
    doc = summarise(spec, scale, seeds, jobs, records)
    return {**doc, **render(spec, scale, doc, root)}


def _qualifier(variant: str) -> tuple[str, str]:
    """``("dfa+calib", "micro")`` for ``"dfa+calib (micro)"``; ``(variant, "")`` without parentheses."""
    m = re.match(r"^(.*?)\s*\(([^()]*)\)$", variant)
    return (m.group(1), m.group(2)) if m else (variant, "")


def direct_feedback(method: str) -> bool:
    """Whether ``method`` sends the output error straight to every point (DFA, GrAPE, DRTP, DKP...)."""
    from ..methods.dfa import DirectFeedback

    try:
        return issubclass(methods.get(method), DirectFeedback)
    except (KeyError, ValueError, OptionError):
        return False


def references(rows: list[dict], grid_keys: list[str]) -> dict[str, dict[str, str | None]]:
    """Per row label, the labels of its BP and DFA rows at the same grid point (``None`` if absent).

    BP: the row of variant ``bp (q)`` for a row of variant ``X (q)``, else ``bp``, else the only BP
    row of the grid point; DFA alike with ``dfa`` (method ``dfa`` without calibration in the shipped
    experiments).
    """
    out = {}
    for row in rows:
        point = [r for r in rows if all(r.get(k) == row.get(k) for k in grid_keys)]
        _, q = _qualifier(row["variant"])
        refs: dict[str, str | None] = {}
        for name in ("bp", "dfa"):
            of_method = [r for r in point if r["method"] == name]
            wanted = [f"{name} ({q})"] if q else []
            hit = next((r for w in wanted + [name] for r in of_method if r["variant"] == w), None)
            if hit is None and name == "bp" and len(of_method) == 1:
                hit = of_method[0]
            refs[name] = hit["label"] if hit else None
        out[row["label"]] = refs
    return out


def _stats(row: dict[str, Any], factor: float) -> None:
    """The row's figures over its seeds (from its per-seed records)."""
    ok = [r for r in row["runs"] if "value" in r]
    row["n"] = len(ok)
    row["failed"] = [r["failed"] for r in row["runs"] if "failed" in r]
    row["mean"], row["std"] = mean_std([r["value"] for r in ok])
    row["test_loss"] = mean_std([r["test_loss"] for r in ok])
    row["train_seconds"] = mean_std([r["train_seconds"] for r in ok])
    for key in DIAGNOSTICS:
        vals = [r["final"][key] for r in row["runs"] if r.get("final", {}).get(key) is not None]
        row[key] = mean_std(vals) if vals else (None, None)
    row["value"] = row["mean"] * factor if ok else None  # in the table's unit (accuracy in %)


def compare(spec: Spec, rows: list[dict], grid_keys: list[str], primary: str) -> None:
    """Per row: its published number (``published``: the entry and its value in the table's unit),
    its BP and DFA rows (``reference``), the gap closed (``gap_closed``) and the published gap closed
    (``published_gap_closed``, from the numbers of the row and of its BP and DFA rows when all three
    come from one source, dataset, model and setting). See :mod:`.published`."""
    refs = references(rows, grid_keys)
    by_label = {r["label"]: r for r in rows}
    entries: dict[str, pub.Entry | None] = {}
    for row in rows:
        grid = {k: row[k] for k in grid_keys if k in row}
        entries[row["label"]] = pub.match(spec.published, spec.published_compare, row["variant"], grid, primary,
                                          row["label"])
    for row in rows:
        e = entries[row["label"]]
        row["published"] = None if e is None else {**e.to_dict(), "converted": e.converted(primary)}
        row["reference"] = refs[row["label"]]
        row["gap_closed"] = row["published_gap_closed"] = None
        row["gap"] = "none"  # none: not a direct-feedback row or no BP/DFA row; undefined: BP = DFA; else defined
        bp, dfa = (by_label.get(refs[row["label"]][k]) for k in ("bp", "dfa"))
        if not direct_feedback(row["method"]) or bp is None or dfa is None:
            continue
        row["gap_closed"] = pub.gap_closed(row["value"], bp["value"], dfa["value"])
        if row["value"] is not None and bp["value"] is not None and dfa["value"] is not None:
            row["gap"] = "undefined" if bp["value"] == dfa["value"] else "defined"
        eb, ed = entries[bp["label"]], entries[dfa["label"]]
        if e is not None and eb is not None and ed is not None and \
                len({(x.source, x.dataset, x.model, x.setting) for x in (e, eb, ed)}) == 1:
            row["published_gap_closed"] = pub.gap_closed(e.converted(primary), eb.converted(primary),
                                                         ed.converted(primary))


def _gap_text(row: dict[str, Any], key: str) -> str:
    value = row[key]
    if value is not None:
        return f"{value:.2f}"
    if key == "gap_closed" and row["gap"] == "undefined":
        return "undefined (BP = DFA)"
    return "–"


def _published_note(rows: list[dict], header: str, primary: str) -> str:
    used = list(dict.fromkeys((r["published"]["source"], r["published"].get("dataset", ""),
                               r["published"].get("model", "")) for r in rows if r["published"]))
    if not used:
        return ""
    by_source: dict[str, list[str]] = {}
    for source, dataset, model in used:
        by_source.setdefault(source, []).append(" / ".join(x or "not stated" for x in (dataset, model)))
    parts = [f"{pub.SOURCES[s].cite()} ({', '.join(dict.fromkeys(v))})" for s, v in by_source.items()]
    converted = any(r["published"]["metric"] != primary for r in rows if r["published"])
    return (f"published: the {header} of the same variant (and grid point) in {'; '.join(parts)}"
            f"{', converted to this unit' if converted else ''}. The runs here follow the scale's assumptions, "
            f"not necessarily the published setting.")


GAP_NOTE = ("gap closed = (row − DFA) / (BP − DFA), from the means at the same grid point (DFA: the row `dfa`, or "
            "`dfa (q)` for a row `X (q)`; BP alike): 0 is DFA, 1 is BP, above 1 beats BP. For perplexity the same "
            "formula (lower is better; the signs cancel). Undefined where BP = DFA. gap closed (published): the same "
            "formula on the published numbers, all three from one source and setting.")


def render(spec: Spec, scale: Scale, doc: dict[str, Any], root: Path, jobs: list[Job] | None = None) -> dict[str, Any]:
    """``table.md``, ``metric.png``, ``gap.png`` (with gaps) and ``alignment.png`` (with diagnostics)
    from the results ``doc`` (as :func:`summarise` gives them, or a ``results.json``) and the
    experiment's published numbers; returns what changed in the results.

    ``jobs`` (the experiment's plan) fill in the dataset and chance level of rows stored without
    them (results written before they were stored).
    """
    rows, grid_keys, primary = doc["rows"], list(doc.get("grid", [])), doc.get("primary", "test_accuracy")
    header, factor, digits = _metric_format(primary)
    if jobs is not None:
        by_label = {j.label: j for j in jobs}
        for row in rows:
            if "chance" not in row and row["label"] in by_label:
                cfg = by_label[row["label"]].config
                row["dataset"], row["chance"] = cfg.run.dataset, chance_level(cfg)
    for row in rows:
        _stats(row, factor)
    compare(spec, rows, grid_keys, primary)
    has_diag = any("final" in r for row in rows for r in row["runs"])
    has_pub = any(r["published"] for r in rows)
    has_gap = any(r["gap"] != "none" or r["published_gap_closed"] is not None for r in rows)
    table_rows = []
    for row in rows:
        cells = [row.get(k, "") for k in grid_keys] + [row["variant"], row["method"]]
        metric = pm(row["mean"], row["std"], digits, factor) if row["n"] else "–"
        if row["failed"]:
            metric += f" ({len(row['failed'])} diverged)"
        cells.append(metric)
        if has_pub:
            cells.append(pub.number_text(row["published"]["converted"]) if row["published"] else "–")
        if has_gap:
            cells += [_gap_text(row, "gap_closed"), _gap_text(row, "published_gap_closed")]
        cells += [pm(*row["test_loss"], 4), pm(row["train_seconds"][0], None, 1), str(row["n"])]
        if has_diag:
            cells += [pm(*row[key], 3) if row[key][0] is not None else "–" for key in DIAGNOSTICS]
        table_rows.append(cells)
    head = grid_keys + ["variant", "method", header]
    head += ["published"] if has_pub else []
    head += ["gap closed", "gap closed (published)"] if has_gap else []
    head += ["test loss", "train s", "seeds"]
    if has_diag:
        head += ["final cos(B, J̄)", "final cos(signal, BP)"]
    caption = stored_caption(doc, root)
    table = f"{spec.title} — scale {scale.name}: {caption}\n\n" + markdown_table(head, table_rows)
    notes = [n for n in (_published_note(rows, header, primary) if has_pub else "", GAP_NOTE if has_gap else "") if n]
    if has_diag:
        notes.append("final cos(B, J̄): Frobenius cosine of each feedback matrix with the exact mean Jacobian of "
                     "the probe batch; final cos(signal, BP): cosine of the method's signal with the BP signal "
                     "J^T e; both at the last diagnostics probe, averaged over feedback points.")
    if notes:
        table += "\n" + "\n\n".join(notes) + "\n"
    (root / "table.md").write_text(table)
    context = f"{spec.name}, scale {scale.name}" + (f", {_one(rows, 'dataset')}" if _one(rows, "dataset") else "")
    plots = [_plot_metric(rows, grid_keys, header, primary, context, root / "metric.png")]
    if has_gap and any(r["gap_closed"] is not None or r["published_gap_closed"] is not None for r in rows):
        plots.append(_plot_gap(rows, grid_keys, context, root / "gap.png"))
    if has_diag and any(_mean_curve(row["runs"], key)[0] for row in rows for key in DIAGNOSTICS):
        plots.append(_plot_alignment(rows, context, root / "alignment.png"))
    for stale in ("gap.png", "alignment.png"):
        if stale not in [p.name for p in plots]:
            (root / stale).unlink(missing_ok=True)
    return {"table": "table.md", "plots": [p.name for p in plots], "primary": primary, "grid": grid_keys,
            "caption": caption, "rows": rows}


def _one(rows: list[dict], key: str) -> Any:
    """The value of ``key`` all rows share, else ``None``."""
    vals = {json.dumps(r.get(key)) for r in rows}
    return rows[0].get(key) if len(vals) == 1 else None


def _bars(rows: list[dict], grid_keys: list[str], value: str, published: str | None,
          err: str | None = None, factor: float = 1.0) -> tuple[list[Bar], list[dict], str]:
    """Bars of ``rows`` grouped by grid point, else by the variants' qualifier when at least two are
    each shared by several rows (``dfa (macro)``: group ``macro``; rows without one are returned
    apart, to be drawn as lines across), else one group."""
    bars, shared = [], []
    count: dict[str, int] = {}
    for r in rows:
        q = _qualifier(r["variant"])[1]
        count[q] = count.get(q, 0) + 1
    quals = set(count)
    if len(quals - {""}) < 2 or any(n < 2 for q, n in count.items() if q):
        quals = {""}  # qualifiers group rows only when several share each: "dfa (macro)", "grape (macro)"...
    if grid_keys:
        xlabel = " × ".join(grid_keys)
    elif quals - {""}:
        xlabel = "feedback" if {"macro", "micro"} >= quals - {""} else "variant group"
    else:
        xlabel = ""
    for r in rows:
        pub_value = (r["published"] or {}).get("converted") if published == "value" else \
            r.get(published) if published else None
        std = r.get(err) if err else None
        if grid_keys:
            group = str(r.get(grid_keys[0])) if grid_keys in (["model"], ["dataset"]) else \
                ", ".join(f"{k}={r.get(k)}" for k in grid_keys)
            name = r["variant"]
        elif quals - {""}:
            name, group = _qualifier(r["variant"])
            if not group:
                shared.append(r)
                continue
        else:
            group, name = "", r["variant"]
        bars.append(Bar(group, name, r["method"], r.get(value), None if std is None else std * factor, pub_value))
    return bars, shared, xlabel


def _question(rows: list[dict]) -> str:
    if any(r["reference"]["bp"] for r in rows):
        return "How close does each method come to BP?"
    if any(r["reference"]["dfa"] for r in rows):
        return "How does each variant compare with DFA?"
    return "How well does each variant learn?"


def _published_label(rows: list[dict]) -> str:
    used = list(dict.fromkeys((r["published"]["source"], r["published"].get("dataset") or "")
                              for r in rows if r["published"]))
    return "published: " + "; ".join(f"{s}" + (f", {d}" if d else "") for s, d in used)


def _plot_metric(rows: list[dict], grid_keys: list[str], header: str, primary: str, context: str, path: Path) -> Path:
    plt = pyplot()
    bars, shared, xlabel = _bars(rows, grid_keys, "value", "value", "std", _metric_format(primary)[1])
    groups = list(dict.fromkeys(b.group for b in bars))
    horizontal = groups == [""] and len(bars) > 8
    if horizontal:
        fig, ax = plt.subplots(figsize=(8, 1.6 + 0.3 * len(bars)))
    else:
        fig, ax = plt.subplots(figsize=(max(6.5, 2.5 + 0.6 * len(bars)), 4.6))
    for r in shared:
        if r["value"] is not None:
            reference_line(ax, r["value"], f"{r['variant']} (all groups)", horizontal=not horizontal,
                           colour=method_colour(r["method"]), ls="-", lw=1.4)
    chance = _one(rows, "chance")
    if chance and primary.endswith("accuracy"):
        reference_line(ax, 100 * chance, f"chance ({100 * chance:g}%)", horizontal=not horizontal)
    grouped_bars(ax, bars, horizontal=horizontal, published_label=_published_label(rows))
    label = f"{header}, mean ± std over seeds (axis from 0)"
    if horizontal:
        ax.set_xlim(left=0)
        ax.set_xlabel(label)
    else:
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label, fontsize=8)
        if xlabel:
            ax.set_xlabel(xlabel)
    better = "higher" if not primary.endswith(("ppl", "loss")) else "lower"
    ax.set_title(f"{_question(rows)} {header} ({better} is better)\n{context}", fontsize=10)
    return save_figure(fig, path)


def _plot_gap(rows: list[dict], grid_keys: list[str], context: str, path: Path) -> Path:
    plt = pyplot()
    dfa_refs = {r["reference"]["dfa"] for r in rows}
    chosen = [r for r in rows if r["label"] not in dfa_refs and r["reference"]["bp"] != r["label"]
              and (r["gap_closed"] is not None or r["published_gap_closed"] is not None)]
    bars, _, xlabel = _bars(chosen, grid_keys, "gap_closed", "published_gap_closed")
    fig, ax = plt.subplots(figsize=(max(6.5, 2.5 + 0.75 * len(bars)), 4.6))
    reference_line(ax, 0.0, "0: DFA", colour=method_colour("dfa"), ls="-", lw=1.2)
    reference_line(ax, 1.0, "1: BP", colour=method_colour("bp"), ls="-", lw=1.2)
    grouped_bars(ax, bars, published_label="published (same formula on the published numbers)",
                 annotate=lambda v: f"{v:.2f}")
    vals = [v for b in bars for v in (b.value, b.published) if v is not None]
    ax.set_ylim(min([-0.15] + [v - 0.15 for v in vals]), max([1.15] + [v + 0.15 for v in vals]))
    ax.set_ylabel("gap closed = (method − DFA) / (BP − DFA)", fontsize=9)
    if xlabel:
        ax.set_xlabel(xlabel)
    ax.set_title(f"How much of the DFA→BP gap does each method close? (0 = DFA, 1 = BP)\n{context}", fontsize=10)
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


def _plot_alignment(rows: list[dict], context: str, path: Path) -> Path:
    plt = pyplot()
    keys = [k for k in DIAGNOSTICS if any(_mean_curve(row["runs"], k)[0] for row in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(6.2 * len(keys), 4.4), squeeze=False)
    style = styles([(r["variant"], r["method"]) for r in rows if any(_mean_curve(r["runs"], k)[0] for k in keys)])
    for ax, key in zip(axes.ravel(), keys):
        values = []
        for row in rows:
            xs, ys = _mean_curve(row["runs"], key)
            if not xs:
                continue
            s = style[row["variant"]]
            curve(ax, xs, ys, color=s.line_colour, ls=s.linestyle, lw=1.3, label=row["label"],
                  marker=s.marker, markevery=max(1, len(xs) // 8))
            values += ys
        cosine_limits(ax, values)
        ax.set(title=DIAGNOSTICS[key], xlabel="training step")
        integer_ticks(ax, [])
        ax.grid(alpha=0.3)
    handles, labels = axes.ravel()[-1].get_legend_handles_labels()
    if len(keys) > 1:
        first = axes.ravel()[0].get_legend_handles_labels()
        if len(first[1]) > len(labels):
            handles, labels = first
    axes.ravel()[-1].legend(handles, labels, fontsize=7, ncol=2 if len(labels) > 16 else 1, loc="upper left",
                            bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle("Do the feedback matrices and the signals they deliver align with BP's during training? "
                 f"(mean over seeds)\n{context}", fontsize=10)
    return save_figure(fig, path)
