"""Plots of runs: loss, the headline metric and the alignment diagnostics over training.

:func:`plot_runs` draws one panel per quantity that some run measured (a panel no run has a
finite value for is left out, so none is empty): the training loss per logged step (linear axis,
optionally smoothed), the test metric per epoch (integer epoch ticks), and each diagnostics series
per feedback point. Runs are coloured by method (:mod:`bpfree.plots`); a series of few points
(one epoch, one diagnostics probe) is drawn with markers, so a single point shows.
"""

from __future__ import annotations

import json
from pathlib import Path

from .plots import LINESTYLES, MARKERS, cosine_limits, curve, finite, integer_ticks, pyplot, save_figure, styles

PANELS = [
    ("b_jacobian_cos/", "cos(B_l, exact mean J_l^T) (Frobenius)"),
    ("b_jacobian_unit_cos/", "mean per-unit cos(B_l, J_l^T)"),
    ("signal_cos/", "cos(method signal, BP signal J_l^T e)"),
    ("estimate_cos/", "cos(running estimate, exact J_l)"),
]


def read_metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{run} holds no metrics.jsonl: it is not a bpfree run directory")
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def run_method(run: Path) -> str:
    """The run's method, from ``summary.json`` or ``config.toml`` (the folder name if neither exists)."""
    summary = Path(run) / "summary.json"
    config = Path(run) / "config.toml"
    if summary.exists():
        return json.loads(summary.read_text())["method"]
    if config.exists():
        import tomllib

        return tomllib.loads(config.read_text())["run"]["method"]
    return Path(run).name


def run_label(run: Path) -> str:
    return run_method(run)


def smoothed(values: list[float], window: int) -> list[float]:
    """The trailing moving average over ``window`` values (fewer at the start); ``window`` < 2: as is."""
    if window < 2:
        return list(values)
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_runs(runs: list[Path], out: Path, labels: list[str] | None = None, smooth: int = 0) -> Path:
    """Draw loss, test metric and every diagnostics series of ``runs`` into the PNG ``out``.

    ``smooth``: the training loss is also drawn as a trailing moving average over that many
    logged steps (the raw values faint behind it); 0 or 1: raw values only.
    """
    plt = pyplot()
    data = [read_metrics(r) for r in runs]
    method_of = [run_method(r) for r in runs]
    labels = labels or [run_label(r) for r in runs]
    labels = [f"{l} ({Path(r).name})" if labels.count(l) > 1 else l for l, r in zip(labels, runs)]
    style = styles(list(zip(labels, method_of)))
    colour = {lab: style[lab].line_colour for lab in labels}

    def lines(d, kind):
        return [l for l in d if l.get("kind") == kind]

    def has(kind, test) -> bool:
        return any(test(l) for d in data for l in lines(d, kind))

    panels: list[tuple[str, object]] = []
    if has("step", lambda l: finite(l.get("loss"))):
        panels.append(("loss", None))
    metric_key = next((k for d in data for l in lines(d, "epoch") for k in l
                       if k.startswith("test_") and k != "test_loss" and finite(l[k])), None)
    if metric_key:
        panels.append(("metric", metric_key))
    if has("diagnostics", lambda l: finite(l.get("weight_grad_cos"))):
        panels.append(("weight_grad_cos", None))
    for prefix, title in PANELS:
        if has("diagnostics", lambda l: any(k.startswith(prefix) and finite(v) for k, v in l.items())):
            panels.append((prefix, title))
    if not panels:
        raise ValueError(f"{', '.join(map(str, runs))}: no logged step, epoch or diagnostics line to plot yet")
    cols = 2 if len(panels) > 1 else 1
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 3.8 * nrows + 0.4), squeeze=False)
    axes = axes.ravel()
    for ax, (what, extra) in zip(axes, panels):
        if what == "loss":
            for d, lab in zip(data, labels):
                pts = [(l["step"], l["loss"]) for l in lines(d, "step") if finite(l.get("loss"))]
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                if smooth > 1 and len(pts) > 1:
                    curve(ax, xs, ys, color=colour[lab], lw=0.8, alpha=0.3)
                    curve(ax, xs, smoothed(ys, smooth), color=colour[lab], lw=1.4, label=f"{lab} (mean of {smooth})")
                else:
                    curve(ax, xs, ys, color=colour[lab], lw=1.1, label=lab)
            ax.set(title="training loss per logged step", xlabel="step", ylabel="loss (axis from 0)")
            ax.set_ylim(bottom=0)
            integer_ticks(ax, [l["step"] for d in data for l in lines(d, "step")])
        elif what == "metric":
            for d, lab in zip(data, labels):
                ep = [l for l in lines(d, "epoch") if finite(l.get(extra))]
                curve(ax, [l["epoch"] for l in ep], [l[extra] for l in ep], color=colour[lab], label=lab, few=60)
            name = extra.replace("_", " ")
            ax.set(title=f"{name} after each epoch", xlabel="epoch", ylabel=f"{name} (axis from 0)")
            ax.set_ylim(bottom=0, top=1.02 if extra.endswith("accuracy") else None)
            integer_ticks(ax, [l["epoch"] for d in data for l in lines(d, "epoch")])
        elif what == "weight_grad_cos":
            values = []
            for d, lab in zip(data, labels):
                diag = [l for l in lines(d, "diagnostics") if finite(l.get("weight_grad_cos"))]
                curve(ax, [l["step"] for l in diag], [l["weight_grad_cos"] for l in diag], color=colour[lab], label=lab)
                values += [l["weight_grad_cos"] for l in diag]
            ax.set(title="cos(weight gradients, BP's)", xlabel="step")
            cosine_limits(ax, values)
            integer_ticks(ax, [l["step"] for d in data for l in lines(d, "diagnostics")])
        else:
            prefix, values = what, []
            for d, lab in zip(data, labels):
                diag = lines(d, "diagnostics")
                names = sorted({key[len(prefix):] for l in diag for key in l if key.startswith(prefix)},
                               key=lambda s: (len(s), s))
                for j, name in enumerate(names):
                    pts = [(l["step"], l[prefix + name]) for l in diag if finite(l.get(prefix + name))]
                    curve(ax, [p[0] for p in pts], [p[1] for p in pts], color=colour[lab],
                          ls=LINESTYLES[j % len(LINESTYLES)], marker=MARKERS[j % len(MARKERS)],
                          label=f"{lab} point {name}")
                    values += [p[1] for p in pts]
            ax.set(title=extra, xlabel="step")
            cosine_limits(ax, values)
            integer_ticks(ax, [l["step"] for d in data for l in lines(d, "diagnostics")])
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, ncol=2 if len(ax.get_legend_handles_labels()[0]) > 6 else 1)
    for ax in axes[len(panels):]:
        fig.delaxes(ax)
    aligned = any(p[0] not in ("loss", "metric") for p in panels)
    fig.suptitle("How did each run train" + (", and how well do its feedback signals align with BP's?" if aligned
                                             else "?") + f" ({', '.join(labels)})", fontsize=10)
    return save_figure(fig, Path(out))
