"""An experiment file, ``experiments/NAME.toml``, loaded and checked.

Schema (every key below is checked; an unknown one is an error naming the file and the key)::

    title = "Shallow CNN: BP, FA, DFA, GrAPE (with and without calibration)"
    kind = "train"              # train | toy | estimate | bench | pipeline
    questions = ["main"]        # "main" and/or REFERENCE questions "Q1" ... "Q6"
    description = "what it measures and why"
    published = [               # the published numbers it compares with (schema: .published)
      { source = "grape-2026", dataset = "cifar10", model = "cnn", variant = "bp", metric = "test_accuracy", value = 74.66 },
      { source = "grape-2026", claim = "a published statement without a number" },
    ]
    published_compare = { source = "grape-2026", dataset = "cifar10" }  # optional: which published
                                # setting rows are set against where several fit

    [base]                      # kinds train, bench, pipeline: a run configuration as for --config:
    [base.run]                  # [base.run], [base.model], [base.method], [base.data] sections
    [base.model]                # and/or flat keys (any key --set accepts, NAME.key for one method)

    [scales.quick]              # flat KEY = VALUE overrides (keys --set accepts), plus
    seeds = 2                   #   seeds: seeds per run (default 1)
    assumed = "text"            #   assumed: what this scale assumes (shown with the results)
    [scales.quick.grid]         #   optional: replaces [grid] entries of the same key at this scale
    [scales.full]

    [[variants]]                # kind train: one table row each (at every grid point); kind
                                #   pipeline: one model each (its rows of the table)
    name = "dfa+calib"          #   the row label; every other key is a --set key
    method = "dfa"
    quick.calibrate_every = 10  #   keys under a scale's name apply at that scale only
    full.calibrate_every = 1

    [grid]                      # kind train, optional: KEY = [v1, v2, ...]; the cartesian product
    model = ["alexnet", "vgg16"]#   of its points with the variants (row label gains "key=v")

    [toy] / [estimate] / [bench] / [pipeline]   # kinds toy, estimate, bench, pipeline: the kind's
                                   # parameters (see bpfree.experiment.toy, .estimate, .bench,
                                   # .pipeline); scale keys override them (bench, pipeline: other
                                   # scale keys go to the run config)

Experiments are the ``*.toml`` files with a ``kind`` in :func:`experiments_dir`: ``$BPFREE_EXPERIMENTS``
or ``./experiments``. Files without ``kind`` (such as ``demo.toml``, a plain ``--config`` file) are
not experiments.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..options import OptionError
from ..train.config import SECTIONS, load_toml
from . import published as pub
from .published import Entry

KINDS = ("train", "toy", "estimate", "bench", "pipeline")
CONFIG_KINDS = ("train", "bench", "pipeline")  # kinds that take a run configuration in [base]
VARIANT_KINDS = ("train", "pipeline")  # kinds whose rows are [[variants]] (train: also a [grid])
SCALES = ("quick", "medium", "full")
TOP_KEYS = ("title", "kind", "questions", "description", "published", "published_compare", "base", "scales",
            "variants", "grid", "toy", "estimate", "bench", "pipeline")
SCALE_KEYS = ("seeds", "assumed", "grid")
QUESTION = re.compile(r"^(main|Q[1-9][0-9]*)$")


@dataclass
class Scale:
    """One scale of an experiment: run-config overrides, seeds, assumptions and grid replacements."""

    name: str
    seeds: int = 1
    assumed: str = ""
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class Spec:
    """A checked experiment file (see the module docstring for the schema)."""

    name: str
    path: Path
    title: str
    kind: str
    questions: list[str]
    description: str
    published: list[Entry]
    base: dict[str, Any]
    scales: dict[str, Scale]
    variants: list[dict[str, Any]]
    grid: dict[str, list[Any]]
    params: dict[str, Any]  # the [toy] / [estimate] / [bench] section
    published_compare: dict[str, Any] = field(default_factory=dict)

    def scale(self, name: str) -> Scale:
        """The scale ``name``, or an error listing this experiment's scales."""
        if name not in self.scales:
            raise OptionError(f"experiment {self.name!r} ({self.path}) has no scale {name!r}; "
                              f"its scales: {', '.join(self.scales)}")
        return self.scales[name]

    def grid_at(self, scale: Scale) -> dict[str, list[Any]]:
        """The grid at ``scale``: ``[grid]`` with the scale's ``grid`` entries replacing same keys."""
        return {**self.grid, **scale.grid}


