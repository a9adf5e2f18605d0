"""The training loop, run directories, resume, configuration and the CLI (on a synthetic task)."""

import json
import tomllib
from dataclasses import dataclass

import pytest
import torch

import bpfree
from bpfree import cli
from bpfree.methods import register
from bpfree.methods.base import Method, StepResult
from bpfree.options import OptionError, option
from bpfree.train.config import resolve
from bpfree.train.loop import Run, TrainingError, resume, train


def cfg(**over):
    sets = [f"{k}={v}" for k, v in over.items()]
    return resolve({"run": {"dataset": "blobs-test", "model": "mlp", "epochs": 2, "batch_size": 32,
                            "limit_train": 256, "limit_test": 128, "lr": 0.01}, "model": {"widths": [16, 16]}}, sets)


@register
class SignSGD(Method):
    """A method the loop has never heard of: grad = sign of the BP gradient times ``gain``."""

    name = "test-signsgd"
    summary = "test-only dummy method"

    @dataclass
    class Options:
        gain: float = option(1.0, "gradient scale")

    def step(self, x, y, loss_fn):
        out = self.model(x)
        loss = loss_fn(out, y)
        grads = torch.autograd.grad(loss, list(self.model.parameters()))
        for p, g in zip(self.model.parameters(), grads):
            p.grad = torch.sign(g) * self.options.gain
        return StepResult(loss.detach(), out.detach(), {"calls": 1.0})


def test_a_new_method_plugs_into_the_unchanged_loop(tmp_path):
    summary = train(cfg(method="test-signsgd", gain=0.5, lr=0.01, optimizer="sgd"), tmp_path, progress=False)
    assert summary["method"] == "test-signsgd" and summary["test_accuracy"] > 0.5
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(l["kind"] == "step" and l["calls"] == 1.0 for l in lines)


def test_loop_source_has_no_method_branches():
    import inspect

    from bpfree.train import loop

    src = inspect.getsource(loop)
    for name in bpfree.methods.available():
        assert f'"{name}"' not in src and f"'{name}'" not in src


@pytest.mark.parametrize("method", ["bp", "dfa", "grape"])
def test_run_directory_contents(tmp_path, method):
    torch.set_num_threads(2)  # recorded in the summary; conftest sets 1 again after the test
    summary = train(cfg(method=method), tmp_path, progress=False)
    for key in ("method", "model", "dataset", "epochs", "test_accuracy", "train_seconds"):
        assert key in summary
    assert summary["test_accuracy"] > 0.6  # four clusters: chance is 0.25
    assert summary["threads"] == 2
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["test_accuracy"] == summary["test_accuracy"]
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["run"]["method"] == method and config["model"]["widths"] == [16, 16]
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    epochs = [l for l in lines if l["kind"] == "epoch"]
    assert [l["epoch"] for l in epochs] == [1, 2]
    assert (tmp_path / "checkpoint.pt").exists()
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("method", ["bp", "grape"])
def test_resumed_run_ends_with_the_same_weights(tmp_path, method):
    c = cfg(method=method, checkpoint_every=3, log_every=2)
    full = Run(c, tmp_path / "full", progress=False)
    full.fit()
    # interrupted run: stop after 11 steps (mid epoch 2) by raising from the optimizer
    part = Run(c, tmp_path / "part", progress=False)
    real_step, calls = part.optimizer.step, [0]

    def step(*a, **k):
        calls[0] += 1
        if calls[0] > 11:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    part.optimizer.step = step
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    summary = resume(tmp_path / "part", progress=False)
    resumed = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for k, v in full.model.state_dict().items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0)
    a = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    strip = lambda ls: [{k: v for k, v in json.loads(l).items() if k != "train_seconds"} for l in ls]
    assert strip(a) == strip(b)
    assert summary["steps"] == 16


@register
class Diverging(Method):
    """BP whose loss turns NaN from the fifth step on (the weights stay finite)."""

    name = "test-diverging"

    def step(self, x, y, loss_fn):
        self.calls = getattr(self, "calls", 0) + 1
        out = self.model(x)
        loss = loss_fn(out, y)
        loss.backward()
        return StepResult(loss.detach() * (float("nan") if self.calls >= 5 else 1.0), out.detach())


def test_nonfinite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(tmp_path):
    c = cfg(method="test-diverging", log_every=1, checkpoint_every=2)
    with pytest.raises(TrainingError, match="the loss became nan at step 5"):
        train(c, tmp_path, progress=False)
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ck["state"]["global_step"] == 4


