"""Written for CUDA, shown on the CPU: what a GPU run depends on, checked without a GPU.

Expected values come from CUDA's semantics and from what the code is meant to do:

* Host synchronisation. On CUDA, reading a value on the host (``.item()``, ``float(t)``, ``int(t)``,
  ``bool(t)``, ``.tolist()``, ``.cpu()``, ``.numpy()``) waits for every queued kernel, and so does
  a blocking copy from the host (``t.to(device)``, ``torch.tensor(..., device=...)`` of host data).
  The test patches exactly those entry points and counts their calls inside the hot path of the
  training loop (taking a batch, the step, the epoch sums, the non-finite watch): zero for BP,
  DFA, GrAPE, DRTP and DKP on an MLP, GrAPE and DFA on the Transformer, and a CNN on augmented
  CIFAR-shaped data; a logged step line costs exactly two copies (the watch's and one for all
  figures).
* The run options tf32, cudnn_benchmark and deterministic set torch's switches to the values
  their documentation names, inside the run only, and summary.json records them with the versions.
* DKP's feedback update under bfloat16 autocast equals the float32 formula computed by hand.
* A CUDA step's code path (CUDA events timing groups of steps, ``set_device`` for ``cuda:N``) is
  driven by stand-ins for ``torch.cuda`` functions that record what they are asked.
"""

from __future__ import annotations

import json
import traceback

import pytest
import torch
import torch.nn.functional as F

import conftest  # noqa: F401  (registers blobs-test)
from bpfree import bench, methods, models
from bpfree.train import backends
from bpfree.train.config import resolve
from bpfree.train.loop import Run, TrainingError

SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class SyncCounter:
    """Counts host reads and host-to-device copies while :attr:`on` (with where they happened)."""

    def __init__(self, monkeypatch) -> None:
        self.on, self.seen = False, []
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))
        real_to, real_tensor = torch.Tensor.to, torch.tensor

        def to(t, *args, **kwargs):
            if any(isinstance(a, (torch.device, str)) for a in args) or kwargs.get("device") is not None:
                self._note("to(device)")
            return real_to(t, *args, **kwargs)

        def tensor(*args, **kwargs):
            if kwargs.get("device") is not None:
                self._note("torch.tensor(device=)")
            return real_tensor(*args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)
        monkeypatch.setattr(torch, "tensor", tensor)

    def _note(self, what: str) -> None:
        if self.on:
            where = [f"{f.filename.split('/src/')[-1]}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]
                     if "/bpfree/" in f.filename]
            self.seen.append((what, where[-1] if where else "?"))

    def _counted(self, name, real):
        def wrapper(t, *args, **kwargs):
            self._note(name)
            return real(t, *args, **kwargs)
        return wrapper

    def counting(self, fn):
        def wrapped(*args, **kwargs):
            was, self.on = self.on, True
            try:
                return fn(*args, **kwargs)
            finally:
                self.on = was
        return wrapped


def hot_path_syncs(monkeypatch, tmp_path, cfg, skip: int = 1):
    """Syncs in the steps after the first ``skip`` (lazy set-up: B_l, GrAPE's first norm), and per log line."""
    run = Run(cfg, tmp_path, progress=False)
    counter = SyncCounter(monkeypatch)
    steps = [0]
    real_step = run._step

    def step(*args):
        steps[0] += 1
        counter.on = steps[0] > skip
        try:
            return real_step(*args)
        finally:
            counter.on = False

    per_step: list = []
    for obj, name in ((run.task, "train_batch"), (run.task, "batch_stats"), (run.watch, "track")):
        real = getattr(obj, name)
        monkeypatch.setattr(obj, name, (lambda real: lambda *a, **k: (counter.counting(real)(*a, **k)
                                                                     if steps[0] >= skip else real(*a, **k)))(real))
    monkeypatch.setattr(run, "_step", step)
    logs = []
    real_log = run._log_step

    def log_step(*args):
        before = len(counter.seen)
        out = counter.counting(real_log)(*args)
        logs.append(counter.seen[before:])
        del counter.seen[before:]
        return out

    monkeypatch.setattr(run, "_log_step", log_step)
    run.task.order(cfg.run.seed, 0)  # the epoch's order: one copy per epoch, made before the steps
    run.fit()
    return counter.seen, logs, steps[0]


def _cfg(method, model="mlp", dataset="blobs-test", data=None, model_opts=None, **run):
    base = {"run": {"method": method, "model": model, "dataset": dataset, "epochs": 1, "batch_size": 16,
                    "limit_train": 160, "limit_test": 32, "log_every": 4, "device": "cpu", **run},
            "model": model_opts or {}, "data": data or {}}
    return resolve(base)


