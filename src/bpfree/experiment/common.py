"""What the experiment kinds share: jobs, their cached results, statistics, tables and figures."""

from __future__ import annotations

import dataclasses

import json
import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import options as opts
from ..options import OptionError
from ..plots import pyplot, save_figure  # noqa: F401  (the kinds import them from here)
from ..train.checkpoint import save_json
from .spec import Spec

# A job's state before a call: done (result on disk), new, resume (train: a checkpoint to continue),
# stale (a result computed with other settings: computed again), failed (train: the loss diverged).
DONE, NEW, RESUME, STALE, FAILED = "done", "new", "resume", "stale", "failed"


@dataclass
class Job:
    """One unit of work of an experiment: a training run, a toy trajectory set, a timing...

    ``label``: the table row it belongs to; ``seed``: the seed index ``k`` (0, 1, ...);
    ``dir``: its folder under ``results/NAME/SCALE/runs/``; ``params``: everything its result
    depends on (JSON-able; a cached result computed with other params is stale); ``row``: the
    row's columns (variant, grid values...); ``config``: the run configuration (train and bench).
    """

    label: str
    seed: int
    dir: Path
    params: dict[str, Any]
    row: dict[str, Any] = field(default_factory=dict)
    config: Any = None


def slug(text: str) -> str:
    """A folder name for ``text``: runs of characters other than letters, digits and dots become ``-``."""
    s = re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()
    return s or "run"


def show(value: Any) -> str:
    """A grid value as written in labels and tables (lists comma-joined, floats in short form)."""
    if isinstance(value, (list, tuple)):
        return ",".join(show(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def build_params(cls: type, spec: Spec, values: dict[str, Any]) -> Any:
    """The kind's parameter dataclass from ``values``; errors name the experiment file."""
    try:
        return opts.build(cls, values, what=f"[{spec.kind}]")
    except OptionError as err:
        raise OptionError(f"{spec.path}: {err}") from None


def split_params(cls: type, spec: Spec, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The kind's parameters (``cls``) from ``[kind]`` and the scale's keys that are its fields,
    and the scale's other keys (run configuration overrides)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    own = {k: v for k, v in overrides.items() if k in fields}
    return build_params(cls, spec, {**spec.params, **own}), {k: v for k, v in overrides.items() if k not in fields}


def to_json(obj: Any) -> Any:
    """Tuples as lists, recursively (what a JSON round trip gives back)."""
    return json.loads(json.dumps(obj))


# -- cached results of non-training jobs ------------------------------------------------------------
def cache_status(job: Job) -> str:
    """``done`` when ``job.dir/result.json`` holds a result for the same params, ``stale`` when for
    other params, else ``new``."""
    path = job.dir / "result.json"
    if not path.exists():
        return NEW
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return STALE
    return DONE if saved.get("params") == to_json(job.params) else STALE


def save_result(job: Job, record: dict[str, Any]) -> None:
    job.dir.mkdir(parents=True, exist_ok=True)
    save_json({"params": to_json(job.params), "record": record}, job.dir / "result.json")


def load_result(job: Job) -> dict[str, Any]:
    return json.loads((job.dir / "result.json").read_text())["record"]


# -- statistics ----------------------------------------------------------------------------------
def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (``n - 1``; ``None`` for fewer than two values)."""
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def pm(mean: float, std: float | None, digits: int = 2, scale: float = 1.0) -> str:
    """``mean ± std`` (times ``scale``) with ``digits`` decimals; the mean alone without a std."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean * scale:.{digits}f}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -- figures and re-rendering ------------------------------------------------------------------
def stored_caption(doc: dict[str, Any], root: Path) -> str:
    """The table caption of results ``doc`` (what every row shares: the settings of the runs).

    Results written before the caption was stored in ``results.json`` take it from the first
    paragraph of the ``table.md`` written with them, without its ``TITLE — scale NAME:`` prefix.
    """
    if doc.get("caption"):
        return doc["caption"]
    path = Path(root) / doc.get("table", "table.md")
    if not path.exists():
        return ""
    first = path.read_text().split("\n\n", 1)[0].strip()
    prefix = f"{doc.get('title', '')} — scale {doc.get('scale', '')}: "
    return first[len(prefix):] if first.startswith(prefix) else first
