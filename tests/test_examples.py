"""The example of experiments/examples/: its script writes the data, its experiment file trains on it.

The script must write 3 classes x N images per split, the same bytes for the same seed; the
experiment (images:FOLDER data, a py:FILE.py:FACTORY model) must run at its quick scale from a
copy of the folder, through the experiment runner and the CLI, with one row per variant.
"""

from __future__ import annotations

import hashlib
import runpy
import shutil
from pathlib import Path

from _cli import run_cli
from bpfree import experiment

REPO = Path(__file__).resolve().parents[1]


def digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.rglob("*.png")))).hexdigest()


def test_the_example_experiment_runs_on_the_data_its_script_writes(tmp_path, monkeypatch):
    shutil.copytree(REPO / "experiments" / "examples", tmp_path / "experiments" / "examples",
                    ignore=shutil.ignore_patterns("data", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    script = runpy.run_path("experiments/examples/make_shapes.py")
    out = Path("experiments/examples/data/shapes")
    script["main"](["--out", str(out), "--train", "10", "--test", "4"])
    for split, n in (("train", 10), ("test", 4)):
        assert {p.name: len(list(p.glob("*.png"))) for p in (out / split).iterdir()} == \
               {"circle": n, "square": n, "triangle": n}
    again = script["write"](tmp_path / "again", 10, 4, 0)
    assert digest(again) == digest(out)  # seeded: the same bytes

    name = "experiments/examples/own-data.toml"
    rc, text, err = run_cli("experiment", "run", name, "--dry-run")
    assert rc == 0 and "3 runs" in text, err
    spec = experiment.find(name)
    assert spec.base["dataset"] == f"images:{out}" and spec.base["model"].startswith("py:experiments/examples/")
    results = experiment.run(spec, "quick", out=tmp_path / "results", progress=False, echo=lambda s: None)
    assert [row["variant"] for row in results["rows"]] == ["bp", "dfa", "grape"]
    assert (tmp_path / "results" / "own-data" / "quick" / "table.md").exists()