SCENARIOS = {
    **{f"{m}-mlp": dict(method=m, model_opts={"widths": [16, 16]}) for m in ("bp", "dfa", "grape", "drtp", "dkp")},
    "grape-train-pass-mlp": dict(method="grape", model_opts={"widths": [16, 16]}),
    **{f"{m}-transformer": dict(method=m, model="transformer", dataset="synthetic",
                                data={"like": "ptb", "classes": 40, "context": 8},
                                model_opts={"d_model": 16, "heads": 2, "depth": 2}) for m in ("bp", "dfa", "grape")},
    "grape-cnn-cifar": dict(method="grape", model="cnn", dataset="synthetic", data={"like": "cifar10"},
                            model_opts={"channels": [4, 8], "hidden": 16}),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_no_host_sync_in_the_hot_path_of_a_step(monkeypatch, tmp_path, name):
    spec = dict(SCENARIOS[name])
    sets = {"grape.every": 2} if "grape" in name else {}
    if name == "grape-train-pass-mlp":
        sets["grape.estimator"] = "train-pass"
    cfg = _cfg(**spec)
    if sets:
        cfg = resolve(cfg.to_dict(), [f"{k}={v}" for k, v in sets.items()])
    seen, logs, steps = hot_path_syncs(monkeypatch, tmp_path / name, cfg)
    assert steps == 10
    assert seen == [], f"host syncs in the hot path: {seen}"
    assert [len(line) for line in logs] == [2, 2, 2], logs  # steps 4, 8 and the epoch's last (10)
    assert all(what == "tolist" for line in logs for what, _ in line), logs


def test_log_line_figures_are_the_ones_of_one_float_per_metric(tmp_path):
    # The one copy of a log line gives the numbers the old float()-per-metric reading gave.
    run = Run(_cfg("dfa", model_opts={"widths": [16]}), tmp_path / "r", progress=False)
    run.fit()
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [l for l in lines if l["kind"] == "step"]
    assert [l["step"] for l in steps] == [4, 8, 10]
    last_epoch = [l for l in lines if l["kind"] == "epoch"][-1]
    assert steps[-1]["train_accuracy"] == pytest.approx(last_epoch["train_accuracy"], abs=0)
    assert steps[-1]["train_loss"] == pytest.approx(last_epoch["train_loss"], rel=1e-12)


def test_token_and_label_range_errors_stay_clear_without_a_device_read():
    lm = models.create("transformer", (4,), 7, d_model=8, heads=2, depth=1)
    with pytest.raises(ValueError, match=r"token ids lie in \[-1, 3\], outside the vocabulary \[0, 7\)"):
        lm(torch.tensor([[0, 1, -1, 3]]))
    with pytest.raises(ValueError, match=r"token ids lie in \[0, 9\]"):
        lm(torch.tensor([[0, 9, 2, 3]]))
    from bpfree.methods.drtp import one_hot_targets

    with pytest.raises(ValueError, match=r"labels lie in \[0, 5\], outside the 3 classes"):
        one_hot_targets(torch.tensor([0, 5]), torch.zeros(2, 3))
    assert torch.equal(one_hot_targets(torch.tensor([2, 0]), torch.zeros(2, 3)),
                       torch.tensor([[0, 0, 0.5], [0.5, 0, 0]]))


def test_augmentation_is_drawn_with_a_generator_of_the_datas_device(monkeypatch):
    # On CUDA the offsets must come from a CUDA generator (no host copy): the generator is made
    # for the batch's device and every draw is asked for on the generator's device.
    from bpfree.tasks import vision

    made, asked = [], []
    real_gen, real_randint, real_rand = torch.Generator, torch.randint, torch.rand

    def gen(device="cpu"):
        made.append(torch.device(device))
        return real_gen(device="cpu")

    def randint(*a, device=None, **k):
        asked.append(device)
        return real_randint(*a, **k)

    def rand(*a, device=None, **k):
        asked.append(device)
        return real_rand(*a, **k)

    monkeypatch.setattr(torch, "Generator", gen)
    monkeypatch.setattr(torch, "randint", randint)
    monkeypatch.setattr(torch, "rand", rand)
    g = vision.batch_generator(0, 1, 2, torch.device("cuda", 1))
    assert made == [torch.device("cuda", 1)]
    vision.Augment(4, True).draw(5, g)
    assert asked == [g.device] * 3


# --------------------------------------------------------------------------- run options for the GPU


def test_run_options_set_torch_switches_for_the_run_and_restore_them(monkeypatch):
    b = torch.backends
    before = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cuda = torch.device("cuda")  # the switches need no GPU to be set
    run = resolve({}).run
    assert (run.tf32, run.cudnn_benchmark, run.deterministic) == (True, True, "off")  # the defaults
    with backends.applied(run, cuda) as flags:
        assert flags == {"tf32": True, "cudnn_benchmark": True, "deterministic": "off"}
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("tf32", "tf32")
        assert b.cudnn.benchmark and not b.cudnn.deterministic and not torch.are_deterministic_algorithms_enabled()
    run = resolve({}, ["tf32=false", "deterministic=on"]).run
    with backends.applied(run, cuda) as flags:
        assert flags == {"tf32": False, "cudnn_benchmark": False, "deterministic": "on"}
        assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision) == ("ieee", "ieee")
        assert not b.cudnn.benchmark and b.cudnn.deterministic
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
        import os

        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with backends.applied(resolve({}, ["deterministic=warn"]).run, torch.device("cpu")) as flags:
        # on the CPU: determinism only; the CUDA switches are left as they were
        assert flags == {"tf32": False, "cudnn_benchmark": False, "deterministic": "warn"}
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert (b.cuda.matmul.fp32_precision, b.cudnn.benchmark) == before[0:1] + before[2:3]
    after = (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.benchmark, b.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    assert after == before


def test_a_run_records_its_platform_and_applies_determinism_only_while_it_runs(tmp_path):
    seen = []
    real = methods.get("bp").step

    class Probe(methods.get("bp")):
        name = "test-probe-bp"

        def step(self, x, y, loss_fn):
            seen.append(torch.are_deterministic_algorithms_enabled())
            return real(self, x, y, loss_fn)

    methods.register(Probe)
    summary = Run(_cfg("test-probe-bp", model_opts={"widths": [8]}, deterministic="on"), tmp_path / "r",
                  progress=False).fit()
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
    p = json.loads((tmp_path / "r" / "summary.json").read_text())["platform"]
    assert p == summary["platform"]
    assert p["device"] == "cpu" and p["gpu"] is None and p["torch"] == torch.__version__
    assert p["cuda"] == torch.version.cuda
    assert (p["tf32"], p["cudnn_benchmark"], p["deterministic"]) == (False, False, "on")


def test_an_op_that_deterministic_on_refuses_stops_the_run_in_one_line_naming_it(tmp_path):
    class Refused(methods.get("bp")):
        name = "test-put-bp"

        def step(self, x, y, loss_fn):
            torch.zeros(3).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0]))  # no deterministic kernel
            return super().step(x, y, loss_fn)

    methods.register(Refused)
    with pytest.raises(TrainingError) as err:
        Run(_cfg("test-put-bp", deterministic="on"), tmp_path / "on", progress=False).fit()
    text = str(err.value)
    assert "\n" not in text and text.startswith("deterministic=on: put_ has no deterministic implementation on cpu")
    assert "deterministic=warn" in text
    with pytest.warns(UserWarning, match="put_ does not have a deterministic implementation"):
        Run(_cfg("test-put-bp", deterministic="warn"), tmp_path / "warn", progress=False).fit()
    Run(_cfg("test-put-bp"), tmp_path / "off", progress=False).fit()


