"""The experiment runner: specs, the four kinds, resumption and the results page (tiny configs)."""

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from bpfree import bench, cli, experiment, models
from bpfree.experiment import docs, estimate
from bpfree.experiment.common import DONE, NEW, RESUME, STALE
from bpfree.options import OptionError, option
from bpfree.points import FeedbackPoint
from bpfree.train import loop
from bpfree.train.config import load_toml, resolve

REPO = Path(__file__).resolve().parents[1]

TINY = """
title = "tiny"
kind = "train"
questions = ["main"]
description = "two methods on blobs"
published = [{ source = "grape", claim = "nothing published" }]
[base]
dataset = "blobs-test"
model = "mlp"
widths = [8]
epochs = 1
batch_size = 64
limit_train = 256
limit_test = 128
lr = 0.01
rule = "cosine"
diagnostics_every = 2
[scales.quick]
seeds = 2
assumed = "tiny on purpose"
[[variants]]
name = "bp"
method = "bp"
[[variants]]
name = "grape"
method = "grape"
"""


def write_spec(folder: Path, name: str, text: str) -> Path:
    (folder / "experiments").mkdir(parents=True, exist_ok=True)
    path = folder / "experiments" / f"{name}.toml"
    path.write_text(text)
    return path


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    write_spec(tmp_path, "tiny", TINY)
    monkeypatch.setenv("BPFREE_EXPERIMENTS", str(tmp_path / "experiments"))
    return tmp_path


def run_quiet(name: str, out: Path, **kw):
    return experiment.run(experiment.find(name), "quick", out=out, progress=False, echo=lambda s: None, **kw)


def run_spec(folder: Path, name: str, text: str, out: Path | None = None) -> dict:
    """Write ``text`` as ``folder/experiments/name.toml`` and run its quick scale into ``out``."""
    spec = experiment.load_spec(write_spec(folder, name, text))
    return experiment.run(spec, "quick", out=out or folder, progress=False, echo=lambda s: None)


@pytest.fixture
def counted(monkeypatch):
    """Counts calls of the training loop's ``train`` and ``resume``."""
    calls = {"train": 0, "resume": 0}
    real_train, real_resume = loop.train, loop.resume

    def train(*a, **k):
        calls["train"] += 1
        return real_train(*a, **k)

    def resume(*a, **k):
        calls["resume"] += 1
        return real_resume(*a, **k)

    monkeypatch.setattr(loop, "train", train)
    monkeypatch.setattr(loop, "resume", resume)
    return calls


def test_train_table_is_mean_and_std_of_the_run_summaries(tiny):
    doc = run_quiet("tiny", tiny / "results")
    root = tiny / "results" / "tiny" / "quick"
    table = (root / "table.md").read_text()
    assert [r["label"] for r in doc["rows"]] == ["bp", "grape"]
    for row in doc["rows"]:
        summaries = [json.loads((root / "runs" / row["label"] / f"seed{k}" / "summary.json").read_text()) for k in (0, 1)]
        assert [s["seed"] for s in summaries] == [0, 1]  # seed k: run.seed = base seed + k
        acc = [s["test_accuracy"] for s in summaries]
        assert row["mean"] == pytest.approx(statistics.fmean(acc), abs=1e-12)
        assert row["std"] == pytest.approx(statistics.stdev(acc), abs=1e-12)
        text = f"{100 * statistics.fmean(acc):.2f} ± {100 * statistics.stdev(acc):.2f}"
        assert f"| {row['label']} | {row['label']} | {text} |" in table
    # diagnostics: GrAPE's final B-J cosine is the mean over seeds of the last probe's mean over points
    grape = doc["rows"][1]
    finals = []
    for k in (0, 1):
        lines = [json.loads(l) for l in (root / "runs" / "grape" / f"seed{k}" / "metrics.jsonl").read_text().splitlines()]
        last = [l for l in lines if l["kind"] == "diagnostics"][-1]
        vals = [v for key, v in last.items() if key.startswith("b_jacobian_cos/")]
        finals.append(sum(vals) / len(vals))
    assert grape["b_jacobian_cos"][0] == pytest.approx(statistics.fmean(finals), abs=1e-12)
    assert (root / "metric.png").stat().st_size > 0 and (root / "alignment.png").stat().st_size > 0
    saved = json.loads((root / "results.json").read_text())
    assert saved["rows"][0]["runs"][1]["value"] == acc_of(root, "bp", 1)


