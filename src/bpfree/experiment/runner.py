"""Running an experiment: plan its jobs, skip what is done, run the rest, write table and figures.

Each kind (:mod:`.train`, :mod:`.toy`, :mod:`.estimate`, :mod:`.bench`) provides

* ``PARAMS``: the dataclass of its ``[kind]`` section (``None`` for train),
* ``jobs(spec, scale, seeds, root)``: its jobs, every configuration checked,
* ``status(job)``: done, new, resume, stale or failed (default: the job's cached ``result.json``),
* ``execute(job, state, ctx)``: compute it (and store the result); returns a one-line report,
* ``record(job)``: its stored result (default: from ``result.json``),
* ``write(spec, scale, seeds, jobs, records, root)``: ``table.md`` and PNG figures; returns results.

Results go to ``OUT/NAME/SCALE/``: ``table.md``, the figures, ``results.json`` (the experiment's
text, the scale, every per-seed number) and ``runs/`` (one folder per job; not committed). A call
that stops (Ctrl-C, a crash) leaves the finished jobs in ``runs/``; the next call continues.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from tqdm.auto import tqdm

from ..options import OptionError
from ..train.checkpoint import save_json
from . import bench, estimate, toy, train
from .common import DONE, FAILED, Job, cache_status, load_result, to_json
from .spec import Spec

KIND_MODULES = {"train": train, "toy": toy, "estimate": estimate, "bench": bench}


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


def run(spec: Spec, scale: str, *, seeds: int | None = None, out: str | Path = "results", dry_run: bool = False,
        progress: bool = True, data_dir: Path | None = None, echo: Callable[[str], None] = print,
        trust_checkpoints: bool = False) -> dict[str, Any] | None:
    """Run ``spec`` at ``scale`` (see the module docstring); returns the results (``None`` for a dry run)."""
    jobs, n_seeds = plan(spec, scale, seeds, out)
    root = Path(out) / spec.name / scale
    kind = KIND_MODULES[spec.kind]
    states = [job_status(spec, j) for j in jobs]
    done = sum(s in (DONE, FAILED) for s in states)
    if dry_run:
        echo(f"{spec.name} ({spec.kind}), scale {scale}, {n_seeds} seed(s): {len(jobs)} runs, {done} done, "
             f"{len(jobs) - done} to run -> {root}")
        for job, state in zip(jobs, states):
            echo(f"  {state:7s} {job.label} seed{job.seed}  {job.dir}")
        return None
    ctx = Context(data_dir=data_dir, trust_checkpoints=trust_checkpoints)
    bar = tqdm(total=len(jobs), initial=done, desc=spec.name, disable=not progress, dynamic_ncols=True)
    say = tqdm.write if progress else echo
    finished = done
    try:
        for job, state in zip(jobs, states):
            if state in (DONE, FAILED):
                continue
            t0 = time.perf_counter()
            line = kind.execute(job, state, ctx)
            finished += 1
            bar.update(1)
            say(f"[{finished}/{len(jobs)}] {job.label} seed{job.seed}: {line} ({time.perf_counter() - t0:.0f} s)")
    except KeyboardInterrupt:
        bar.close()
        echo(f"{spec.name}: stopped with {finished} of {len(jobs)} runs done; the same command continues")
        raise
    bar.close()
    records = [kind.record(j) if hasattr(kind, "record") else load_result(j) for j in jobs]
    root.mkdir(parents=True, exist_ok=True)
    results = kind.write(spec, spec.scale(scale), n_seeds, jobs, records, root)
    sc = spec.scale(scale)
    doc = {"name": spec.name, "title": spec.title, "kind": spec.kind, "questions": spec.questions,
           "description": spec.description, "published": spec.published, "scale": scale, "seeds": n_seeds,
           "assumed": sc.assumed, "written": time.strftime("%Y-%m-%d %H:%M:%S"), **results}
    save_json(to_json(doc), root / "results.json")
    echo(f"{spec.name}: {len(jobs)} runs -> {root / 'table.md'}")
    return doc
