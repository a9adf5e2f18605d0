"""Kind ``toy``: the feedback rules against a fixed target Jacobian (REFERENCE question 5).

For every rule, noise level, initial cosine ``c0`` and seed,
:func:`bpfree.feedback.toy.fixed_target_dynamics` applies the rule ``steps`` times to a ``B``
whose rows all start at cosine ``c0`` with the rows of a fixed random target ``G`` (``n x o``;
the seed draws ``G`` and ``B_0``). One job is one (rule, noise, seed) with every ``c0``.

``table.md``: the final mean per-unit cosine per (rule, noise) and ``c0``, mean ± std over seeds.
``dynamics.png``: one panel per rule, the mean per-unit cosine over steps for each ``c0`` (mean
over seeds; colour from blue at -0.9 to red at 0.9), the first noise level solid, the others
dashed and dotted. Both are drawn from the stored results (``bpfree experiment render``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..feedback.rules import RENORMS, RULES
from ..feedback.toy import fixed_target_dynamics
from ..options import OptionError, option
from ..plots import LINESTYLES, curve, diverging, reference_line
from .common import (Job, build_params, markdown_table, mean_std, pm, pyplot, save_figure, save_result, show, slug,
                     stored_caption)
from .spec import Scale, Spec


@dataclass
class Params:
    rules: tuple[str, ...] = option(tuple(RULES), "feedback rules", choices=tuple(RULES))
    c0: tuple[float, ...] = option((-0.9, -0.5, 0.0, 0.5, 0.9), "initial per-unit cosines of B with G")
    noise: tuple[str, ...] = option(("0", "default"), "noise levels relative to rms(B_0); 'default': the rule's own")
    steps: int = option(200, "updates per trajectory")
    eta: float = option(0.05, "feedback learning rate eta_B")
    n: int = option(64, "rows of B and G (units)")
    o: int = option(10, "columns (outputs)")
    renorm: str = option("auto", "renormalisation; auto: the rule's own", choices=("auto",) + RENORMS)

    def check(self) -> None:
        for v in self.noise:
            noise_value(v)
        if not all(-1.0 <= c <= 1.0 for c in self.c0):
            raise OptionError(f"option 'c0' takes cosines in [-1, 1], got {self.c0}")
        if self.steps < 1 or self.n < 1 or self.o < 1:
            raise OptionError("options 'steps', 'n' and 'o' must be at least 1")
        if not (self.rules and self.c0 and self.noise):
            raise OptionError("options 'rules', 'c0' and 'noise' must each list at least one value")


PARAMS = Params


def noise_value(text: str) -> float | None:
    """``None`` (the rule's default) for ``default``, else the number."""
    if str(text).strip().lower() == "default":
        return None
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"option 'noise' takes numbers or 'default', got {text!r}") from None


def params(spec: Spec, scale: Scale) -> Params:
    return build_params(Params, spec, {**spec.params, **scale.overrides})


def jobs(spec: Spec, scale: Scale, seeds: int, root: Path) -> list[Job]:
    p = params(spec, scale)
    out = []
    for rule in p.rules:
        for noise in p.noise:
            label = f"{rule}, noise={show(noise)}"
            for k in range(seeds):
                job_params = {"rule": rule, "noise": noise, "seed": k, "c0": list(p.c0), "steps": p.steps,
                              "eta": p.eta, "n": p.n, "o": p.o, "renorm": p.renorm}
                out.append(Job(label, k, root / "runs" / slug(label) / f"seed{k}", job_params,
                               {"rule": rule, "noise": noise}))
    return out


def execute(job: Job, state: str, ctx) -> str:
    q = job.params
    renorm = None if q["renorm"] == "auto" else q["renorm"]
    traj = {}
    for c0 in q["c0"]:
        traj[show(float(c0))] = fixed_target_dynamics(q["rule"], c0, n=q["n"], o=q["o"], steps=q["steps"], eta=q["eta"],
                                                      noise=noise_value(q["noise"]), renorm=renorm, seed=q["seed"])
    save_result(job, {"trajectories": traj})
    finals = ", ".join(f"{c}->{t['unit_cos'][-1]:.2f}" for c, t in traj.items())
    return f"final unit cosines {finals}"


def _thin(xs: list[float], most: int = 101) -> list[int]:
    """Indices of at most ``most`` evenly spread points of ``xs`` (first and last kept)."""
    if len(xs) <= most:
        return list(range(len(xs)))
    step = (len(xs) - 1) / (most - 1)
    return sorted({round(i * step) for i in range(most)})


