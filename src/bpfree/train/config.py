"""Run configuration: the training options plus the options of the model, method and dataset.

A run is described by four sections, each checked against the options its piece declares::

    [run]     method, model, dataset, epochs, batch_size, optimizer, lr, seed, device, ...
    [model]   e.g. widths, activation            (bpfree.models.<name> options)
    [method]  e.g. rule, eta, samples            (bpfree.methods.<name> options)
    [data]    dataset options

``--set KEY=VALUE`` finds ``KEY`` in whichever section declares it (``section.KEY`` picks one
explicitly); an unknown key is an error listing every valid key. ``config.toml`` in a run
directory holds the resolved configuration, all defaults written out.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import methods, models
from .. import options as opts
from ..options import OptionError, option

SECTIONS = ("run", "model", "method", "data")
#: Run options that say where and how a run computes, not what: a checkpoint resumes, and an
#: experiment's finished run counts as done, whatever they are.
PLACEMENT = ("device", "dist_timeout", "overlap_reduction")


@dataclass
class RunOptions:
    method: str = option("bp", "learning rule (bpfree list methods)")
    model: str = option("mlp", "model (bpfree list models)")
    dataset: str = option("mnist", "dataset (bpfree list datasets)")
    epochs: int = option(1, "training epochs")
    batch_size: int = option(128, "mini-batch size")
    optimizer: str = option("adam", "optimizer", choices=("sgd", "adam", "adamw"))
    lr: float = option(1e-3, "learning rate")
    momentum: float = option(0.9, "SGD momentum")
    weight_decay: float = option(0.0, "weight decay")
    seed: int = option(0, "seed of weights, data order and the method's generator (unless the method sets its own)")
    device: str = option("auto", "cpu, cuda, cuda:N, or auto (CUDA when present)")
    limit_train: int = option(0, "use only the first N training samples (0: all)")
    limit_test: int = option(0, "evaluate on only the first N test samples (0: all)")
    eval_batch_size: int = option(1000, "batch size for evaluation")
    log_every: int = option(50, "write a step line to metrics.jsonl every N steps")
    checkpoint_every: int = option(0, "also checkpoint every N steps (0: at the end of each epoch only)")
    diagnostics_every: int = option(0, "alignment diagnostics on a fixed probe batch every N steps (0: off)")
    probe_size: int = option(256, "samples in the diagnostics probe batch")
    amp: str = option("none", "mixed precision: bf16 or fp16 autocast around each step (fp16 adds gradient scaling)",
                      choices=("none", "bf16", "fp16"))
    log: tuple[str, ...] = option(("jsonl",), "where metrics go: metrics.jsonl always (the source of truth); "
                                              "tensorboard also writes them as TensorBoard scalars in RUN/tensorboard",
                                  choices=("jsonl", "tensorboard"))
    tf32: bool = option(True, "CUDA: float32 matrix products and convolutions on TF32 tensor cores (10-bit mantissa "
                              "inputs, float32 accumulation); false: full float32. No effect on the CPU")
    cudnn_benchmark: bool = option(True, "CUDA: cuDNN times its convolution algorithms per input shape and keeps the "
                                         "fastest (off whenever deterministic is not off)")
    deterministic: str = option("off", "deterministic algorithms (torch.use_deterministic_algorithms, cudnn.deterministic, "
                                       "CUBLAS_WORKSPACE_CONFIG): on stops at an op that has none, naming it; warn warns "
                                       "and runs it", choices=("off", "warn", "on"))
    pipeline: int = option(0, "pipeline parallel: split the model at its feedback points into N stages, one process "
                              "each (0: off; dfa, grape, drtp, dkp on their forward-only schedule, bp on "
                              "torch.distributed.pipelining)")
    microbatches: int = option(4, "pipeline parallel: micro-batches per step (the batch is split with tensor_split)")
    pipeline_schedule: str = option("1f1b", "pipeline parallel: the schedule of bp (torch.distributed.pipelining)",
                                    choices=("1f1b", "gpipe"))
    dist_timeout: float = option(300.0, "data parallel: seconds a collective waits for the other processes before "
                                        "the group fails (a rank that died does not leave the others blocked)")
    overlap_reduction: bool = option(False, "data parallel: overlap each bucket's all-reduce with the backward pass "
                                            "still running")

    def check(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size", "log_every", "probe_size"):
            if getattr(self, key) < 1:
                raise OptionError(f"option {key!r} must be at least 1, got {getattr(self, key)}")
        if self.microbatches < 1:
            raise OptionError(f"option 'microbatches' must be at least 1, got {self.microbatches}")
        if self.pipeline == 1 or self.pipeline < 0:
            raise OptionError(f"option 'pipeline' is the number of stages: 0 (off) or at least 2, got {self.pipeline}")
        for key in ("limit_train", "limit_test", "checkpoint_every", "diagnostics_every"):
            if getattr(self, key) < 0:
                raise OptionError(f"option {key!r} must not be negative, got {getattr(self, key)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise OptionError(f"option 'lr' must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise OptionError(f"option 'momentum' must lie in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise OptionError(f"option 'weight_decay' must be a non-negative finite number, got {self.weight_decay}")
        if not 0 <= self.seed < 2**63:
            raise OptionError(f"option 'seed' must lie in [0, 2**63), got {self.seed}")
        for key in ("method", "model", "dataset"):
            if not getattr(self, key).strip():
                raise OptionError(f"option {key!r} must name a {key}, got an empty string")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise OptionError(f"option 'dist_timeout' must be a positive number of seconds, got {self.dist_timeout}")
        if not self.log:
            raise OptionError("option 'log' names no log; give jsonl, tensorboard or jsonl,tensorboard")
        if "tensorboard" in self.log:
            from .board import require_tensorboard

            require_tensorboard()


@dataclass
class RunConfig:
    run: RunOptions = field(default_factory=RunOptions)
    model: dict[str, Any] = field(default_factory=dict)
    method: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {"run": opts.as_dict(self.run), "model": dict(self.model), "method": dict(self.method), "data": dict(self.data)}


def section_classes(run: RunOptions) -> dict[str, type]:
    """The options dataclass of every section for the chosen model, method and dataset."""
    from .. import tasks

    return {
        "run": RunOptions,
        "model": models.get(run.model).options,
        "method": methods.get(run.method).Options,
        "data": tasks.get(run.dataset).options,
    }


def resolve(base: dict[str, dict[str, Any]] | None = None, sets: list[str] | tuple[str, ...] = (),
            overrides: dict[str, Any] | None = None, sibling_methods: tuple[str, ...] = ()) -> RunConfig:
    """A checked :class:`RunConfig` from a TOML-like dict, ``KEY=VALUE`` strings and run overrides.

    ``base`` may hold the four sections, or flat keys (which are placed like ``--set`` keys).
    ``overrides`` are run options (from dedicated command-line flags) applied after ``base``.
    Every section is validated and filled with its defaults. A key written ``NAME.key`` where
    ``NAME`` is a method applies only when that method runs. ``sibling_methods`` (the other
    methods of a comparison): a plain key that is an option of one of them, and of no section
    here, is skipped instead of rejected.
    """
    raw: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    flat: list[tuple[str, Any]] = []
    for key, value in (base or {}).items():
        if key in SECTIONS and isinstance(value, dict):
            raw[key].update(value)
        else:
            flat.append((key, value))
    raw["run"].update({k: v for k, v in (overrides or {}).items() if v is not None})
    for item in sets:
        if "=" not in item:
            raise OptionError(f"--set takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        flat.append((key.strip(), value.strip()))
    # run options first: they decide which model/method/data sections exist.
    run_fields = {f.name for f in dataclasses.fields(RunOptions)}
    later = []
    for key, value in flat:
        if key.startswith("run."):
            raw["run"][key[4:]] = value
        elif key in run_fields:
            raw["run"][key] = value
        else:
            later.append((key, value))
    for section, values in raw.items():
        for key, value in values.items():
            _check_plain(section, key, value)
    for key, value in later:
        _check_plain("", key, value)
    run = _build(RunOptions, raw["run"], what="the run")
    from ..models.factory import check_recorded

    check_recorded(run.model, raw["model"].get("sha256"))  # a changed model file is refused before it runs
    classes = section_classes(run)
    valid = {s: {f.name for f in dataclasses.fields(c)} for s, c in classes.items()}
    sibling_keys = {f.name for m in sibling_methods for f in dataclasses.fields(methods.get(m).Options)}
    for key, value in later:
        if "." in key:
            section, name = key.split(".", 1)
            if section in methods.available() and section not in SECTIONS:
                if section == run.method:
                    raw["method"][name] = value
                continue
            if section not in SECTIONS:
                raise OptionError(f"unknown section {section!r} in {key!r}; sections: {', '.join(SECTIONS)}")
            raw[section][name] = value
            continue
        owners = [s for s in SECTIONS if key in valid[s]]
        if not owners and key in sibling_keys:
            continue
        if not owners:
            listing = "; ".join(f"{s}: {', '.join(sorted(valid[s])) or '(none)'}" for s in SECTIONS)
            raise OptionError(
                f"unknown option {key!r} for method {run.method!r}, model {run.model!r}, dataset {run.dataset!r}. "
                f"Valid options — {listing}"
            )
        if len(owners) > 1:
            raise OptionError(f"option {key!r} is ambiguous; write one of: {', '.join(f'{s}.{key}' for s in owners)}")
        raw[owners[0]][key] = value
    built = {s: _build(classes[s], raw[s], what=f"{s} {getattr(run, s, '') if s != 'run' else ''}".strip())
             for s in ("model", "method", "data")}
    return RunConfig(run=run, **{s: opts.as_dict(v) for s, v in built.items()})


def _build(cls: type, values: dict[str, Any], what: str) -> Any:
    """:func:`bpfree.options.build`, with a value of the wrong kind (``None`` for a number, a list for
    an integer) reported as an :class:`OptionError` that names its key."""
    try:
        return opts.build(cls, values, what=what)
    except TypeError:
        import typing

        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if key in hints:
                try:
                    opts._convert(value, hints[key], key)
                except TypeError:
                    raise OptionError(f"option {key!r} ({what}) cannot take {value!r}") from None
        raise


def _check_plain(section: str, key: str, value: Any) -> None:
    """Option values are scalars or lists of scalars; anything else (a TOML table...) is an error."""
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if item is not None and not isinstance(item, (str, int, float, bool)):
            where = f"{section}.{key}" if section else key
            raise OptionError(f"option {where!r} takes a number, a string, a boolean or a list of them, "
                              f"got {type(item).__name__} {item!r}")


def load_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise OptionError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as err:
        raise OptionError(f"config file {path} is not valid TOML: {err}") from None


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    s = str(v).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{s}"'


def dumps_toml(data: dict[str, dict[str, Any]]) -> str:
    """TOML text for a dict of sections of scalars and lists (``None`` values are left out)."""
    lines = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for k, v in values.items():
            if v is not None:
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
    return "\n".join(lines)
