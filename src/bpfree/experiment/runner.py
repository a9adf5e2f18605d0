"""Running an experiment: plan its jobs, skip what is done, run the rest, write table and figures.

Each kind (:mod:`.train`, :mod:`.toy`, :mod:`.estimate`, :mod:`.bench`, :mod:`.pipeline`) provides

* ``PARAMS``: the dataclass of its ``[kind]`` section (``None`` for train),
* ``jobs(spec, scale, seeds, root)``: its jobs, every configuration checked,
* ``status(job)``: done, new, resume, stale or failed (default: the job's cached ``result.json``),
* ``execute(job, state, ctx)``: compute it (and store the result); returns a one-line report,
* ``record(job)``: its stored result (default: from ``result.json``),
* ``write(spec, scale, seeds, jobs, records, root)``: the results, with ``table.md`` and PNG figures,
* ``render(spec, scale, doc, root, jobs=None)``: ``table.md`` and the figures again from stored
  results ``doc`` (a ``results.json``); returns what it changed in them.

Results go to ``OUT/NAME/SCALE/``: ``table.md``, the figures, ``results.json`` (the experiment's
text, its published numbers, the scale, every per-seed number) and ``runs/`` (one folder per job;
not committed). A call that stops (Ctrl-C, a crash) leaves the finished jobs in ``runs/``; the
next call continues. ``only`` (``--only KEY=VALUE``) runs the jobs of some rows alone (a grid
value, a variant); while other jobs are still to run, the results are written over the finished
ones and say so (``partial`` in ``results.json``, a first line in ``table.md``). :func:`render`
redraws tables and figures from ``results.json`` alone (no training, no ``runs/``), with the
experiment file's current published numbers.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..options import OptionError
from ..train.checkpoint import save_json
from . import bench, estimate, pipeline, toy, train
from .common import DONE, FAILED, Job, cache_status, load_result, to_json
from .spec import Spec

KIND_MODULES = {"train": train, "toy": toy, "estimate": estimate, "bench": bench, "pipeline": pipeline}


@dataclass
class Context:
    """What every job may use: the dataset cache, data loaded once per call, and whether
    interrupted runs' checkpoints are trusted without their hash and safe-load checks."""

    data_dir: Path | None = None
    trust_checkpoints: bool = False
    cache: dict[str, Any] = field(default_factory=dict)


def plan(spec: Spec, scale: str, seeds: int | None = None, out: str | Path = "results") -> tuple[list[Job], int]:
    """``(jobs, seeds)`` of ``spec`` at ``scale``; ``seeds`` defaults to the scale's."""
    sc = spec.scale(scale)
    n = sc.seeds if seeds is None else int(seeds)
    if n < 1:
        raise OptionError(f"--seeds must be at least 1, got {n}")
    kind = KIND_MODULES[spec.kind]
    return kind.jobs(spec, sc, n, Path(out) / spec.name / scale), n


def job_status(spec: Spec, job: Job) -> str:
    kind = KIND_MODULES[spec.kind]
    return kind.status(job) if hasattr(kind, "status") else cache_status(job)


def select(jobs: list[Job], only: dict[str, str] | None) -> list[bool]:
    """Which of ``jobs`` the filter ``only`` (row column -> value as tables show it, e.g.
    ``{"model": "resnet20"}`` or ``{"variant": "grape"}``) keeps; all of them without one.
    Raises :class:`OptionError` naming the columns and values there are."""
    if not only:
        return [True] * len(jobs)
    for key, value in only.items():
        values = sorted({str(j.row[key]) for j in jobs if key in j.row})
        if not values:
            columns = sorted({k for j in jobs for k in j.row})
            raise OptionError(f"--only {key}=...: the rows have no column {key!r}; they have {', '.join(columns)}")
        if value not in values:
            raise OptionError(f"--only {key}={value}: no row has it; {key} is one of {', '.join(values)}")
    return [all(str(j.row.get(k)) == v for k, v in only.items()) for j in jobs]


