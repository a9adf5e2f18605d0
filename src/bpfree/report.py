"""Plots of runs: loss, the headline metric and the alignment diagnostics over training."""

from __future__ import annotations

import json
from pathlib import Path

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


def run_label(run: Path) -> str:
    summary = Path(run) / "summary.json"
    config = Path(run) / "config.toml"
    if summary.exists():
        s = json.loads(summary.read_text())
        return s["method"]
    if config.exists():
        import tomllib

        return tomllib.loads(config.read_text())["run"]["method"]
    return Path(run).name


def plot_runs(runs: list[Path], out: Path, labels: list[str] | None = None) -> Path:
    """Draw loss, test metric and every diagnostics series of ``runs`` into the PNG ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = [read_metrics(r) for r in runs]
    labels = labels or [run_label(r) for r in runs]
    labels = [f"{l} ({Path(r).name})" if labels.count(l) > 1 else l for l, r in zip(labels, runs)]
    panels = [p for p in PANELS if any(k.startswith(p[0]) for d in data for l in d if l["kind"] == "diagnostics" for k in l)]
    has_wg = any("weight_grad_cos" in l for d in data for l in d)
    n = 2 + len(panels) + has_wg
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 3.6 * rows), squeeze=False)
    axes = axes.ravel()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
    ax = axes[0]
    for i, (d, lab) in enumerate(zip(data, labels)):
        steps = [l for l in d if l["kind"] == "step"]
        ax.plot([l["step"] for l in steps], [l["loss"] for l in steps], color=colours[i % 10], label=lab, lw=1)
    ax.set(title="training loss (per logged step)", xlabel="step", yscale="log")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, (d, lab) in enumerate(zip(data, labels)):
        ep = [l for l in d if l["kind"] == "epoch"]
        keys = [k for k in (ep[0] if ep else {}) if k.startswith("test_") and k != "test_loss"]
        if ep and keys:
            ax.plot([l["epoch"] for l in ep], [l[keys[0]] for l in ep], "o-", color=colours[i % 10], label=lab)
            ax.set_ylabel(keys[0].replace("_", " "))
    ax.set(title="test metric per epoch", xlabel="epoch")
    ax.legend(fontsize=8)
    k = 2
    if has_wg:
        ax = axes[k]
        k += 1
        for i, (d, lab) in enumerate(zip(data, labels)):
            diag = [l for l in d if l["kind"] == "diagnostics"]
            ax.plot([l["step"] for l in diag], [l["weight_grad_cos"] for l in diag], color=colours[i % 10], label=lab)
        ax.set(title="cos(weight gradients, BP's)", xlabel="step", ylim=(-0.1, 1.05))
        ax.legend(fontsize=8)
    for prefix, title in panels:
        ax = axes[k]
        k += 1
        for i, (d, lab) in enumerate(zip(data, labels)):
            diag = [l for l in d if l["kind"] == "diagnostics"]
            names = sorted({key[len(prefix):] for l in diag for key in l if key.startswith(prefix)}, key=lambda s: (len(s), s))
            for j, name in enumerate(names):
                pts = [(l["step"], l[prefix + name]) for l in diag if prefix + name in l]
                ax.plot(*zip(*pts), color=colours[i % 10], ls=styles[j % len(styles)],
                        label=f"{lab} point {name}")
        ax.set(title=title, xlabel="step", ylim=(-0.1, 1.05))
        ax.legend(fontsize=7, ncol=2)
    for ax in axes[k:]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