def acc_of(root: Path, label: str, k: int) -> float:
    return json.loads((root / "runs" / label / f"seed{k}" / "summary.json").read_text())["test_accuracy"]


def test_second_call_trains_nothing_and_missing_results_are_redone(tiny, counted):
    out = tiny / "results"
    run_quiet("tiny", out)
    assert counted == {"train": 4, "resume": 0}
    runs = out / "tiny" / "quick" / "runs"
    mtimes = {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")}
    run_quiet("tiny", out)
    assert counted == {"train": 4, "resume": 0}
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("summary.json")} == mtimes
    # a deleted summary is redone from the checkpoint; a deleted run folder is trained again
    (runs / "grape" / "seed1" / "summary.json").unlink()
    for f in (runs / "bp" / "seed0").iterdir():
        f.unlink()
    spec = experiment.find("tiny")
    jobs, _ = experiment.plan(spec, "quick", out=out)
    assert [experiment.job_status(spec, j) for j in jobs] == [NEW, DONE, DONE, RESUME]
    run_quiet("tiny", out)
    assert counted == {"train": 5, "resume": 1}
    assert (runs / "grape" / "seed1" / "summary.json").exists()
    # an edited configuration makes every run stale
    write_spec(tiny, "tiny", TINY.replace("lr = 0.01", "lr = 0.02"))
    jobs, _ = experiment.plan(experiment.find("tiny"), "quick", out=out)
    assert {experiment.job_status(spec, j) for j in jobs} == {STALE}


def test_an_interrupted_grid_resumes_where_it_stopped(tiny, monkeypatch):
    calls = []
    real = loop.train

    def train(cfg, out, **kw):
        calls.append(Path(out))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(cfg, out, **kw)

    monkeypatch.setattr(loop, "train", train)
    with pytest.raises(KeyboardInterrupt):
        run_quiet("tiny", tiny / "results")
    assert not (tiny / "results" / "tiny" / "quick" / "table.md").exists()
    run_quiet("tiny", tiny / "results")
    assert len(calls) == 5  # 2 finished, 1 interrupted, then the interrupted one and the last
    assert calls[3] == calls[2]
    assert (tiny / "results" / "tiny" / "quick" / "table.md").exists()


def test_dry_run_lists_runs_and_trains_nothing(tiny, counted):
    lines = []
    experiment.run(experiment.find("tiny"), "quick", seeds=3, out=tiny / "results", dry_run=True, echo=lines.append)
    assert counted == {"train": 0, "resume": 0}
    assert "6 runs, 0 done, 6 to run" in lines[0] and len(lines) == 7
    assert not (tiny / "results").exists()


def test_only_runs_the_selected_rows_and_the_table_says_it_is_partial(tiny, counted):
    out = tiny / "results"
    run_quiet("tiny", out, only={"variant": "grape"})
    assert counted == {"train": 2, "resume": 0}  # grape's 2 seeds, not bp's
    root = out / "tiny" / "quick"
    doc = json.loads((root / "results.json").read_text())
    assert [row["variant"] for row in doc["rows"]] == ["grape"] and len(doc["rows"][0]["runs"]) == 2
    assert doc["partial"].startswith("2 of 4 runs")
    table = (root / "table.md").read_text()
    assert table.startswith("**Partial results: 2 of 4 runs") and "| grape |" in table and "| bp |" not in table
    experiment.render(experiment.find("tiny"), "quick", out=out, echo=lambda s: None)
    assert (root / "table.md").read_text() == table  # redrawn from results.json, still marked
    run_quiet("tiny", out)  # the rest: bp's seeds only, and a whole table without the mark
    assert counted == {"train": 4, "resume": 0}
    doc = json.loads((root / "results.json").read_text())
    assert "partial" not in doc and [row["variant"] for row in doc["rows"]] == ["bp", "grape"]
    assert not (root / "table.md").read_text().startswith("**Partial")


@pytest.mark.parametrize("only, words", [
    ({"model": "mlp"}, ["no column 'model'", "variant"]),
    ({"variant": "dfa"}, ["variant=dfa", "one of bp, grape"]),
])
def test_only_names_the_columns_and_values_there_are(tiny, counted, only, words):
    with pytest.raises(OptionError) as err:
        run_quiet("tiny", tiny / "results", only=only)
    assert all(w in str(err.value) for w in words) and counted == {"train": 0, "resume": 0}


