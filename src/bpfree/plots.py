"""What every figure of bpfree shares: one colour per method, grouped bars, curves, reference lines.

* :data:`METHOD_COLOURS` gives each method one colour in every figure (``bpfree report``, every
  experiment kind); a method not listed gets a fixed colour from its name. Variants of one method
  keep its colour: bars differ by hatching (``//`` for a calibrated variant), lines by shade,
  line style and marker (:func:`styles`).
* :func:`grouped_bars`: bars grouped by model or grid point (or one group labelled per bar), error
  bars over seeds, the published value as a marker beside ours.
* :func:`curve`: a series without its missing points, with markers when it has few points, so
  that a run with one epoch or one probe still shows its point.
* :func:`reference_line`: chance level, BP, DFA... drawn across an axis and tagged (``gid``
  ``"reference"``) so that a check for empty panels can tell them from data.

Figures are drawn with matplotlib's Agg backend (files only).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METHOD_COLOURS = {
    "bp": "#333333",
    "fa": "#2ca02c",
    "dfa": "#1f77b4",
    "grape": "#e6550d",
    "drtp": "#9467bd",
    "dkp": "#8c564b",
    "pepita": "#e377c2",
    "usf": "#17becf",
    "brsf": "#bcbd22",
    "frsf": "#7f7f7f",
    "fg-weight": "#393b79",
    "fg-activity": "#637939",
}
# For methods not listed: chosen by a checksum of the name, so the same in every figure and run.
FALLBACK = ["#843c39", "#7b4173", "#5254a3", "#8ca252", "#bd9e39", "#ad494a", "#a55194", "#6b6ecf"]
HATCHES = ["", "..", "xx", "\\\\", "oo", "--", "++", "**"]
LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "v", "D", "P", "X", "<", ">", "*"]
PUBLISHED_MARKER = dict(marker="D", ms=6.5, mfc="white", mec="black", mew=1.3, ls="none")
FEW_POINTS = 25  # a curve with at most this many points gets a marker on each
REFERENCE = "reference"  # gid of reference lines (not data)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    title = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) is not None else ""
    if title:  # room for the figure's title above the panels' own
        top = 1 - (0.22 * (title.count("\n") + 1) + 0.12) / fig.get_figheight()
        fig.tight_layout(rect=(0, 0, 1, top))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # legends placed beside the axes stay in
    pyplot().close(fig)
    return path


def method_colour(method: str) -> str:
    """The colour of ``method`` in every figure."""
    if method in METHOD_COLOURS:
        return METHOD_COLOURS[method]
    return FALLBACK[zlib.crc32(method.encode()) % len(FALLBACK)]


def shade(colour: str, k: int, n: int) -> str:
    """The ``k``-th of ``n`` shades of ``colour``: the colour itself first, then lighter ones (up to 55% white)."""
    if n <= 1 or k == 0:
        return colour
    return _blend(colour, "#ffffff", 0.55 * k / (n - 1))


def _blend(a: str, b: str, t: float) -> str:
    from matplotlib.colors import to_hex, to_rgb

    return to_hex(tuple(x + (y - x) * t for x, y in zip(to_rgb(a), to_rgb(b))))


def diverging(values: Sequence[float]) -> list[str]:
    """Colours for values in [-1, 1] (initial cosines): light to dark blue below 0, dark grey at 0,
    light to dark red above."""
    out = []
    for v in values:
        if abs(v) < 1e-12:
            out.append("#444444")
        else:
            light, dark = ("#92c5de", "#2166ac") if v < 0 else ("#f4a582", "#b2182b")
            out.append(_blend(light, dark, min(1.0, abs(v))))
    return out


def sequential(n: int) -> list[str]:
    """``n`` colours in order (depths, sizes): viridis from dark blue to green-yellow."""
    from matplotlib import colormaps
    from matplotlib.colors import to_hex

    cmap = colormaps["viridis"]
    return [to_hex(cmap(0.85 * i / max(1, n - 1))) for i in range(n)]


@dataclass(frozen=True)
class Style:
    """How one series (a variant of a method) is drawn: bars in ``colour`` with ``hatch``; lines in
    ``line_colour`` with ``linestyle`` and ``marker``."""

    colour: str
    hatch: str
    line_colour: str
    linestyle: str
    marker: str


def styles(series: Sequence[tuple[str, str]], hatches: bool = True) -> dict[str, Style]:
    """``{name: Style}`` for ``(name, method)`` pairs in order: the method's colour; among a method's
    variants, the ``k``-th (in order) gets the ``k``-th hatch (``hatches``: else none), shade, line
    style and marker, and a variant whose name says ``calib`` the hatch ``//``."""
    order: dict[str, list[str]] = {}
    for name, method in dict.fromkeys(series):
        order.setdefault(method, [])
        if name not in order[method]:
            order[method].append(name)
    out = {}
    for method, names in order.items():
        base = method_colour(method)
        plain = [n for n in names if "calib" not in n]
        for k, name in enumerate(names):
            j = plain.index(name) if name in plain else k
            hatch = "//" if "calib" in name else HATCHES[j % len(HATCHES)] if hatches else ""
            out[name] = Style(base, hatch, shade(base, k, len(names)), LINESTYLES[k % len(LINESTYLES)],
                              MARKERS[k % len(MARKERS)])
    return out


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def curve(ax, xs: Sequence[float], ys: Sequence[float | None], *, few: int = FEW_POINTS, **kw):
    """Plot the points of ``(xs, ys)`` whose ``y`` is a finite number; with at most ``few`` points each
    gets a marker (``kw`` may set its own). Returns the line, or ``None`` when no point is left."""
    pts = [(x, y) for x, y in zip(xs, ys) if finite(y)]
    if not pts:
        return None
    if len(pts) <= few:
        kw.setdefault("marker", "o")
        kw.setdefault("ms", 4 if len(pts) > 1 else 6)
    else:
        kw.pop("marker", None)
    (line,) = ax.plot([x for x, _ in pts], [y for _, y in pts], **kw)
    return line


