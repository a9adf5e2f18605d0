"""Your own model from the command line (bpfree.models.factory): py:FILE.py:FACTORY and module.path:FACTORY.

Factory files are written here. Expected: the factory's keyword parameters become typed options
(the values it receives are the ones given as strings, converted by the declared or default type);
a plain nn.Sequential gets a point after each hidden non-linearity (bpfree.attach's rule); a custom
module without points trains under BP, FA and sign symmetry and is refused by the DFA family with
one line; every broken file is a one-line error naming it; a changed file stops --resume. Then bp,
dfa and grape train through the CLI on each local dataset kind, generated here.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from _cli import assert_one_line_error, run_cli
from bpfree import FeedbackPoint, models
from bpfree.options import OptionError
from bpfree.points import NONLINEARITIES
from bpfree.train.config import resolve

FACTORIES = '''
import torch
from torch import nn
import bpfree

SEEN = []


def flat(input_shape, n_outputs, hidden=8, scale: float = 1.0, act="tanh", widths=(4, 4), bias=True,
         layer=nn.Linear, *, depth):
    SEEN.append(dict(hidden=hidden, scale=scale, act=act, widths=widths, bias=bias, layer=layer, depth=depth))
    n = 1
    for s in input_shape:
        n *= s
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU}
    layers = [nn.Flatten(), layer(n, hidden, bias=bias), acts[act]()]
    for _ in range(depth - 1):
        layers += [nn.Linear(hidden, hidden), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(hidden, n_outputs))


class NoPoints(nn.Module):
    def __init__(self, input_shape, n_outputs, width: int = 8):
        super().__init__()
        n = 1
        for s in input_shape:
            n *= s
        self.a, self.b = nn.Linear(n, width), nn.Linear(width, n_outputs)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x.flatten(1))))


class WithPoints(NoPoints):
    def __init__(self, input_shape, n_outputs, width: int = 8):
        super().__init__(input_shape, n_outputs, width)
        self.point = bpfree.FeedbackPoint()

    def forward(self, x):
        return self.b(self.point(torch.tanh(self.a(x.flatten(1)))))


class TinyLM(nn.Module):
    """Tokens (batch, T) -> logits (batch, T, vocabulary), one feedback point per token."""

    def __init__(self, input_shape, n_outputs, d=8):
        super().__init__()
        self.embed, self.mix, self.point = nn.Embedding(n_outputs, d), nn.Linear(d, d), bpfree.FeedbackPoint()
        self.out = nn.Linear(d, n_outputs)

    def forward(self, x):
        return self.out(self.point(torch.tanh(self.mix(self.embed(x)))))
'''


@pytest.fixture
def zoo(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(FACTORIES)
    return path


def test_keyword_parameters_become_typed_options(zoo):
    name = f"py:{zoo}:flat"
    cfg = resolve({"run": {"model": name, "dataset": "blobs-test"}},
                  ["hidden=16", "scale=2", "act=relu", "widths=3,5", "bias=false", "depth=2"])
    assert cfg.model == {"hidden": 16, "scale": 2.0, "act": "relu", "widths": [3, 5], "bias": False, "depth": 2,
                         "file": str(zoo), "sha256": hashlib.sha256(zoo.read_bytes()).hexdigest()}
    model = models.create(name, (16,), 4, **cfg.model)
    module = next(m for m in __import__("sys").modules.values() if getattr(m, "__file__", None) == str(zoo))
    seen = module.SEEN[-1]
    assert seen == {"hidden": 16, "scale": 2.0, "act": "relu", "widths": (3, 5), "bias": False, "layer": nn.Linear,
                    "depth": 2}
    assert model[1].bias is None and model[1].out_features == 16
    with pytest.raises(OptionError, match="option 'depth' is required"):
        resolve({"run": {"model": name, "dataset": "blobs-test"}})
    with pytest.raises(OptionError, match="unknown option 'layer'"):  # a class default is the factory's own
        resolve({"run": {"model": name, "dataset": "blobs-test"}}, ["depth=1", "layer=x"])
    with pytest.raises(OptionError, match="'hidden' takes an integer"):
        resolve({"run": {"model": name, "dataset": "blobs-test"}}, ["depth=1", "hidden=wide"])


def test_a_plain_sequential_gets_a_point_after_each_hidden_nonlinearity(zoo):
    model = models.create(f"py:{zoo}:flat", (16,), 4, depth=3, act="tanh")
    layers = list(model)
    after = [type(layers[i - 1]) for i, m in enumerate(layers) if isinstance(m, FeedbackPoint)]
    assert after == [nn.Tanh, nn.ReLU, nn.ReLU]  # every hidden non-linearity, none after the output
    assert sum(isinstance(m, NONLINEARITIES) for m in layers) == 3


COMMON = ["--dataset", "blobs-test", "--limit-train", "64", "--limit-test", "32", "--epochs", "1",
          "--batch-size", "32", "--no-progress"]


@pytest.mark.parametrize("method", ["bp", "fa", "usf", "dfa", "grape", "dkp", "drtp"])
def test_a_custom_module_without_points_trains_under_bp_fa_sign_symmetry_and_is_refused_by_dfa(zoo, tmp_path,
                                                                                               method):
    rc, _, err = run_cli("train", "--method", method, "--model", f"py:{zoo}:NoPoints", *COMMON,
                         "--out", tmp_path / "run")
    if method in ("bp", "fa", "usf"):
        assert rc == 0, err
    else:
        assert_one_line_error(rc, err, f"method {method!r} needs feedback points", "bpfree.FeedbackPoint")
    if method in ("dfa", "grape"):
        rc, _, err = run_cli("train", "--method", method, "--model", f"py:{zoo}:WithPoints", *COMMON,
                             "--out", tmp_path / "with")
        assert rc == 0, err


def test_module_path_factory_records_the_module_file(tmp_path, monkeypatch):
    (tmp_path / "bpfree_test_factory_mod.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = resolve({"run": {"model": "bpfree_test_factory_mod:WithPoints", "dataset": "blobs-test"}}, ["width=5"])
    path = tmp_path / "bpfree_test_factory_mod.py"
    assert cfg.model == {"width": 5, "file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    rc, _, err = run_cli("train", "--method", "dfa", "--model", "bpfree_test_factory_mod:WithPoints", *COMMON,
                         "--out", tmp_path / "run")
    assert rc == 0, err


def test_a_factory_file_can_import_its_neighbours(tmp_path):
    (tmp_path / "bpfree_test_neighbour.py").write_text("WIDTH = 3\n")
    (tmp_path / "net.py").write_text(textwrap.dedent("""
        from torch import nn
        from bpfree_test_neighbour import WIDTH

        def build(input_shape, n_outputs):
            return nn.Sequential(nn.Linear(input_shape[0], WIDTH), nn.ReLU(), nn.Linear(WIDTH, n_outputs))
    """))
    model = models.create(f"py:{tmp_path / 'net.py'}:build", (16,), 4)
    assert model[0].out_features == 3


BROKEN = {
    "syntax error": ("def build(:\n", "build", ["is not valid Python", "SyntaxError"]),
    "raises when run": ("x = 1 / 0\n", "build", ["failed while it ran", "ZeroDivisionError"]),
    "no such factory": ("def other(a, b):\n    pass\n", "build", ["defines no 'build'", "other"]),
    "not callable": ("build = 3\n", "build", ["'build' is a int, not a function or class"]),
    "not a module": ("def build(shape, n):\n    return 42\n", "build", ["returned int, not an nn.Module"]),
    "factory raises": ("def build(shape, n):\n    raise RuntimeError('boom')\n", "build",
                       ["the factory failed", "RuntimeError: boom"]),
    "one parameter": ("def build(shape):\n    pass\n", "build", ["must take (input_shape, n_outputs"]),
    "recorded name": ("def build(shape, n, file='x'):\n    pass\n", "build", ["'file' clashes"]),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_factory_files_get_one_line_errors(tmp_path, case):
    source, factory, words = BROKEN[case]
    path = tmp_path / f"broken_{case.replace(' ', '_')}.py"
    path.write_text(source)
    rc, _, err = run_cli("train", "--model", f"py:{path}:{factory}", *COMMON, "--out", tmp_path / "run")
    assert_one_line_error(rc, err, str(path), *words)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model,words", [
    ("py:/nonexistent/net.py:build", ["/nonexistent/net.py does not exist"]),
    ("py:net.py", ["write py:FILE.py:FACTORY"]),
    ("bpfree_no_such_module_zz:build", ["importing bpfree_no_such_module_zz failed", "ModuleNotFoundError"]),
    ("no:such:thing", ["unknown model 'no:such:thing'", "py:FILE.py:FACTORY"]),
])
def test_bad_factory_names_get_one_line_errors(tmp_path, model, words):
    assert_one_line_error(*run_cli("train", "--model", model, *COMMON, "--out", tmp_path / "r")[::2], *words)


def test_resume_refuses_a_changed_factory_file(zoo, tmp_path):
    out = tmp_path / "run"
    rc, _, err = run_cli("train", "--method", "dfa", "--model", f"py:{zoo}:flat", "--set", "depth=1", *COMMON,
                         "--out", out)
    assert rc == 0, err
    digest = hashlib.sha256(zoo.read_bytes()).hexdigest()
    assert f'sha256 = "{digest}"' in (out / "config.toml").read_text()
    original, marker = zoo.read_text(), tmp_path / "ran"
    zoo.write_text(original + f"\nopen({str(marker)!r}, 'w').close()\n")  # an edit that would leave a mark
    rc, _, err = run_cli("train", "--resume", out, "--no-progress")
    assert_one_line_error(rc, err, f"the model file {zoo} changed", digest, "was not run")
    assert not marker.exists()  # refused before the changed file ran
    zoo.write_text(original)
    assert run_cli("train", "--resume", out, "--no-progress")[0] == 0


# --------------------------------------------------------------------------- bp, dfa, grape on each kind


def _datasets(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    np.savez(root / "d.npz", x=x, y=(x[:, 0] > 0).astype(np.int64))
    for c in range(3):
        (root / "imgs" / str(c)).mkdir(parents=True)
        for i in range(12):
            Image.fromarray(rng.integers(60 * c, 60 * c + 80, (6, 6), dtype=np.uint8)).save(root / "imgs" / str(c) / f"{i}.png")
    words = ["ab", "cd", "ef", "gh", "ij"]
    (root / "c.txt").write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(120)) + "\n")
    return {"npz": f"npz:{root / 'd.npz'}", "images": f"images:{root / 'imgs'}", "text": f"text:{root / 'c.txt'}"}


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    (root / "my_models.py").write_text(FACTORIES)
    return root, _datasets(root)


@pytest.mark.parametrize("kind", ["npz", "images", "text"])
@pytest.mark.parametrize("method", ["bp", "dfa", "grape"])
def test_bp_dfa_grape_train_a_factory_model_on_each_local_dataset_through_the_cli(datasets, tmp_path, kind, method):
    root, names = datasets
    factory = f"py:{root / 'my_models.py'}:" + ("TinyLM" if kind == "text" else "flat")
    sets = ["context=8"] if kind == "text" else ["depth=1", "test_fraction=0.25"]
    rc, out, err = run_cli("train", "--method", method, "--dataset", names[kind], "--model", factory,
                           *[a for s in sets for a in ("--set", s)], "--epochs", "1", "--batch-size", "16",
                           "--no-progress", "--data-dir", root / "cache", "--out", tmp_path / "run")
    assert rc == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"] == names[kind] and summary["model"] == factory and summary["steps"] >= 2
    metric = summary["primary"]
    assert metric == ("test_ppl" if kind == "text" else "test_accuracy") and np.isfinite(summary[metric])