def write(spec: Spec, scale: Scale, seeds: int, jobs: list[Job], records: list[dict], root: Path) -> dict[str, Any]:
    p = params(spec, scale)
    c0s = [show(float(c)) for c in p.c0]
    groups: dict[str, dict[str, Any]] = {}
    for job, rec in zip(jobs, records):
        g = groups.setdefault(job.label, {"label": job.label, **job.row, "seeds": []})
        g["seeds"].append(rec["trajectories"])
    for g in groups.values():
        g["final_unit_cos"], g["final_frobenius_cos"], g["mean_unit_cos"] = {}, {}, {}
        for c in c0s:
            g["final_unit_cos"][c] = mean_std([t[c]["unit_cos"][-1] for t in g["seeds"]])
            g["final_frobenius_cos"][c] = mean_std([t[c]["frobenius_cos"][-1] for t in g["seeds"]])
            steps = g["seeds"][0][c]["step"]
            keep = _thin(steps)
            g["mean_unit_cos"][c] = {
                "step": [steps[i] for i in keep],
                "unit_cos": [sum(t[c]["unit_cos"][i] for t in g["seeds"]) / len(g["seeds"]) for i in keep],
            }
        g["per_seed_final_unit_cos"] = {c: [t[c]["unit_cos"][-1] for t in g["seeds"]] for c in c0s}
        del g["seeds"]  # whole trajectories stay in runs/; results.json keeps the mean, thinned
    caption = (f"final mean per-unit cosine after {p.steps} updates (eta {p.eta:g}, B and G of {p.n}x{p.o}, "
               f"renorm {p.renorm}); noise relative to rms(B_0), 'default' = the rule's own; {seeds} seed(s), "
               f"mean ± std (n − 1).")
    doc = {"caption": caption, "rows": list(groups.values())}
    return {**doc, **render(spec, scale, doc, root)}


def render(spec: Spec, scale: Scale, doc: dict[str, Any], root: Path, jobs: list[Job] | None = None) -> dict[str, Any]:
    """``table.md`` and ``dynamics.png`` from the results ``doc`` (or a ``results.json``)."""
    groups = doc["rows"]
    c0s = list(groups[0]["final_unit_cos"]) if groups else []
    rows = [[g["rule"], show(g["noise"])] + [pm(*g["final_unit_cos"][c], 3) for c in c0s] for g in groups]
    head = ["rule", "noise"] + [f"c0 = {c}" for c in c0s]
    caption = stored_caption(doc, root)
    table = f"{spec.title} — scale {scale.name}: {caption}\n\n" + markdown_table(head, rows)
    (root / "table.md").write_text(table)
    plot = _plot(groups, root / "dynamics.png")
    return {"table": "table.md", "plots": [plot.name], "caption": caption}


def _plot(groups: list[dict], path: Path) -> Path:
    plt = pyplot()
    rules = list(dict.fromkeys(g["rule"] for g in groups))
    cols = min(len(rules), 3)
    nrows = -(-len(rules) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows + 0.5), squeeze=False)
    noises = list(dict.fromkeys(g["noise"] for g in groups))
    c0s = list(dict.fromkeys(c for g in groups for c in g["mean_unit_cos"]))
    colours = diverging([float(c) for c in c0s])
    for ax, rule in zip(axes.ravel(), rules):
        for g in (g for g in groups if g["rule"] == rule):
            ls = LINESTYLES[noises.index(g["noise"]) % len(LINESTYLES)]
            for c, points in g["mean_unit_cos"].items():
                curve(ax, points["step"], points["unit_cos"], color=colours[c0s.index(c)], ls=ls, lw=1.2,
                      label=f"c0={c}, noise={show(g['noise'])}")
        ax.set(title=f"rule {rule}", xlabel="update", ylabel="mean per-unit cosine with G", ylim=(-1.05, 1.05))
        reference_line(ax, 0.0, colour="#999999", ls="-", lw=0.6)
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(rules):]:
        fig.delaxes(ax)
    axes.ravel()[0].legend(fontsize=6, ncol=2)
    fig.suptitle("Does each rule turn B toward a fixed target Jacobian G? Mean per-unit cosine from each start c0 "
                 f"(mean over seeds; line style: noise {', '.join(show(n) for n in noises)})", fontsize=10)
    return save_figure(fig, path)