def variant_keys(variant: dict[str, Any], scale: str) -> dict[str, Any]:
    """A variant's ``--set`` keys at ``scale``: its plain keys, then its ``[SCALE]`` sub-table's."""
    plain = {k: v for k, v in variant.items() if k != "name" and not (k in SCALES and isinstance(v, dict))}
    return {**plain, **variant.get(scale, {})}


def experiments_dir() -> Path:
    """Where experiments are looked for: ``$BPFREE_EXPERIMENTS``, else ``./experiments``."""
    return Path(os.environ.get("BPFREE_EXPERIMENTS") or "experiments")


def discover(directory: Path | None = None) -> dict[str, Path]:
    """``{name: path}`` of every ``*.toml`` in ``directory`` that has a ``kind`` key, sorted by name."""
    directory = Path(directory) if directory is not None else experiments_dir()
    if not directory.is_dir():
        return {}
    found = {}
    for path in sorted(directory.glob("*.toml")):
        if "kind" in load_toml(path):
            found[path.stem] = path
    return found


def find(name: str, directory: Path | None = None) -> Spec:
    """The experiment ``name`` (or the experiment file ``name``, a path ending in ``.toml``); an
    unknown name is an error listing the available ones."""
    if name.endswith(".toml") and Path(name).is_file():
        return load_spec(name)
    directory = Path(directory) if directory is not None else experiments_dir()
    found = discover(directory)
    if name not in found:
        listing = ", ".join(found) or "(none)"
        raise OptionError(f"unknown experiment {name!r} in {directory}/; available: {listing}")
    return load_spec(found[name])


def _fail(path: Path, where: str, text: str):
    raise OptionError(f"{path}: {where}: {text}")


def _text(path: Path, data: dict, key: str, required: bool = False) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        _fail(path, key, f"must be a string, got {type(value).__name__} {value!r}")
    if required and not value.strip():
        _fail(path, key, "must be given (a non-empty string)")
    return value