def run(spec: Spec, scale: str, *, seeds: int | None = None, out: str | Path = "results", dry_run: bool = False,
        progress: bool = True, data_dir: Path | None = None, echo: Callable[[str], None] = print,
        trust_checkpoints: bool = False, only: dict[str, str] | None = None) -> dict[str, Any] | None:
    """Run ``spec`` at ``scale`` (see the module docstring), only the jobs ``only`` selects
    (:func:`select`); returns the results (``None`` for a dry run)."""
    jobs, n_seeds = plan(spec, scale, seeds, out)
    chosen = select(jobs, only)
    root = Path(out) / spec.name / scale
    kind = KIND_MODULES[spec.kind]
    states = [job_status(spec, j) for j in jobs]
    done = sum(s in (DONE, FAILED) for s, c in zip(states, chosen) if c)
    if dry_run:
        what = f"{sum(chosen)} of {len(jobs)} runs" if only else f"{len(jobs)} runs"
        echo(f"{spec.name} ({spec.kind}), scale {scale}, {n_seeds} seed(s): {what}, {done} done, "
             f"{sum(chosen) - done} to run -> {root}")
        for job, state, c in zip(jobs, states, chosen):
            if c:
                echo(f"  {state:7s} {job.label} seed{job.seed}  {job.dir}")
        return None
    ctx = Context(data_dir=data_dir, trust_checkpoints=trust_checkpoints)
    bar = tqdm(total=sum(chosen), initial=done, desc=spec.name, disable=not progress, dynamic_ncols=True)
    say = tqdm.write if progress else echo
    finished = done
    try:
        for job, state, c in zip(jobs, states, chosen):
            if state in (DONE, FAILED) or not c:
                continue
            t0 = time.perf_counter()
            line = kind.execute(job, state, ctx)
            finished += 1
            bar.update(1)
            say(f"[{finished}/{sum(chosen)}] {job.label} seed{job.seed}: {line} ({time.perf_counter() - t0:.0f} s)")
    except KeyboardInterrupt:
        bar.close()
        echo(f"{spec.name}: stopped with {finished} of {sum(chosen)} runs done; the same command continues")
        raise
    bar.close()
    ready = [j for j in jobs if job_status(spec, j) in (DONE, FAILED)]
    partial = None
    if len(ready) < len(jobs):
        partial = (f"{len(ready)} of {len(jobs)} runs; `bpfree experiment run {spec.name} --scale {scale}` "
                   f"runs the rest")
    records = [kind.record(j) if hasattr(kind, "record") else load_result(j) for j in ready]
    root.mkdir(parents=True, exist_ok=True)
    results = kind.write(spec, spec.scale(scale), n_seeds, ready, records, root)
    sc = spec.scale(scale)
    doc = {"name": spec.name, "title": spec.title, "kind": spec.kind, "questions": spec.questions,
           "description": spec.description, **published(spec), "scale": scale, "seeds": n_seeds,
           "assumed": sc.assumed, "written": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    if partial:
        doc["partial"] = partial
        mark_partial(root / doc.get("table", "table.md"), partial)
    save_json(to_json(doc), root / "results.json")
    echo(f"{spec.name}: {len(ready)} runs -> {root / 'table.md'}" + (f" (partial: {partial})" if partial else ""))
    return doc


def mark_partial(table: Path, partial: str) -> None:
    """Put the line saying that ``table`` holds part of its experiment's runs above it."""
    if table.exists():
        table.write_text(f"**Partial results: {partial}.**\n\n" + table.read_text())


def published(spec: Spec) -> dict[str, Any]:
    """The experiment's published numbers as ``results.json`` stores them."""
    return {"published": [e.to_dict() for e in spec.published], "published_compare": spec.published_compare}


def render(spec: Spec, scale: str, *, out: str | Path = "results", echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Draw ``OUT/NAME/SCALE/``'s table and figures again from its ``results.json`` (nothing is
    trained or read from ``runs/``), with the experiment file's current published numbers; the
    results file is rewritten with them and with what the tables derive (published values, gaps
    closed). Returns the results."""
    sc = spec.scale(scale)
    root = Path(out) / spec.name / scale
    path = root / "results.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no results to render; run `bpfree experiment run {spec.name} "
                                f"--scale {scale}` first")
    doc = json.loads(path.read_text())
    if doc.get("kind") != spec.kind:
        raise OptionError(f"{path} holds results of kind {doc.get('kind')!r}, but {spec.path} is of kind {spec.kind!r}")
    try:
        jobs, _ = plan(spec, scale, doc.get("seeds"), out)
    except OptionError:
        jobs = None  # only used for what older results.json files lack
    doc.update(KIND_MODULES[spec.kind].render(spec, sc, doc, root, jobs=jobs))
    doc.update(published(spec))
    if doc.get("partial"):
        mark_partial(root / doc.get("table", "table.md"), doc["partial"])
    save_json(to_json(doc), path)
    echo(f"{spec.name}: {scale} -> {root / doc.get('table', 'table.md')}, {', '.join(doc.get('plots', []))}")
    return doc
