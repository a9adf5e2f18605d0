"""What the figure tests look at: the artists of every saved figure (not the PNG bytes).

:func:`capture` replaces ``Figure.savefig`` so that every figure saved while it is active is kept
(with the path it was to go to) instead of written; :func:`visible_data` counts, per axes, the
artists a reader sees as data: a line with a finite point inside the view limits that is drawn
with a visible marker, or with at least two such points and a line style; a bar (a rectangle of
non-zero size); a scatter. Reference lines (gid ``reference``: chance level, BP's value), error
bars, grid lines and legends are not data.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import matplotlib

matplotlib.use("Agg")
from matplotlib.collections import PathCollection  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402


@contextmanager
def capture(monkeypatch):
    """Collect ``(path, figure)`` for every ``savefig`` call; nothing is written."""
    import matplotlib.pyplot as plt

    saved: list[tuple[str, Figure]] = []
    close = plt.close

    def savefig(self, path, *args, **kwargs):
        saved.append((str(path), self))

    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)  # keep the figures to inspect
    try:
        yield saved
    finally:
        for _, fig in saved:
            close(fig)


def _inside(ax, x: float, y: float) -> bool:
    (x0, x1), (y0, y1) = sorted(ax.get_xlim()), sorted(ax.get_ylim())
    return x0 <= x <= x1 and y0 <= y <= y1


def _marker_visible(line) -> bool:
    return line.get_marker() not in (None, "None", "", " ", ",") and line.get_markersize() > 0


def visible_data(ax) -> dict[str, int]:
    """``{"lines": n, "bars": n, "scatters": n}``: the data artists of ``ax`` a reader can see."""
    out = {"lines": 0, "bars": 0, "scatters": 0}
    for line in ax.get_lines():
        if line.get_gid() == "reference" or not line.get_visible() or line.get_alpha() == 0:
            continue
        pts = [(float(x), float(y)) for x, y in zip(line.get_xdata(), line.get_ydata())]
        pts = [(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y) and _inside(ax, x, y)]
        drawn_as_line = len(pts) >= 2 and line.get_linestyle() not in ("None", "", " ") and line.get_linewidth() > 0
        if pts and (_marker_visible(line) or drawn_as_line):
            out["lines"] += 1
    for patch in ax.patches:
        if isinstance(patch, Rectangle) and patch.get_visible() and (patch.get_width() or patch.get_height()):
            if all(math.isfinite(v) for v in (patch.get_x(), patch.get_y(), patch.get_width(), patch.get_height())):
                out["bars"] += 1
    for coll in ax.collections:
        if isinstance(coll, PathCollection) and len(coll.get_offsets()):
            out["scatters"] += 1
    return out


def empty_axes(fig: Figure) -> list[str]:
    """Titles (or positions) of the axes of ``fig`` that show no data."""
    return [ax.get_title() or f"axes {i}" for i, ax in enumerate(fig.axes) if not sum(visible_data(ax).values())]