def _plain(path: Path, where: str, value: Any) -> None:
    """Override values are scalars or lists of scalars (tables belong to [base] sections)."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (dict, list)):
            _fail(path, where, f"takes a number, a string, a boolean or a list of them, got {item!r}")


def _grid(path: Path, where: str, raw: Any) -> dict[str, list[Any]]:
    if not isinstance(raw, dict):
        _fail(path, where, f"must be a table of KEY = [values], got {raw!r}")
    grid = {}
    for key, values in raw.items():
        if not isinstance(values, list):
            _fail(path, f"{where}.{key}", f"must be a list of values, got {values!r}")
        if not values:
            _fail(path, f"{where}.{key}", "is an empty grid: give at least one value")
        if len({repr(v) for v in values}) != len(values):
            _fail(path, f"{where}.{key}", f"lists a value twice: {values!r}")
        for v in values:
            if isinstance(v, dict):
                _fail(path, f"{where}.{key}", f"values are scalars or lists, got a table {v!r}")
        grid[key] = list(values)
    return grid


def load_spec(path: str | Path) -> Spec:
    """Load and check ``path`` (see the module docstring); errors name the file and the key."""
    path = Path(path)
    data = load_toml(path)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        _fail(path, ", ".join(unknown), f"unknown key{'s' if len(unknown) > 1 else ''}; valid keys: {', '.join(TOP_KEYS)}")
    kind = data.get("kind")
    if kind not in KINDS:
        _fail(path, "kind", f"must be one of {', '.join(KINDS)}, got {kind!r}")
    title = _text(path, data, "title", required=True)
    questions = data.get("questions", [])
    if not isinstance(questions, list) or not all(isinstance(q, str) and QUESTION.match(q) for q in questions):
        _fail(path, "questions", f"must be a list such as [\"main\"] or [\"Q1\", \"Q2\"], got {questions!r}")

    base = data.get("base", {})
    if not isinstance(base, dict):
        _fail(path, "base", f"must be a table, got {base!r}")
    if base and kind not in CONFIG_KINDS:
        _fail(path, "base", f"kind {kind!r} takes no run configuration; its parameters go in [{kind}]")
    for key, value in base.items():
        if key in SECTIONS and isinstance(value, dict):
            for k, v in value.items():
                _plain(path, f"base.{key}.{k}", v)
        else:
            _plain(path, f"base.{key}", value)

    for other in ("toy", "estimate", "bench", "pipeline"):
        if other in data and other != kind:
            _fail(path, other, f"is the section of kind {other!r}, but this experiment's kind is {kind!r}")
    params = data.get(kind, {}) if kind != "train" else {}
    if not isinstance(params, dict):
        _fail(path, kind, f"must be a table, got {params!r}")

    raw_scales = data.get("scales", {})
    if not isinstance(raw_scales, dict) or not raw_scales:
        _fail(path, "scales", f"must hold at least one of [scales.{'], [scales.'.join(SCALES)}]")
    scales = {}
    for name, raw in raw_scales.items():
        where = f"scales.{name}"
        if name not in SCALES:
            _fail(path, where, f"unknown scale {name!r}; scales are {', '.join(SCALES)}")
        if not isinstance(raw, dict):
            _fail(path, where, f"must be a table, got {raw!r}")
        seeds = raw.get("seeds", 1)
        if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
            _fail(path, f"{where}.seeds", f"must be a positive integer, got {seeds!r}")
        assumed = _text(path, raw, "assumed")
        grid = _grid(path, f"{where}.grid", raw.get("grid", {}))
        if grid and kind != "train":
            _fail(path, f"{where}.grid", f"a grid belongs to kind 'train' only (this is {kind!r})")
        overrides = {k: v for k, v in raw.items() if k not in SCALE_KEYS}
        for k, v in overrides.items():
            _plain(path, f"{where}.{k}", v)
        scales[name] = Scale(name, seeds, assumed, overrides, grid)

    variants = data.get("variants", [])
    grid = _grid(path, "grid", data.get("grid", {}))
    if kind in VARIANT_KINDS:
        if not isinstance(variants, list) or not variants:
            _fail(path, "variants", f"kind {kind!r} needs at least one [[variants]] table (with a name)")
        names = set()
        for i, v in enumerate(variants):
            where = f"variants[{i}]"
            if not isinstance(v, dict):
                _fail(path, where, f"must be a table, got {v!r}")
            name = v.get("name")
            if not isinstance(name, str) or not name.strip():
                _fail(path, f"{where}.name", "every variant needs a name (its row label)")
            if name in names:
                _fail(path, f"{where}.name", f"variant name {name!r} is used twice")
            names.add(name)
            for k, val in v.items():
                if k in SCALES and isinstance(val, dict):
                    if k not in scales:
                        _fail(path, f"{where}.{k}", f"names scale {k!r}, which this experiment does not have")
                    for kk, vv in val.items():
                        _plain(path, f"{where}.{k}.{kk}", vv)
                else:
                    _plain(path, f"{where}.{k}", val)
            for scale in scales.values():
                keys = set(variant_keys(v, scale.name))
                clash = sorted((set(grid) | set(scale.grid)) & keys)
                if clash:
                    _fail(path, f"{where}.{clash[0]}", "is also a grid key: set it in one place only")
    elif "variants" in data:
        _fail(path, "variants", f"variants belong to kinds {' and '.join(VARIANT_KINDS)} only (this is {kind!r})")
    if grid and kind != "train":
        _fail(path, "grid", f"a grid belongs to kind 'train' only (this is {kind!r})")
    return Spec(
        name=path.stem, path=path, title=title, kind=kind, questions=list(questions),
        description=_text(path, data, "description"), published=pub.parse(path, data.get("published")),
        base=base, scales=scales, variants=[dict(v) for v in variants], grid=grid, params=dict(params),
        published_compare=pub.parse_compare(path, data.get("published_compare")),
    )