def test_only_is_a_key_and_a_value_on_the_command_line(tiny, capsys):
    assert cli.main(["experiment", "run", "tiny", "--dry-run", "--only", "variant=bp"]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 runs, 0 done, 2 to run" in out and "grape" not in out
    assert cli.main(["experiment", "run", "tiny", "--dry-run", "--only", "variant"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


GRID = """
title = "grid"
kind = "train"
[base]
dataset = "blobs-test"
widths = [4]
[scales.quick]
limit_train = 64
[scales.full]
limit_train = 128
[scales.full.grid]
batch_size = [8]
[grid]
lr = [0.1, 0.01]
batch_size = [16, 32]
[[variants]]
name = "a"
method = "bp"
[[variants]]
name = "b"
method = "dfa"
quick.scale = 2.0
"""


def test_grid_is_the_cartesian_product_with_the_variants(tmp_path):
    spec = experiment.load_spec(write_spec(tmp_path, "grid", GRID))
    jobs, seeds = experiment.plan(spec, "quick", out=tmp_path)
    expected = [f"{v}, lr={lr}, batch_size={b}" for lr in ("0.1", "0.01") for b in (16, 32) for v in ("a", "b")]
    assert seeds == 1 and [j.label for j in jobs] == expected
    assert [(j.config.run.lr, j.config.run.batch_size, j.config.run.method) for j in jobs[:2]] == [
        (0.1, 16, "bp"), (0.1, 16, "dfa")]
    assert jobs[1].config.method["scale"] == 2.0  # the variant's quick.* keys apply at quick only
    assert jobs[0].dir == tmp_path / "grid" / "quick" / "runs" / "a-lr-0.1-batch-size-16" / "seed0"
    full, _ = experiment.plan(spec, "full", seeds=2, out=tmp_path)
    assert [j.label for j in full][:4] == ["a, lr=0.1, batch_size=8"] * 2 + ["b, lr=0.1, batch_size=8"] * 2
    assert full[3].config.method["scale"] == 1.0 and full[3].config.method["seed"] == 1
    assert {j.config.run.limit_train for j in full} == {128}


@pytest.mark.parametrize("text, words", [
    ("bogus = 1\n" + TINY, ["tiny.toml", "bogus", "unknown key"]),
    (TINY.replace('kind = "train"', 'kind = "tran"'), ["kind", "tran"]),
    (TINY + "\n[grid]\nlr = []\n", ["grid.lr", "empty grid"]),
    (TINY.replace('name = "bp"\n', ""), ["variants[0].name"]),
    (TINY.replace('name = "grape"', 'name = "bp"'), ["used twice"]),
    (TINY.replace("seeds = 2", "seeds = 0"), ["scales.quick.seeds"]),
    (TINY + "\n[scales.huge]\n", ["scales.huge", "unknown scale"]),
    (TINY + "\n[toy]\nsteps = 3\n", ["toy", "section of kind 'toy'"]),
    (TINY.replace('rule = "cosine"', 'rulez = "cosine"'), ["tiny.toml", "rulez", "row 'bp'"]),
    (TINY.replace('method = "grape"', 'method = "grape"\nquick.etaa = 1'), ["tiny.toml", "etaa", "row 'grape'"]),
])
def test_spec_errors_name_the_file_and_the_key(tiny, text, words):
    path = write_spec(tiny, "tiny", text)
    with pytest.raises(OptionError) as err:
        experiment.plan(experiment.load_spec(path), "quick")
    for w in words:
        assert w in str(err.value)


def test_unknown_experiment_and_scale_list_the_available_ones(tiny, capsys):
    assert cli.main(["experiment", "run", "nope", "--dry-run"]) == 2
    assert "available: tiny" in capsys.readouterr().err
    assert cli.main(["experiment", "run", "tiny", "--scale", "full", "--dry-run"]) == 2
    assert "has no scale 'full'; its scales: quick" in capsys.readouterr().err


def test_toy_with_eta_zero_keeps_every_cosine_at_c0(tmp_path):
    doc = run_spec(tmp_path, "toy", """
title = "toy"
kind = "toy"
[toy]
c0 = [-0.9, 0.0, 0.5]
noise = [0.0]
eta = 0.0
steps = 5
n = 8
o = 3
[scales.quick]
seeds = 2
""")
    assert [r["rule"] for r in doc["rows"]] == ["rescale", "alt1", "alt2", "cosine", "regress", "blend"]
    for row in doc["rows"]:
        for c0, (mean, std) in row["final_unit_cos"].items():
            assert mean == pytest.approx(float(c0), abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    table = (tmp_path / "toy" / "quick" / "table.md").read_text()
    assert "| cosine | 0.0 | -0.900 ± 0.000 | 0.000 ± 0.000 | 0.500 ± 0.000 |" in table


@dataclass
class LinearOptions:
    widths: tuple[int, ...] = option((8,), "hidden widths")
    activation: str = option("none", "ignored: the net is linear")


class LinearNet(nn.Module):
    """``y = W_L ... W_1 x``, a feedback point after every hidden layer."""

    def __init__(self, n_in: int, widths, n_out: int) -> None:
        super().__init__()
        dims = [n_in, *widths, n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:]))
        self.points = nn.ModuleList(FeedbackPoint() for _ in widths)

    def forward(self, x):
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.points):
                h = self.points[i](h)
        return h


@models.register("linear-test", "linear net (tests only)", LinearOptions)
def _linear(input_shape, num_classes, o):
    return LinearNet(math.prod(input_shape), o.widths, num_classes)


def test_exact_jacobian_of_a_linear_net_is_the_weight_product():
    torch.manual_seed(0)
    net = LinearNet(12, (6, 5), 3)
    x = torch.randn(300, 12)
    exact = estimate.exact_mean_jacobians(net, x, chunk=128)
    W1, W2, W3 = (l.weight.detach().double() for l in net.layers)
    torch.testing.assert_close(exact["points.1"], W3, rtol=0, atol=1e-6)
    torch.testing.assert_close(exact["points.0"], W3 @ W2, rtol=0, atol=1e-6)


def test_estimate_cosine_rises_with_the_number_of_samples_like_one_over_n(tmp_path):
    doc = run_spec(tmp_path, "est", """
title = "est"
kind = "estimate"
[estimate]
model = "linear-test"
data = "random"
depths = [1, 2]
width = 16
batches = [4]
samples = [1, 4, 16, 64, 256]
reference = 64
[scales.quick]
seeds = 3
""")
    for row in doc["rows"]:
        means = [m for m, _ in row["cos"]]
        assert all(a < b for a, b in zip(means, means[1:])), means
        assert means[0] < 0.7 and means[-1] > 0.95
        # cumulative mean of N unbiased estimates: 1/cos^2 - 1 ~ a/N, slope -1 on log-log axes
        assert row["slope"] == pytest.approx(-1.0, abs=0.2)
    assert doc["inputs"] == ["random N(0, 1) inputs"]
    assert "random N(0, 1) inputs" in (tmp_path / "est" / "quick" / "table.md").read_text()


# Fake step times (ms) of the bench test: index 0 is the one warm-up step, then the 3 timed samples.
# BP: median 4, mean 4.67; DFA at width 8: median 5, mean 5.67, per-sample ratios to BP 1.5, 2.25,
# 0.625 (median 1.5); DFA's times scale with width / 8. The ratio of the medians is 5/4 = 1.25 at
# width 8 and 10/4 = 2.5 at width 16; a mean (1.21, 2.43), an inverted ratio (0.8, 0.4), a median of
# per-sample ratios (1.5, 3) or a counted warm-up step (7/6, 14/6) all differ from it by > 0.03.
FAKE_MS = {"bp": [50.0, 2.0, 4.0, 8.0], "dfa": [50.0, 3.0, 9.0, 5.0]}


def test_bench_ratios_are_median_times_over_bps(tmp_path, monkeypatch):
    real_step = bench.one_step

    def fake_step(c, task, x, y, device):
        real_step(c, task, x, y, device)  # the real step runs; its wall-clock time is replaced
        k = getattr(c, "fake_calls", 0)  # counted per contender, i.e. per bench cell
        c.fake_calls = k + 1
        width = next(m for m in c.model.modules() if isinstance(m, nn.Linear)).out_features
        ms = FAKE_MS[c.name][k] * (width / 8 if c.name == "dfa" else 1)
        return ms / 1e3

    monkeypatch.setattr(bench, "one_step", fake_step)
    doc = run_spec(tmp_path, "cost", """
title = "cost"
kind = "bench"
[base]
dataset = "blobs-test"
batch_size = 16
device = "cpu"
[bench]
depths = [1]
widths = [8, 16]
methods = ["bp", "dfa"]
repeats = 3
warmup = 1
memory = false
[scales.quick]
threads = 1
""")
    cells = {(c["width"], c["method"]): c for c in doc["rows"]}
    assert set(cells) == {(8, "bp"), (8, "dfa"), (16, "bp"), (16, "dfa")}
    # The harness rounds median_ms and ratio_to_bp to 3 decimals: each is within 5e-4 of the exact value.
    tol = 5e-4 + 1e-12
    for w, dfa_ms, ratio in ((8, 5.0, 1.25), (16, 10.0, 2.5)):
        bp, dfa = cells[(w, "bp")]["seeds"][0], cells[(w, "dfa")]["seeds"][0]
        assert bp["steps_per_sample"] == dfa["steps_per_sample"] == 1
        assert bp["median_ms"] == pytest.approx(4.0, abs=tol) and bp["ratio_to_bp"] == 1.0
        assert dfa["median_ms"] == pytest.approx(dfa_ms, abs=tol)
        assert dfa["ratio_to_bp"] == pytest.approx(ratio, abs=tol)
        # one seed: the cell is that seed's figure, with no std
        assert cells[(w, "dfa")]["ratio_to_bp"][0] == pytest.approx(ratio, abs=tol)
        assert cells[(w, "dfa")]["ratio_to_bp"][1] is None
    table = (tmp_path / "cost" / "quick" / "table.md").read_text()
    assert "| 1 | 8 | dfa | 5.00 | 1.25 |" in table and "| 1 | 16 | dfa | 10.00 | 2.50 |" in table


def test_every_shipped_experiment_resolves_at_every_scale():
    found = experiment.discover(REPO / "experiments")
    assert {"main-cnn", "main-deep", "main-transformer", "alignment-rules", "ablations", "ablation-batchnorm",
            "estimate-quality", "toy-dynamics", "step-cost"} <= set(found)
    assert "demo" not in found  # a plain --config file, not an experiment
    resolve(load_toml(REPO / "experiments" / "demo.toml"))  # and still one `bpfree compare --config` takes
    for name, path in found.items():
        spec = experiment.load_spec(path)
        assert spec.questions and spec.description.strip() and {"quick", "full"} <= set(spec.scales), name
        assert set(spec.scales) <= set(experiment.SCALES), name
        for scale in spec.scales:
            assert spec.scales[scale].assumed.strip(), (name, scale)
            jobs, seeds = experiment.plan(spec, scale, out=Path("/nonexistent"))
            assert jobs and seeds >= 1, (name, scale)
            if spec.kind == "train":
                assert len({j.label for j in jobs}) * seeds == len(jobs)


def test_docs_page_holds_each_experiment_table_and_figures(tiny, tmp_path):
    results = tiny / "results"
    run_quiet("tiny", results)
    run_spec(tiny, "toy", """
title = "Toy rules"
kind = "toy"
questions = ["Q5"]
published = [{ source = "grape", claim = "Figures 4 and 5" }]
[toy]
rules = ["cosine"]
steps = 3
[scales.quick]
""", out=results)
    out = tmp_path / "site" / "results.md"
    out.parent.mkdir()
    (out.parent / "findings.md").write_text("GrAPE aligns.\n")
    text = docs.write(results, out).read_text()
    assert text.index("## Answers at quick scale") < text.index("GrAPE aligns.") < text.index("## tiny")
    for name in ("tiny", "toy"):
        table = (results / name / "quick" / "table.md").read_text().strip()
        assert table in text
    assert text.index("## tiny") < text.index("## Toy rules")  # main question first
    assert "tiny on purpose" in text and "nothing published" in text and "Figures 4 and 5" in text
    links = [l[l.index("](") + 2 : -1] for l in text.splitlines() if l.startswith("![")]
    assert len(links) == 3
    for link in links:
        assert (out.parent / link).resolve().is_file()
