"""The run directory: checked before training, written by rank 0, read back to resume.

A run directory holds::

    config.toml      the resolved configuration
    metrics.jsonl    one JSON object per logged step ("kind": "step"), per epoch ("epoch"),
                     per diagnostics probe ("diagnostics")
    checkpoint.pt    written atomically at the end of each epoch (and every checkpoint_every steps)
    summary.json     the final figures (test_accuracy or test_ppl, train_seconds, ...)

Every file is written atomically (:mod:`bpfree.atomic`); temporary files left by a killed run
are removed when it resumes. Before training, the directory must be writable and have room for a
checkpoint (plus a margin), and an existing run is never overwritten unless asked.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..options import OptionError
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_json, save_text
from .config import PLACEMENT, RunConfig, dumps_toml, load_toml, resolve
from .errors import TrainingError

#: Files the loop writes in a run directory (their temporary copies start with ``.NAME.``).
RUN_FILES = ("config.toml", "metrics.jsonl", "checkpoint.pt", "checkpoint.pt.sha256", "summary.json")
#: Free space required beyond the estimated checkpoint size.
SPACE_MARGIN_BYTES = 16 * 2**20


def check_out_dir(out: Path) -> None:
    """Fail before training if ``out`` cannot be created or written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"\0" * 65536)
        probe.unlink()
    except OSError as err:
        raise TrainingError(f"cannot write to the run directory {out}: {err.strerror or err}") from err


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor in a nested state (dicts, lists, tuples)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(model: torch.nn.Module, method: Any, run: Any) -> int:
    """About how many bytes a checkpoint takes: model, optimizer (of ``run.optimizer``), method, and a MB."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    per_param = {"adam": 2, "adamw": 2}.get(run.optimizer, 1 if run.momentum else 0)
    return tensor_bytes(model.state_dict()) + per_param * params + tensor_bytes(method.state_dict()) + 2**20


def check_free_space(out: Path, needed: int) -> None:
    """Fail unless the file system of ``out`` has ``needed`` bytes plus a margin free."""
    free = shutil.disk_usage(out).free
    want = needed + needed // 4 + SPACE_MARGIN_BYTES
    if free < want:
        mb = lambda n: f"{n / 2**20:.1f} MB"
        raise TrainingError(
            f"not enough free space for {out}: a checkpoint of this run takes about {mb(needed)}, so "
            f"{mb(want)} should be free (with margin), but only {mb(free)} is. Free some space or choose another --out"
        )


class NoLog:
    """What ranks other than 0 write metrics to: nothing."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def tell(self) -> int:
        return 0

    def close(self) -> None:
        pass


def remove_temp_files(out: Path) -> None:
    """Remove the temporary files a killed run left behind."""
    for name in RUN_FILES:
        for tmp in out.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def prepare(out: Path, cfg: RunConfig, *, resume: bool, overwrite: bool, checkpoint_bytes: int) -> None:
    """Rank 0, before training: a writable directory with room; a fresh run never clobbers an old one."""
    check_out_dir(out)
    remove_temp_files(out)
    if not resume:
        existing = [n for n in ("checkpoint.pt", "summary.json", "config.toml") if (out / n).exists()]
        if existing and not overwrite:
            raise TrainingError(
                f"{out} already holds a run ({', '.join(existing)}): continue it with --resume {out}, "
                f"or choose another --out, or pass --overwrite to replace it"
            )
        for n in ("checkpoint.pt", "checkpoint.pt.sha256", "summary.json"):
            (out / n).unlink(missing_ok=True)
    check_free_space(out, checkpoint_bytes)
    if not resume:
        save_text(dumps_toml(cfg.to_dict()), out / "config.toml")
        (out / "metrics.jsonl").write_bytes(b"")


def read_config(out: Path) -> tuple[dict[str, Any], bool]:
    """The raw configuration of the run in ``out`` and whether it has a checkpoint."""
    if not (out / "config.toml").exists():
        raise TrainingError(f"{out} holds no config.toml: it is not a bpfree run directory")
    return load_toml(out / "config.toml"), (out / "checkpoint.pt").exists()


def write_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    try:
        save_checkpoint(payload, path)
    except OSError as err:
        raise TrainingError(
            f"cannot write the checkpoint {path}: {err.strerror or err}; the previous checkpoint is intact"
        ) from err


def config_diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> list[str]:
    """``section.key`` of every option whose value differs between ``a`` and ``b``."""
    keys = []
    for section in sorted(set(a) | set(b)):
        sa, sb = a.get(section, {}), b.get(section, {})
        keys += [f"{section}.{k}" for k in sorted(set(sa) | set(sb)) if sa.get(k) != sb.get(k)]
    return keys


def _without_device(cfg: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``cfg`` without the run options of :data:`~bpfree.train.config.PLACEMENT` (device, dist_timeout, overlap_reduction)."""
    out = {k: dict(v) for k, v in cfg.items()}
    for key in PLACEMENT:
        out.get("run", {}).pop(key, None)
    return out


def read_checkpoint(out: Path, cfg: RunConfig, trust: bool = False) -> dict[str, Any]:
    """Rank 0: the checkpoint, checked against ``cfg``; ``metrics.jsonl`` cut back to it.

    ``trust``: see :func:`bpfree.train.checkpoint.load_checkpoint`.
    """
    path = out / "checkpoint.pt"
    try:
        ck = load_checkpoint(path, map_location="cpu", trust=trust)
    except CheckpointError as err:
        raise TrainingError(str(err)) from err.__cause__
    needed = {"config", "state", "model", "optimizer", "method"}
    if not isinstance(ck, dict) or not needed <= set(ck):
        raise TrainingError(f"{path} is not a bpfree checkpoint")
    try:
        saved = resolve(ck["config"]).to_dict()
    except (OptionError, ValueError) as err:
        raise TrainingError(f"{path} was written by a configuration this version cannot use: {err}") from None
    diff = config_diff(_without_device(saved), _without_device(cfg.to_dict()))
    if diff:
        raise TrainingError(f"{path} was written by a different configuration (differs in {', '.join(diff)})")
    metrics = out / "metrics.jsonl"
    keep = int(ck["state"].get("metrics_bytes", 0))
    size = metrics.stat().st_size if metrics.exists() else 0
    if size >= keep:
        with open(metrics, "ab") as f:
            f.truncate(keep)  # drop lines logged after the checkpoint
    else:
        warnings.warn(f"{metrics} is shorter than the checkpoint recorded; its earlier lines are lost", RuntimeWarning)
    return ck


def write_summary(out: Path, cfg: RunConfig, primary: str, figures: dict[str, Any]) -> dict[str, Any]:
    """``summary.json``: the run's identity, its last epoch line of ``metrics.jsonl`` and ``figures``."""
    r = cfg.run
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    epochs = [l for l in lines if l["kind"] == "epoch"]
    if not epochs:
        raise TrainingError(f"{out / 'metrics.jsonl'} holds no epoch line: the run directory is damaged")
    last = epochs[-1]
    summary = {"method": r.method, "model": r.model, "dataset": r.dataset, "epochs": r.epochs,
               "primary": f"test_{primary}"}
    summary.update({k: v for k, v in last.items() if k.startswith(("test_", "train_")) and k != "train_seconds"})
    summary.update(figures)
    summary["config"] = cfg.to_dict()
    save_json(summary, out / "summary.json")
    return summary
