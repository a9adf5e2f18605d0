"""Figures: every committed figure shows data in every panel, the main figures are grouped and
coloured by method with published markers, and ``bpfree report`` on a one-epoch run with one
diagnostics probe draws every panel with visible points. Artists are inspected (see _figures.py)."""

import json
import math
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
from _figures import capture, empty_axes, visible_data
from matplotlib.colors import to_hex

from bpfree import cli, experiment, plots
from bpfree.experiment import docs
from bpfree.report import plot_runs, smoothed
from bpfree.train.config import resolve
from bpfree.train.loop import train

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(REPO.glob("results/*/*/results.json"))


@contextmanager
def render_copy(results_json: Path, out: Path, monkeypatch):
    """Render a committed results folder (its results.json and table.md only) into ``out``;
    returns the results and the captured ``{file name: figure}``."""
    name, scale = results_json.parent.parent.name, results_json.parent.name
    dest = out / name / scale
    dest.mkdir(parents=True)
    for f in ("results.json", "table.md"):
        shutil.copy(results_json.parent / f, dest / f)
    spec = experiment.load_spec(REPO / "experiments" / f"{name}.toml")
    with capture(monkeypatch) as saved:
        doc = experiment.render(spec, scale, out=out, echo=lambda s: None)
        figures = {Path(p).name: fig for p, fig in saved}
        yield doc, figures


def test_there_are_committed_results_to_check():
    names = {p.parent.parent.name for p in COMMITTED}
    assert {"main-cnn", "main-deep", "main-transformer", "toy-dynamics", "estimate-quality", "step-cost"} <= names


@pytest.mark.parametrize("results_json", COMMITTED, ids=lambda p: f"{p.parent.parent.name}-{p.parent.name}")
def test_every_committed_figure_has_data_in_every_panel_and_is_up_to_date(results_json, tmp_path, monkeypatch):
    with render_copy(results_json, tmp_path, monkeypatch) as (doc, figures):
        assert sorted(figures) == sorted(doc["plots"]) and figures
        for name, fig in figures.items():
            assert fig.axes, name
            assert not empty_axes(fig), (name, empty_axes(fig))
            title = fig._suptitle.get_text() if fig._suptitle else " ".join(ax.get_title() for ax in fig.axes)
            assert "?" in title, (name, title)  # titled with the question it answers
            assert (results_json.parent / name).exists()  # committed alongside
        # the committed table and results are what the code renders from them (regenerated)
        root = tmp_path / results_json.parent.parent.name / results_json.parent.name
        assert (root / "table.md").read_text() == (results_json.parent / "table.md").read_text()
        ours, committed = json.loads((root / "results.json").read_text()), json.loads(results_json.read_text())
        assert ours == committed


def test_docs_page_is_generated_from_the_committed_results(monkeypatch):
    monkeypatch.chdir(REPO)  # as `bpfree experiment docs` runs: paths relative to the repository
    page = docs.page("results", "docs/results.md")
    assert page == (REPO / "docs" / "results.md").read_text()
    # the published blocks come from the entries: main-deep's table row for VGG-16, generated
    assert "| cifar100 | vgg16 | 70.33 | 1.0 | 29.4 | 32.4 | 56.93 |" in page


MAIN = {"main-cnn": None, "main-deep": ["alexnet", "vgg16", "resnet20"], "main-transformer": ["macro", "micro"]}


@pytest.mark.parametrize("name", MAIN)
def test_main_figures_are_grouped_coloured_by_method_and_mark_the_published_values(name, tmp_path, monkeypatch):
    with render_copy(REPO / "results" / name / "quick" / "results.json", tmp_path, monkeypatch) as (doc, figures):
        ax = figures["metric.png"].axes[0]
        rows = doc["rows"]
        bars = [p for p in ax.patches if p.get_width() and p.get_height()]
        shared = [r for r in rows if name == "main-transformer" and r["variant"] == "bp"]  # a line across
        assert len(bars) == len(rows) - len(shared)
        # one colour per method, the shared map's: every method's bars, and only them, in its colour
        colours = {to_hex(b.get_facecolor()) for b in bars}
        assert colours == {plots.method_colour(r["method"]) for r in rows if r not in shared}
        # bars in row order: their heights are the rows' means in %, or the perplexity
        factor = 100.0 if doc["primary"] == "test_accuracy" else 1.0
        assert [b.get_height() for b in bars] == pytest.approx([r["mean"] * factor for r in rows if r not in shared])
        # error bars where there is a std (main-cnn: 2 seeds)
        if any(r["std"] for r in rows):
            assert ax.containers or ax.collections
        # a published marker (diamond) per row that has a published value, at that value
        marks = sorted(float(l.get_ydata()[0]) for l in ax.get_lines() if l.get_marker() == "D" and len(l.get_xdata()))
        expected = sorted(r["published"]["converted"] for r in rows if r["published"] and r not in shared)
        assert marks == pytest.approx(expected) and marks
        # grouped by model / feedback (main-cnn: one group, a bar per variant)
        ticks = [t.get_text() for t in ax.get_xticklabels()]
        assert ticks == (MAIN[name] or [r["variant"] for r in rows])
        assert ax.get_ylim()[0] == 0  # axis from zero
        if doc["primary"] == "test_accuracy":
            chance = [l for l in ax.get_lines() if l.get_gid() == "reference" and "chance" in l.get_label()]
            assert chance and chance[0].get_ydata()[0] == pytest.approx(10.0)  # 10 classes
        # the gap figure: ours as bars, published as markers, 0 = DFA and 1 = BP drawn
        gap = figures["gap.png"].axes[0]
        refs = sorted(l.get_ydata()[0] for l in gap.get_lines() if l.get_gid() == "reference")
        assert refs == [0.0, 1.0]
        heights = sorted(p.get_height() for p in gap.patches if p.get_width())
        assert heights == pytest.approx(sorted(r["gap_closed"] for r in rows if r["gap_closed"] is not None
                                               and r["label"] not in {x["reference"]["dfa"] for x in rows}))


