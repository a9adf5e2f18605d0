"""Published numbers as data: loading and checking, matching to table rows, the gap closed, the
generated Markdown, and train tables that show ours, published and the gap side by side."""

import json
import shutil
from pathlib import Path

import pytest

from bpfree import experiment
from bpfree.experiment import published as pub
from bpfree.options import OptionError

REPO = Path(__file__).resolve().parents[1]


def spec_of(name: str):
    return experiment.load_spec(REPO / "experiments" / f"{name}.toml")


def numbers(spec, **where):
    return {(e.dataset, e.model, e.variant): e.value for e in spec.published
            if e.is_number and all(getattr(e, k) == v for k, v in where.items())}


def test_every_shipped_experiment_gives_its_published_numbers_as_data():
    found = experiment.discover(REPO / "experiments")
    for name, path in found.items():
        spec = experiment.load_spec(path)
        assert spec.published, name  # every experiment says what it compares with (numbers or statements)
        assert all(e.source in pub.SOURCES for e in spec.published)
    # The published tables, as REFERENCE.md quotes them (values typed in the test, not read from the files).
    cnn = numbers(spec_of("main-cnn"), source="grape-2026")
    assert cnn == {(d, "cnn", v): x for d, row in {
        "mnist": (99.03, 98.7, 98.6, 98.8), "cifar10": (74.66, 71.05, 69.34, 73.1),
        "cifar100": (44.22, 35.0, 34.53, 38.0)}.items() for v, x in zip(("bp", "fa", "dfa", "grape"), row)}
    deep = numbers(spec_of("main-deep"), source="grape-2026")
    assert deep == {("cifar100", m, v): x for m, row in {
        "alexnet": (64.61, 42.59, 49.37, 45.45, 62.63), "vgg16": (70.33, 1.00, 29.40, 32.40, 56.93),
        "resnet20": (68.72, 20.94, 59.80, 24.28, 64.82), "resnet56": (71.42, 24.29, 62.43, 29.33, 66.92)}.items()
        for v, x in zip(("bp", "dfa", "dfa+calib", "grape", "grape+calib"), row)}
    lm = numbers(spec_of("main-transformer"), source="grape-2026")
    assert lm == {("wikitext103", "transformer", v): x for v, x in {
        "bp": 29.8, "dfa (macro)": 52.0, "dfa+calib (macro)": 42.7, "grape (macro)": 42.3, "grape+calib (macro)": 33.1,
        "dfa (micro)": 93.3, "dfa+calib (micro)": 78.8, "grape (micro)": 81.1, "grape+calib (micro)": 67.3}.items()}
    assert numbers(spec_of("main-transformer"), source="launay-2020") == {
        ("wikitext103", "transformer", "bp"): 29.8, ("wikitext103", "transformer", "dfa (macro)"): 52.0}
    biotorch = numbers(spec_of("main-cnn"), source="biotorch", metric="test_error")
    assert biotorch[("fashion-mnist", "lenet", "dfa")] == 12.81 and biotorch[("mnist", "lenet", "usf")] == 0.94
    assert len(biotorch) == 12
    sweep = numbers(spec_of("ablations"), source="grape-2025")
    assert {v: x for (_, _, v), x in sweep.items() if v.startswith("eta") or v == "grape (original)"} == {
        "eta 1e-4": 39.57, "eta 5e-4": 39.98, "grape (original)": 40.43, "eta 5e-3": 40.32, "eta 1e-2": 40.34,
        "eta 5e-2": 38.5}
    bn = {(dict(e.setting)["batchnorm"], e.variant): e.value for e in spec_of("ablation-batchnorm").published}
    assert bn == {(True, "grape (rescale)"): 40.43, (False, "grape (rescale)"): 34.7, (True, "dfa"): 29.75}
    cost = [e for e in spec_of("step-cost").published if e.metric == "step_time_over_dfa"]
    assert {e.source: e.value for e in cost} == {"grape-2025": (15.0, 20.0), "grape-2026-review": (6.0, 20.0)}


def test_the_published_block_is_generated_from_the_entries():
    text = pub.markdown(spec_of("main-deep").published)
    assert "| dataset | model | bp | dfa | dfa+calib | grape | grape+calib |" in text
    assert "| cifar100 | vgg16 | 70.33 | 1.0 | 29.4 | 32.4 | 56.93 |" in text
    assert "* PEPITA is not applicable to CNNs deeper than one conv layer." in text
    assert text.index("Published GrAPE") < text.index("Original GrAPE")  # sources in the file's order
    lm = pub.markdown(spec_of("main-transformer").published)
    assert "test perplexity, lower is better:" in lm
    assert "| wikitext103 | transformer | 29.8 | 52.0 | 42.7 | 42.3 | 33.1 | 93.3 | 78.8 | 81.1 | 67.3 |" in lm
    assert "15–20" in pub.markdown(spec_of("step-cost").published)
    # written to results.json and read back: the same entries
    entries = spec_of("main-cnn").published
    assert pub.from_json(json.loads(json.dumps([e.to_dict() for e in entries]))) == entries