def test_cuda_n_becomes_the_current_device(monkeypatch):
    from bpfree.train.setup import resolve_device

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(torch.device(d)))
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and current == [torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda") and len(current) == 1  # cuda alone: the current one


# --------------------------------------------------------------------------- float32 under autocast


def test_dkp_update_is_float32_under_bf16_autocast(monkeypatch):
    torch.manual_seed(0)
    model = models.create("mlp", (12,), 5, widths=(16, 16))
    m = methods.create("dkp", model, eta=0.5)
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.step(x, y, F.cross_entropy)  # makes B_l
    seen = {}
    real = type(m).after_delivery

    def recording(self, record):
        seen["h"] = {k: v.detach().clone() for k, v in record.points.items()}
        seen["e"] = record.delivery.error.detach().clone()
        seen["B"] = {k: v.clone() for k, v in self.state.feedback.items()}
        return real(self, record)

    monkeypatch.setattr(type(m), "after_delivery", recording)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        m.step(x, y, F.cross_entropy)
    e = seen["e"].float()
    assert seen["e"].dtype == torch.bfloat16  # the step really ran in bfloat16
    for name, B0 in seen["B"].items():
        h = seen["h"][name].float()
        expected = B0 - 0.5 * (h.t() @ e + 1e-3 * B0)  # float32, autocast off (the test's own arithmetic)
        got = m.state.feedback[name]
        assert got.dtype == torch.float32
        assert torch.equal(got, expected)
        low = B0 - 0.5 * ((h.bfloat16().t() @ e.bfloat16()).float() + 1e-3 * B0)
        assert not torch.equal(low, expected)  # a bfloat16 product would show


# --------------------------------------------------------------------------- the CUDA benchmark path


class FakeEvent:
    """A stand-in for torch.cuda.Event: ``record`` notes how many steps had run; 2 ms per step."""

    clock = [0]
    synced = [0]

    def __init__(self, enable_timing=False):
        assert enable_timing
        self.at = None

    def record(self):
        self.at = FakeEvent.clock[0]

    def synchronize(self):
        FakeEvent.synced[0] += 1

    def elapsed_time(self, end):
        return 2.0 * (end.at - self.at)


def test_cuda_timing_uses_events_around_groups_and_reads_them_after(monkeypatch):
    FakeEvent.clock[0] = FakeEvent.synced[0] = 0
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    syncs = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    real = bench.run_step

    def counted(*args):
        FakeEvent.clock[0] += 1
        return real(*args)

    monkeypatch.setattr(bench, "run_step", counted)
    assert isinstance(bench.clock_for(torch.device("cuda")), bench.CudaEvents)
    assert isinstance(bench.clock_for(torch.device("cpu")), bench.WallClock)
    # a CUDA clock driven on CPU contenders: 4 steps per group, 2 ms each, no sync inside a group
    cfgs = bench.configs(["bp", "dfa"], {}, ["widths=8"], {"model": "mlp", "dataset": "blobs-test", "batch_size": 16,
                                                          "device": "cpu"})
    monkeypatch.setattr(bench, "clock_for", lambda device: bench.CudaEvents(device))
    times, group = bench.time_methods(cfgs, repeats=3, warmup=1, progress=False, group=4)
    assert group == 4 and times == {"bp": [0.002] * 3, "dfa": [0.002] * 3}
    assert FakeEvent.synced[0] == 6  # one wait per sample, when it is read after all rounds
    assert len(syncs) <= 1  # only after the warm-up


def test_bench_reports_reserved_memory_on_cuda_only():
    rows = [{"method": "bp", "median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0, "ratio_to_bp": 1.0,
             "peak_mem_mb": 3.0, "peak_reserved_mb": 4.0, "steps_per_sample": 1}]
    cfg = bench.configs(["bp"], {}, [], {"model": "mlp", "dataset": "blobs-test", "device": "cpu"})[0]
    assert "| bp | 1.00 | 1.00–1.00 | 1.000 | 3.0 | 4.0 |" in bench.table(rows, cfg, 1)
    rows[0]["peak_reserved_mb"] = None
    assert "reserved" not in bench.table(rows, cfg, 1)


@pytest.mark.parametrize("opts", [{}, {"estimator": "train-pass"}, {"perturb": "weight"}, {"tangents": "central"}])
def test_grape_on_batchnorm_nets_under_bf16_autocast(opts):
    # Forward-mode batch_norm returns a float32 tangent for a bfloat16 primal; without matching
    # dtypes the next bfloat16 layer fails ("expected m1 and m2 to have the same dtype").
    torch.manual_seed(0)
    net = models.create("cnn", (3, 16, 16), 5, channels=(4, 8), hidden=16)
    m = methods.create("grape", net, every=1, **opts)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    for _ in range(2):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m.step(x, y, F.cross_entropy)
    for name, J in m.state.jacobian.mean.items():
        assert J.dtype == torch.float32 and torch.isfinite(J).all() and J.abs().sum() > 0, name
    assert all(B.dtype == torch.float32 and torch.isfinite(B).all() for B in m.state.feedback.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_matched_tangents_leaves_float32_passes_bit_identical():
    # Without autocast primal and tangent agree, so the hook changes nothing: same estimate, same B.
    from bpfree.feedback import estimators

    torch.manual_seed(0)
    net = models.create("cnn", (3, 16, 16), 5, channels=(4, 8), hidden=16)
    names = {id(p): n for n, p in __import__("bpfree").points.feedback_points(net)}
    x = torch.randn(6, 3, 16, 16)
    a = estimators.sample_jacobians(net, x, names, torch.Generator().manual_seed(3))
    real = estimators.matched_tangents
    try:
        estimators.matched_tangents = lambda model: __import__("contextlib").nullcontext()
        b = estimators.sample_jacobians(net, x, names, torch.Generator().manual_seed(3))
    finally:
        estimators.matched_tangents = real
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # compilation takes 5-30 s
def test_compiled_transformer_blocks_give_the_eager_gradients_under_dfa():
    # torch.compile of each block must not change what a DFA step computes (same B_l, same batch).
    import copy

    torch.manual_seed(0)
    base = models.create("transformer", (16,), 50, d_model=32, heads=2, depth=2, dropout=0.0)
    x, y = torch.randint(0, 50, (8, 16)), torch.randint(0, 50, (8, 16))
    loss_fn = lambda o, t: F.cross_entropy(o.reshape(-1, o.shape[-1]), t.reshape(-1))
    grads = []
    for compiled in (False, True):
        net = copy.deepcopy(base)
        if compiled:
            for i, blk in enumerate(net.blocks):
                net.blocks[i] = torch.compile(blk)
        m = methods.create("dfa", net)
        for _ in range(2):  # the second step runs with the links made from B_l
            net.zero_grad()
            m.step(x, y, loss_fn)
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