def one_epoch_run(tmp_path: Path, method: str) -> Path:
    """A one-epoch run on the synthetic task: 4 steps, one diagnostics probe (at step 4)."""
    cfg = resolve({"run": {"dataset": "blobs-test", "model": "mlp", "epochs": 1, "batch_size": 64, "limit_train": 256,
                           "limit_test": 128, "lr": 0.01, "method": method, "diagnostics_every": 4},
                   "model": {"widths": [16, 16]}}, [])
    train(cfg, tmp_path / method, progress=False, overwrite=True)
    return tmp_path / method


def test_report_of_a_one_epoch_run_with_one_probe_draws_every_panel(tmp_path, monkeypatch):
    runs = [one_epoch_run(tmp_path, "grape"), one_epoch_run(tmp_path, "bp")]
    diag = [json.loads(l) for l in (runs[0] / "metrics.jsonl").read_text().splitlines() if '"diagnostics"' in l]
    assert len(diag) == 1  # the case that used to draw empty panels
    with capture(monkeypatch) as saved:
        assert cli.main(["report", str(runs[0]), str(runs[1]), "--out", str(tmp_path / "r.png")]) == 0
        (path, fig), = saved
        titles = [ax.get_title() for ax in fig.axes]
        assert titles[:3] == ["training loss per logged step", "test accuracy after each epoch",
                              "cos(weight gradients, BP's)"]
        assert len(titles) == 7  # + the four diagnostics panels GrAPE measures
        for ax in fig.axes:
            seen = visible_data(ax)
            assert seen["lines"] >= 1, ax.get_title()
            for line in ax.get_lines():
                if line.get_gid() != "reference" and len(line.get_xdata()) == 1:
                    assert line.get_marker() not in ("None", "", None) and line.get_markersize() > 0
        loss, metric = fig.axes[0], fig.axes[1]
        assert loss.get_yscale() == "linear" and loss.get_ylim()[0] == 0
        ticks = [t for t in metric.get_xticks() if metric.get_xlim()[0] <= t <= metric.get_xlim()[1]]
        assert ticks == [1.0]  # integer epoch ticks; the only epoch
        # the runs keep their method's colour
        grape_line = next(l for l in metric.get_lines() if l.get_label() == "grape")
        assert to_hex(grape_line.get_color()) == plots.method_colour("grape")


def test_report_smooths_the_loss_on_request(tmp_path, monkeypatch):
    run = one_epoch_run(tmp_path, "dfa")
    steps = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in l[:20]]
    with capture(monkeypatch) as saved:
        plot_runs([run], tmp_path / "r.png", smooth=3)
        (_, fig), = saved
        lines = [l for l in fig.axes[0].get_lines() if l.get_label() == "dfa (mean of 3)"]
        if len(steps) > 1:
            assert list(lines[0].get_ydata()) == pytest.approx(smoothed([s["loss"] for s in steps], 3))
    assert smoothed([3.0, 6.0, 9.0, 12.0], 2) == [3.0, 4.5, 7.5, 10.5]  # trailing means of up to 2 values


def test_curves_get_markers_when_they_have_few_points_and_skip_missing_values():
    plt = plots.pyplot()
    fig, ax = plt.subplots()
    one = plots.curve(ax, [1], [0.5])
    assert one.get_marker() == "o" and one.get_markersize() > 0
    gaps = plots.curve(ax, [1, 2, 3], [0.1, None, math.nan])
    assert list(gaps.get_xdata()) == [1]
    assert plots.curve(ax, [1, 2], [None, None]) is None
    many = plots.curve(ax, list(range(100)), [0.0] * 100)
    assert many.get_marker() in ("None", "", None)
    plt.close(fig)


def test_method_colours_are_shared_and_variants_keep_their_methods_colour():
    s = plots.styles([("dfa", "dfa"), ("dfa+calib", "dfa"), ("grape", "grape"), ("grape+calib", "grape")])
    assert s["dfa"].colour == s["dfa+calib"].colour == plots.METHOD_COLOURS["dfa"]
    assert s["grape+calib"].hatch == "//" and s["grape"].hatch == ""
    assert len({plots.method_colour(m) for m in plots.METHOD_COLOURS}) == len(plots.METHOD_COLOURS)
    assert plots.method_colour("some-new-method") == plots.method_colour("some-new-method")