def integer_ticks(ax, values: Sequence[float], axis: str = "x") -> None:
    """Integer ticks only on ``axis`` (epochs, depths); a single value gets a unit-wide range around it."""
    from matplotlib.ticker import MaxNLocator

    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    vals = [v for v in values if finite(v)]
    if vals and max(vals) - min(vals) < 1:
        lim = (min(vals) - 0.5, max(vals) + 0.5)
        (ax.set_xlim if axis == "x" else ax.set_ylim)(*lim)


def reference_line(ax, value: float, label: str | None = None, *, horizontal: bool = True, colour: str = "grey",
                   ls: str = "--", lw: float = 1.0):
    """A line across the axis at ``value`` (horizontal: at that ``y``), tagged as a reference."""
    draw = ax.axhline if horizontal else ax.axvline
    line = draw(value, color=colour, ls=ls, lw=lw, label=label, zorder=1)
    line.set_gid(REFERENCE)
    return line


def cosine_limits(ax, values: Sequence[float]) -> None:
    """A cosine axis: up to 1.05, down to −0.1 or below the lowest value; a zero line."""
    vals = [v for v in values if finite(v)]
    low = min([-0.1] + [v - 0.05 for v in vals])
    ax.set_ylim(max(-1.05, low), 1.05)
    reference_line(ax, 0.0, colour="#999999", ls="-", lw=0.6)


@dataclass
class Bar:
    """One bar: ``value`` (``None``: no bar) of series ``name`` (a variant, coloured by ``method``) in
    ``group``; ``err``: its error bar; ``published``: the published value, drawn as a marker beside it."""

    group: str
    name: str
    method: str
    value: float | None
    err: float | None = None
    published: float | None = None