BASE = """
title = "t"
kind = "train"
[base]
dataset = "blobs-test"
[scales.quick]
[[variants]]
name = "bp"
method = "bp"
"""


@pytest.mark.parametrize("entry, words", [
    ('{ source = "nobody", variant = "bp", metric = "test_accuracy", value = 1 }', ["published[0].source", "nobody"]),
    ('{ source = "grape-2025", variant = "bp", metric = "test_accuracy" }', ["published[0]", "needs 'value'"]),
    ('{ source = "grape-2025", variant = "bp", metric = "accuracy", value = 1 }', ["published[0].metric"]),
    ('{ source = "grape-2025", variant = "bp", metric = "test_error", value = [3, 2] }', ["published[0].value", "low <= high"]),
    ('{ source = "grape-2025", variant = "bp", metric = "test_error", value = "1" }', ["published[0].value"]),
    ('{ source = "grape-2025", variant = "bp", metric = "test_error", value = 1, epochs = 3 }', ["published[0].epochs"]),
    ('{ source = "grape-2025", claim = "x", value = 1 }', ["published[0].value", "statement"]),
    ('{ source = "grape-2025", variant = "bp", metric = "test_error", value = 1, setting = { model = "x" } }',
     ["published[0].setting"]),
    ('{ source = "grape-2025", variant = "bp", metric = "test_error", value = 1 },\n'
     '{ source = "grape-2025", variant = "bp", metric = "test_error", value = 2 }', ["published[1]", "published[0]"]),
])
def test_a_bad_published_entry_is_an_error_naming_the_file_and_the_entry(tmp_path, entry, words):
    path = tmp_path / "bad.toml"
    path.write_text(f"published = [\n{entry}\n]\n" + BASE)
    with pytest.raises(OptionError) as err:
        experiment.load_spec(path)
    for w in ["bad.toml", *words]:
        assert w in str(err.value)


