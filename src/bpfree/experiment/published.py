"""Published numbers: an experiment's ``published`` entries, checked when the file loads, set
against its table rows, and written out as Markdown.

An experiment file lists what it compares with as an array of inline tables, one per number or
statement::

    published = [
      { source = "grape-2026", dataset = "cifar10", model = "cnn", variant = "bp", metric = "test_accuracy", value = 74.66 },
      { source = "grape-2026", dataset = "cifar10", model = "cnn", variant = "grape", metric = "test_accuracy", value = 73.1 },
      { source = "grape-2025", dataset = "cifar100", model = "alexnet", variant = "grape (rescale)", metric = "test_accuracy", value = 40.43, setting = { batchnorm = true } },
      { source = "grape-2026", claim = "Calibrated variants are not reported for the shallow CNN." },
    ]
    published_compare = { source = "grape-2026", dataset = "cifar10" }

A number has ``source`` (a key of :data:`SOURCES`), ``variant`` (the experiment's row it is the
published counterpart of; a name no row has is listed, not compared), ``metric`` (a key of
:data:`METRICS`), ``value`` (a number, or ``[low, high]`` for a range) and optionally ``dataset``
and ``model`` (empty: not stated), ``setting`` (a table of the grid values it was measured at)
and ``note``. A statement has ``source`` and ``claim`` only (and optionally ``dataset``,
``model`` and ``note``). Values are as published: accuracy and error in %.

Comparison (:func:`match`): a table row is set against the numbers of the same variant whose
metric converts to the table's (accuracy from accuracy or 100 − error; perplexity from
perplexity) and whose ``dataset``, ``model`` and ``setting`` values equal the row's on every grid
key they name. ``published_compare`` then keeps the numbers whose fields equal its values on the
keys the grid does not set (at a quick scale, on another dataset than any published, it says
which published setting the rows stand for). Of those left, the most specific win: those naming
the most grid keys, and the fewest setting keys the grid does not vary. More than one number
left is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..options import OptionError


@dataclass(frozen=True)
class Source:
    """Where published numbers come from: ``title`` as cited; ``secondary`` when read in a
    third-party summary, not in the paper itself."""

    title: str
    secondary: bool = False

    def cite(self) -> str:
        return self.title + (" — secondary summary" if self.secondary else "")


SOURCES: dict[str, Source] = {
    "grape-2025": Source("Original GrAPE, \"Backpropagation-Free Learning through Gradient Aligned Feedbacks\" "
                         "(ICLR 2025 submission)"),
    "grape-2026": Source("Published GrAPE, \"Scaling Direct Feedback Learning with Jacobian Alignment "
                         "Guarantees\" (ICLR 2026)", secondary=True),
    "grape-2026-review": Source("Review discussion of the published GrAPE (ICLR 2026): reviewers and authors"),
    "grape": Source("GrAPE paper (figure as quoted; the version is not identified)"),
    "launay-2020": Source("Launay et al. 2020, \"Direct Feedback Alignment Scales to Modern Deep Learning Tasks "
                          "and Architectures\""),
    "biotorch": Source("BioTorch benchmarks (LeNet, SGD, 100 epochs)"),
    "pepita": Source("PEPITA (one hidden layer of 1024, CIFAR-10, 100 epochs)", secondary=True),
    "dkp": Source("Direct Kolen-Pollack (2 conv + 2 FC layers, CIFAR-10, 50 epochs)"),
    "df-lnpu": Source("DF-LNPU (KAIST), a pipelined DFA learning processor"),
}


@dataclass(frozen=True)
class Metric:
    """A published metric: ``label`` and ``unit`` as printed; ``higher``: higher is better."""

    label: str
    unit: str = ""
    higher: bool = True


METRICS: dict[str, Metric] = {
    "test_accuracy": Metric("test accuracy", "%"),
    "test_error": Metric("top-1 test error", "%", higher=False),
    "test_ppl": Metric("test perplexity", "", higher=False),
    "step_time_over_dfa": Metric("time per step over DFA's", "%", higher=False),
    "step_time_vs_bp": Metric("time per batch relative to BP's", "×", higher=False),
    "learning_speedup": Metric("learning speed-up", "×"),
}

# What a table's primary metric (``test_accuracy``, ``test_ppl``) can be compared with, and how a
# published value converts to the table's unit (accuracy in %).
CONVERT = {
    "test_accuracy": {"test_accuracy": lambda v: v, "test_error": lambda v: 100.0 - v},
    "test_ppl": {"test_ppl": lambda v: v},
}

NUMBER_KEYS = ("source", "dataset", "model", "variant", "metric", "value", "setting", "note")
CLAIM_KEYS = ("source", "claim", "dataset", "model", "note")


@dataclass(frozen=True)
class Entry:
    """One published number (``value`` not ``None``) or statement (``claim``)."""

    source: str
    variant: str = ""
    metric: str = ""
    value: float | tuple[float, float] | None = None
    dataset: str = ""
    model: str = ""
    setting: tuple[tuple[str, Any], ...] = ()
    note: str = ""
    claim: str = ""

    @property
    def is_number(self) -> bool:
        return self.value is not None

    def field(self, key: str) -> Any:
        """The entry's value for a grid key (``dataset``, ``model`` or a ``setting`` key), ``None`` if unnamed."""
        if key in ("dataset", "model"):
            return getattr(self, key) or None
        if key == "source":
            return self.source
        return dict(self.setting).get(key)

    def converted(self, primary: str) -> float | None:
        """The value in the unit of the table's primary metric (``None``: not comparable, or a range)."""
        conv = CONVERT.get(primary, {}).get(self.metric)
        if conv is None or not isinstance(self.value, (int, float)):
            return None
        return float(conv(self.value))

    def to_dict(self) -> dict[str, Any]:
        """The entry as written in the experiment file (empty fields left out)."""
        out: dict[str, Any] = {"source": self.source}
        if self.claim:
            out["claim"] = self.claim
        for key in ("dataset", "model", "variant", "metric"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.value is not None:
            out["value"] = list(self.value) if isinstance(self.value, tuple) else self.value
        if self.setting:
            out["setting"] = dict(self.setting)
        if self.note:
            out["note"] = self.note
        return out


def _fail(path: Path, where: str, text: str):
    raise OptionError(f"{path}: {where}: {text}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse(path: Path, raw: Any) -> list[Entry]:
    """The checked entries of an experiment file's ``published`` array (errors name the file and entry)."""
    if raw is None:
        return []
    if isinstance(raw, str):
        _fail(path, "published", "takes an array of entries (a table each: source, dataset, model, variant, metric, "
                                 "value; or source and claim), not Markdown text: see bpfree.experiment.published")
    if not isinstance(raw, list):
        _fail(path, "published", f"must be an array of tables, got {raw!r}")
    out: list[Entry] = []
    seen: dict[tuple, int] = {}
    for i, item in enumerate(raw):
        where = f"published[{i}]"
        if not isinstance(item, dict):
            _fail(path, where, f"must be a table, got {item!r}")
        source = item.get("source")
        if source not in SOURCES:
            _fail(path, f"{where}.source", f"must be one of {', '.join(SOURCES)}, got {source!r}")
        is_claim = "claim" in item
        allowed = CLAIM_KEYS if is_claim else NUMBER_KEYS
        unknown = sorted(set(item) - set(allowed))
        if unknown:
            kind = "a statement (claim)" if is_claim else "a number"
            _fail(path, f"{where}.{unknown[0]}", f"is not a key of {kind}; its keys: {', '.join(allowed)}")
        for key in ("claim", "dataset", "model", "variant", "metric", "note"):
            if key in item and not isinstance(item[key], str):
                _fail(path, f"{where}.{key}", f"must be a string, got {item[key]!r}")
        if is_claim:
            if not item["claim"].strip():
                _fail(path, f"{where}.claim", "must be a non-empty statement")
            out.append(Entry(source=source, claim=item["claim"].strip(), dataset=item.get("dataset", ""),
                             model=item.get("model", ""), note=item.get("note", "")))
            continue
        for key in ("variant", "metric", "value"):
            if key not in item:
                _fail(path, where, f"a number needs '{key}' (or give a 'claim' instead)")
        if not item["variant"].strip():
            _fail(path, f"{where}.variant", "must name the row (variant) the number belongs to")
        if item["metric"] not in METRICS:
            _fail(path, f"{where}.metric", f"must be one of {', '.join(METRICS)}, got {item['metric']!r}")
        value = item["value"]
        if isinstance(value, list):
            if len(value) != 2 or not all(_number(v) for v in value) or value[0] > value[1]:
                _fail(path, f"{where}.value", f"a range is [low, high] with low <= high, got {value!r}")
            value = (float(value[0]), float(value[1]))
        elif not _number(value):
            _fail(path, f"{where}.value", f"must be a number or [low, high], got {value!r}")
        else:
            value = float(value)
        setting = item.get("setting", {})
        if not isinstance(setting, dict) or any(isinstance(v, (dict, list)) for v in setting.values()):
            _fail(path, f"{where}.setting", f"must be a table of grid keys and scalar values, got {setting!r}")
        if set(setting) & {"dataset", "model", "source"}:
            _fail(path, f"{where}.setting", "dataset and model are keys of the entry itself, not of its setting")
        entry = Entry(source=source, variant=item["variant"], metric=item["metric"], value=value,
                      dataset=item.get("dataset", ""), model=item.get("model", ""),
                      setting=tuple(sorted(setting.items())), note=item.get("note", ""))
        key = (entry.source, entry.dataset, entry.model, entry.variant, entry.metric, entry.setting)
        if key in seen:
            _fail(path, where, f"gives the same number as published[{seen[key]}] (same source, dataset, model, "
                               "variant, metric and setting)")
        seen[key] = i
        out.append(entry)
    return out


def parse_compare(path: Path, raw: Any) -> dict[str, Any]:
    """The checked ``published_compare`` table: the published setting rows are set against."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or any(isinstance(v, (dict, list)) for v in raw.values()):
        _fail(path, "published_compare", f"must be a table of entry fields and scalar values, got {raw!r}")
    if "source" in raw and raw["source"] not in SOURCES:
        _fail(path, "published_compare.source", f"must be one of {', '.join(SOURCES)}, got {raw['source']!r}")
    if set(raw) & {"variant", "metric", "value", "note", "claim"}:
        _fail(path, "published_compare", "names a setting (source, dataset, model, grid keys), not a variant or value")
    return dict(raw)


def from_json(items: list[dict[str, Any]]) -> list[Entry]:
    """Entries back from ``results.json`` (as :meth:`Entry.to_dict` wrote them)."""
    return parse(Path("results.json"), items)


def _shown(value: Any) -> str:
    """A field value as grid values are written in labels (booleans lowercase, floats short)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def match(entries: list[Entry], compare: dict[str, Any], variant: str, grid: dict[str, str],
          primary: str, row: str = "") -> Entry | None:
    """The published number a row (``variant`` at grid point ``grid``) is set against, or ``None``.

    See the module docstring; ``row`` names the row in the error when several numbers fit.
    """
    found = [e for e in entries if e.is_number and e.variant == variant and e.converted(primary) is not None
             and all(_shown(e.field(k)) == v for k, v in grid.items() if e.field(k) is not None)]
    found = [e for e in found if all(_shown(e.field(k)) == _shown(v) for k, v in compare.items() if k not in grid)]
    named = {id(e): sum(e.field(k) is not None for k in grid) + sum(k not in grid for k, _ in e.setting) * -1
             for e in found}
    if found:  # the most specific: naming most grid keys (and no setting the grid does not vary)
        best = max(named.values())
        found = [e for e in found if named[id(e)] == best]
    if len(found) > 1:
        listing = "; ".join(f"{e.source} {e.dataset or '?'} {e.model or '?'} = {value_text(e)}" for e in found)
        raise OptionError(f"row {row or variant!r} fits several published numbers ({listing}): name the one to "
                          "compare with in published_compare (source, dataset, model)")
    return found[0] if found else None


def gap_closed(value: float | None, bp: float | None, dfa: float | None) -> float | None:
    """``(value − DFA) / (BP − DFA)``: 0 at DFA, 1 at BP, the same for lower-is-better metrics (the
    signs cancel); ``None`` when a value is missing or BP == DFA (undefined)."""
    if value is None or bp is None or dfa is None or bp == dfa:
        return None
    return (value - dfa) / (bp - dfa) + 0.0  # + 0.0: DFA's own row is 0, not -0 (lower-is-better metrics)


def number_text(value: float) -> str:
    """A published number in short form, whole numbers with one decimal: ``74.66``, ``52.0``."""
    text = f"{value:g}"
    return text if any(c in text for c in ".e") else text + ".0"


def value_text(entry: Entry) -> str:
    """The value as published: ``74.66``, ``15–20``."""
    if isinstance(entry.value, tuple):
        return f"{entry.value[0]:g}–{entry.value[1]:g}"
    return number_text(entry.value)


def setting_text(entry: Entry) -> str:
    """``dataset / model`` (and the setting) as far as stated: ``cifar100 / alexnet / batchnorm=true``."""
    parts = [p for p in (entry.dataset, entry.model) if p] + [f"{k}={_shown(v)}" for k, v in entry.setting]
    return " / ".join(parts)


def markdown(entries: list[Entry]) -> str:
    """The published numbers and statements as Markdown: per source, one table per metric (a row
    per dataset, model and setting, a column per variant), then the notes and statements."""
    lines: list[str] = []
    sources = list(dict.fromkeys(e.source for e in entries))
    for source in sources:
        mine = [e for e in entries if e.source == source]
        lines += [f"*{SOURCES[source].cite()}*", ""]
        numbers = [e for e in mine if e.is_number]
        for metric in dict.fromkeys(e.metric for e in numbers):
            group = [e for e in numbers if e.metric == metric]
            m = METRICS[metric]
            unit = f" ({m.unit})" if m.unit else ""
            lines += [f"{m.label}{unit}, {'higher' if m.higher else 'lower'} is better:", ""]
            keys = list(dict.fromkeys(k for e in group for k, _ in e.setting))
            variants = list(dict.fromkeys(e.variant for e in group))
            settings = list(dict.fromkeys((e.dataset, e.model, e.setting) for e in group))
            head = ["dataset", "model"] + keys + variants
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for dataset, model, setting in settings:
                cells = [dataset or "not stated", model or "not stated"]
                cells += [_shown(dict(setting)[k]) if k in dict(setting) else "–" for k in keys]
                for v in variants:
                    hit = [e for e in group if (e.dataset, e.model, e.setting, e.variant) == (dataset, model, setting, v)]
                    cells.append(value_text(hit[0]) if hit else "–")
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
            notes = [e for e in group if e.note]
            lines += [f"* {e.variant}{f' ({setting_text(e)})' if setting_text(e) else ''}: {e.note}" for e in notes]
            if notes:
                lines.append("")
        claims = [e for e in mine if not e.is_number]
        for e in claims:
            where = f" ({setting_text(e)})" if setting_text(e) else ""
            note = f" {e.note}" if e.note else ""
            lines.append(f"* {e.claim}{where}{note}")
        if claims:
            lines.append("")
    return "\n".join(lines).strip() + ("\n" if lines else "")


__all__ = ["CONVERT", "Entry", "METRICS", "Metric", "SOURCES", "Source", "from_json", "gap_closed", "markdown",
           "match", "number_text", "parse", "parse_compare", "value_text"]