def grouped_bars(ax, bars: Sequence[Bar], *, horizontal: bool = False, published_label: str | None = None,
                 annotate: Callable[[float], str] | None = None, legend: bool = True) -> None:
    """Bars of ``bars``, grouped by ``group`` in order (one colour per method, see :func:`styles`), with
    error bars and published markers. A single unnamed group labels each bar with its name instead.
    ``annotate`` writes each value (formatted) at its bar's end."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    groups = list(dict.fromkeys(b.group for b in bars))
    single = groups == [""]
    style = styles([(b.name, b.method) for b in bars], hatches=not single)  # one group: names label the bars
    per_group = {g: [b for b in bars if b.group == g] for g in groups}
    slots = max(len(v) for v in per_group.values())
    width = 0.8 / slots if not single else 0.7
    ticks, labels = [], []
    published_drawn = False
    for gi, g in enumerate(groups):
        members = per_group[g]
        for j, b in enumerate(members):
            pos = j if single else gi + (j - (len(members) - 1) / 2) * width
            if single:
                ticks.append(pos)
                labels.append(b.name)
            if not finite(b.value):
                continue
            s = style[b.name]
            common = dict(color=s.colour, hatch=s.hatch, edgecolor="#222222", linewidth=0.6, zorder=2)
            if horizontal:
                ax.barh(pos, b.value, height=width * 0.92, **common)
            else:
                ax.bar(pos, b.value, width=width * 0.92, **common)
            if finite(b.err) and b.err:
                kw = dict(fmt="none", ecolor="black", elinewidth=1.0, capsize=2.5, zorder=3)
                ax.errorbar(b.value if horizontal else pos, pos if horizontal else b.value,
                            **({"xerr": b.err} if horizontal else {"yerr": b.err}), **kw)
            if finite(b.published):
                at = pos + width * 0.40
                xy = (b.published, at) if horizontal else (at, b.published)
                ax.plot(*xy, **PUBLISHED_MARKER, zorder=4)
                published_drawn = True
            if annotate is not None:  # left of centre, clear of the published marker at the right edge
                end = b.value
                text = annotate(b.value)
                if horizontal:
                    ax.annotate(text, (end, pos - width * 0.12), xytext=(3, 0), textcoords="offset points",
                                va="center", fontsize=7)
                else:
                    ax.annotate(text, (pos - width * 0.12, end), xytext=(0, 2 if end >= 0 else -2),
                                textcoords="offset points", ha="center", va="bottom" if end >= 0 else "top", fontsize=7)
        if not single:
            ticks.append(gi)
            labels.append(g)
    if horizontal:
        ax.set_yticks(ticks, labels, fontsize=8)
        ax.invert_yaxis()
    else:
        ax.set_xticks(ticks, labels, fontsize=8, rotation=30 if single and len(labels) > 4 else 0,
                      ha="right" if single and len(labels) > 4 else "center")
    ax.grid(axis="x" if horizontal else "y", alpha=0.3, zorder=0)
    ax.set_axisbelow(True)
    if not legend:
        return
    if single:
        methods = list(dict.fromkeys(b.method for b in bars))
        handles = [Patch(facecolor=method_colour(m), edgecolor="#222222", label=m) for m in methods]
        if any(s.hatch for s in style.values()):
            handles.append(Patch(facecolor="white", edgecolor="#222222", hatch="//", label="hatched: with BP calibration"))
    else:
        handles = [Patch(facecolor=style[n].colour, edgecolor="#222222", hatch=style[n].hatch, label=n)
                   for n in dict.fromkeys(b.name for b in bars)]
    if published_drawn:
        handles.append(Line2D([], [], **PUBLISHED_MARKER, label=published_label or "published"))
    handles += [h for h in ax.get_lines() if h.get_gid() == REFERENCE and h.get_label()
                and not h.get_label().startswith("_")]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
              ncol=2 if len(handles) > 16 else 1)