def test_markdown_text_is_refused_where_entries_are_expected(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text('published = "| BP | 99 |"\n' + BASE)
    with pytest.raises(OptionError, match="not Markdown text"):
        experiment.load_spec(path)


def entry(variant, value, dataset="cifar10", model="cnn", source="grape-2026", metric="test_accuracy", **setting):
    return pub.Entry(source=source, variant=variant, metric=metric, value=value, dataset=dataset, model=model,
                     setting=tuple(sorted(setting.items())))


def test_a_row_meets_the_number_of_its_variant_grid_point_and_compared_setting():
    entries = [entry("dfa", 69.34), entry("dfa", 34.53, dataset="cifar100"), entry("dfa", 98.6, dataset="mnist"),
               entry("dfa", 12.81, dataset="fashion-mnist", model="lenet", source="biotorch", metric="test_error"),
               entry("grape", 40.43, model="alexnet", source="grape-2025", batchnorm=True),
               entry("grape", 34.7, model="alexnet", source="grape-2025", batchnorm=False)]
    # the dataset is a grid key: each grid point gets its own dataset's number
    assert pub.match(entries, {}, "dfa", {"dataset": "cifar100"}, "test_accuracy").value == 34.53
    # not a grid key: several fit, and published_compare picks one...
    assert pub.match(entries, {"source": "grape-2026", "dataset": "cifar10"}, "dfa", {}, "test_accuracy").value == 69.34
    # ...or it is an error that names the row
    with pytest.raises(OptionError, match="row 'dfa, x=1' fits several published numbers"):
        pub.match(entries, {}, "dfa", {}, "test_accuracy", row="dfa, x=1")
    # an error rate is compared as accuracy: 100 - 12.81
    hit = pub.match(entries, {"source": "biotorch"}, "dfa", {"dataset": "fashion-mnist"}, "test_accuracy")
    assert hit.converted("test_accuracy") == pytest.approx(87.19, abs=1e-12)
    # accuracy is not a perplexity: nothing to compare
    assert pub.match(entries, {"dataset": "cifar10"}, "dfa", {}, "test_ppl") is None
    # a setting key that is a grid key selects (grid values are compared as written in labels)
    assert pub.match(entries, {}, "grape", {"batchnorm": "false"}, "test_accuracy").value == 34.7
    # an entry naming the grid value beats one that names none
    plain = entry("grape", 45.0, model="alexnet", source="grape-2025")
    assert pub.match(entries + [plain], {}, "grape", {"batchnorm": "true"}, "test_accuracy").value == 40.43
    assert pub.match(entries + [plain], {}, "grape", {}, "test_accuracy").value == 45.0
    assert pub.match(entries, {}, "nope", {}, "test_accuracy") is None


def test_gap_closed_is_the_fraction_of_the_dfa_to_bp_distance():
    # main-deep, AlexNet: BP 84.5, DFA 76.4, GrAPE 80.3 -> 3.9 / 8.1; published 45.45 vs 42.59 and 64.61
    assert pub.gap_closed(80.3, 84.5, 76.4) == pytest.approx(3.9 / 8.1)
    assert pub.gap_closed(45.45, 64.61, 42.59) == pytest.approx(2.86 / 22.02)
    # perplexity, lower is better: GrAPE 42.3 against DFA 52.0 and BP 29.8 closes 9.7 / 22.2 of the gap
    assert pub.gap_closed(42.3, 29.8, 52.0) == pytest.approx(9.7 / 22.2)
    assert pub.gap_closed(60.0, 84.5, 76.4) == pytest.approx(-16.4 / 8.1)  # worse than DFA: negative
    assert str(pub.gap_closed(52.0, 29.8, 52.0)) == "0.0"  # DFA's own row: 0, not -0
    assert pub.gap_closed(70.0, 50.0, 50.0) is None  # BP == DFA: undefined
    assert pub.gap_closed(None, 50.0, 40.0) is None


TRAIN = """
title = "gaps"
kind = "train"
questions = ["main"]
description = "BP, DFA and GrAPE at two widths"
published = [
  { source = "grape-2026", dataset = "cifar10", variant = "bp",    metric = "test_accuracy", value = 74.66 },
  { source = "grape-2026", dataset = "cifar10", variant = "dfa",   metric = "test_accuracy", value = 69.34 },
  { source = "grape-2026", dataset = "cifar10", variant = "grape", metric = "test_accuracy", value = 73.1 },
  { source = "grape-2026", dataset = "cifar10", variant = "grape", metric = "test_accuracy", value = 60.0, setting = { widths = "4" } },
  { source = "biotorch", dataset = "fashion-mnist", variant = "bp", metric = "test_error", value = 9.2 },
]
published_compare = { source = "grape-2026" }
[base]
dataset = "blobs-test"
epochs = 1
batch_size = 64
limit_train = 256
limit_test = 128
lr = 0.01
[grid]
widths = [[8], [4]]
[scales.quick]
assumed = "tiny"
[[variants]]
name = "bp"
method = "bp"
[[variants]]
name = "dfa"
method = "dfa"
[[variants]]
name = "grape"
method = "grape"
"""


def test_train_table_shows_ours_published_and_the_gap_closed_and_renders_again_from_results_json(tmp_path):
    text = TRAIN
    path = tmp_path / "experiments" / "gaps.toml"
    path.parent.mkdir()
    path.write_text(text)
    spec = experiment.load_spec(path)
    out = tmp_path / "results"
    doc = experiment.run(spec, "quick", out=out, progress=False, echo=lambda s: None)
    root = out / "gaps" / "quick"
    acc = {}
    for row in doc["rows"]:
        s = json.loads((root / "runs" / experiment.common.slug(row["label"]) / "seed0" / "summary.json").read_text())
        acc[(row["variant"], row["widths"])] = 100 * s["test_accuracy"]
    table = (root / "table.md").read_text()
    assert "| widths | variant | method | test accuracy (%) | published | gap closed | gap closed (published) |" in table
    for w in ("8", "4"):
        bp, dfa, grape = (acc[(v, w)] for v in ("bp", "dfa", "grape"))
        gap = "undefined (BP = DFA)" if bp == dfa else f"{(grape - dfa) / (bp - dfa):.2f}"
        # grape's published value: at widths 4 the entry naming that grid value (the more specific one),
        # elsewhere the plain one; the published gap needs BP and DFA numbers of the same setting
        published, pub_gap = ("60.0", "–") if w == "4" else ("73.1", f"{(73.1 - 69.34) / (74.66 - 69.34):.2f}")
        assert f"| {w} | grape | grape | {grape:.2f} | {published} | {gap} | {pub_gap} |" in table
        assert f"| {w} | bp | bp | {bp:.2f} | 74.66 | – | – |" in table  # BP: not a direct-feedback row
        row = next(r for r in doc["rows"] if r["label"] == f"grape, widths={w}")
        assert row["reference"] == {"bp": f"bp, widths={w}", "dfa": f"dfa, widths={w}"}
    assert "biotorch" not in table  # published_compare keeps the grape-2026 numbers
    saved = json.loads((root / "results.json").read_text())
    assert saved["published"][0] == {"source": "grape-2026", "dataset": "cifar10", "variant": "bp",
                                     "metric": "test_accuracy", "value": 74.66}
    assert {r["label"]: r["gap_closed"] for r in saved["rows"]}["dfa, widths=8"] == 0.0
    assert sorted(saved["plots"]) == ["gap.png", "metric.png"]

    # render: the same table and figures from results.json alone (no runs/, nothing trained)
    shutil.rmtree(root / "runs")
    for f in ("table.md", "metric.png", "gap.png"):
        (root / f).unlink()
    again = experiment.render(spec, "quick", out=out, echo=lambda s: None)
    assert (root / "table.md").read_text() == table
    assert (root / "metric.png").exists() and (root / "gap.png").exists()
    first = json.loads((root / "results.json").read_text())
    experiment.render(spec, "quick", out=out, echo=lambda s: None)
    assert json.loads((root / "results.json").read_text()) == first == json.loads(json.dumps(again))
    # a changed published number is taken from the file on the next render
    path.write_text(text.replace("value = 73.1", "value = 72.0"))
    experiment.render(experiment.load_spec(path), "quick", out=out, echo=lambda s: None)
    assert "| 72.0 |" in (root / "table.md").read_text()