def test_config_errors_name_the_key():
    with pytest.raises(OptionError, match="unknown option 'withs'.*model: activation, bias, widths"):
        cfg(withs="3")
    with pytest.raises(OptionError, match="option 'epochs' takes an integer"):
        cfg(epochs="many")
    with pytest.raises(ValueError, match="unknown dataset 'cifar-1'"):
        resolve({"run": {"dataset": "cifar-1"}})
    with pytest.raises(OptionError, match="KEY=VALUE"):
        resolve({}, ["widths"])
    c = cfg(**{"model.widths": "8,8", "rule": "cosine", "method": "grape"})
    assert c.model["widths"] == [8, 8] and c.method["rule"] == "cosine"


def test_unwritable_out_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(TrainingError, match="cannot write to the run directory"):
        train(cfg(method="bp"), blocker / "run", progress=False)


def test_cli_train_compare_and_errors(tmp_path, capsys):
    common = ["--dataset", "blobs-test", "--limit-train", "128", "--limit-test", "64", "--epochs", "1",
              "--set", "widths=8", "--no-progress"]
    assert cli.main(["compare", "--methods", "bp,dfa,grape", "--out", str(tmp_path / "c"), *common]) == 0
    out = capsys.readouterr().out
    for m in ("bp", "dfa", "grape"):
        assert f"| {m} | " in out
    rows = [l for l in (tmp_path / "c" / "compare.md").read_text().splitlines() if l.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows] == ["| method", "| bp", "| dfa", "| grape"]
    assert cli.main(["train", "--method", "dfa", "--out", str(tmp_path / "t"), *common]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(tmp_path / "t"), "--no-progress"]) == 0
    assert cli.main(["train", "--method", "dfa", "--set", "bogus=1", *common]) == 2
    err = capsys.readouterr().err
    assert "unknown option 'bogus'" in err and "widths" in err
    assert cli.main(["compare", "--methods", "bp,nope", *common]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert cli.main(["list", "methods"]) == 0
    assert "rescale" in capsys.readouterr().out


def test_cli_run_flags_come_from_the_run_options():
    import dataclasses
    import typing

    from bpfree.train.config import RunOptions

    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    hints = typing.get_type_hints(RunOptions)
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command").choices
    for command, names in [("train", cli.RUN_FLAGS + ("method", "amp", "pipeline")),
                           ("compare", cli.RUN_FLAGS + ("amp", "pipeline")), ("bench", cli.RUN_FLAGS + ("pipeline",))]:
        flags = {a.dest: a for a in sub[command]._actions if a.dest in fields}
        assert set(flags) == set(names), command  # the other run options go through --set
        for name, action in flags.items():
            f = fields[name]
            assert action.option_strings == ["--" + name.replace("_", "-")]
            assert action.help == f.metadata["help"] and action.default is None
            assert action.choices == f.metadata["choices"]
            assert action.type is (hints[name] if hints[name] in (int, float) else None)
    args = cli.build_parser().parse_args(["train", "--batch-size", "7", "--lr", "0.5", "--limit-test", "3"])
    assert (args.batch_size, args.lr, args.limit_test) == (7, 0.5, 3)
    assert cli._overrides(args) == {"batch_size": 7, "lr": 0.5, "limit_test": 3}


@pytest.mark.parametrize("method", ["dfa", "grape", "test-signsgd"])
def test_diagnostics_leave_training_bit_identical(tmp_path, method):
    plain = Run(cfg(method=method, log_every=4), tmp_path / "a", progress=False)
    plain.fit()
    probed = Run(cfg(method=method, log_every=4, diagnostics_every=3, probe_size=64), tmp_path / "b", progress=False)
    probed.fit()
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(probed.model.state_dict()[k], v, rtol=0, atol=0)
    for k, v in plain.method.state_dict().items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                if isinstance(vv, torch.Tensor):
                    torch.testing.assert_close(probed.method.state_dict()[k][kk], vv, rtol=0, atol=0)
    lines = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    diag = [l for l in lines if l["kind"] == "diagnostics"]
    assert [d["step"] for d in diag] == [3, 6, 9, 12, 15]
    assert all(-1 <= d["weight_grad_cos"] <= 1 for d in diag)
    if method != "test-signsgd":
        assert {"signal_cos/3", "b_jacobian_cos/3", "b_jacobian_unit_cos/6"} <= set(diag[0])
