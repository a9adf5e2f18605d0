"""Tests of the convolutional and residual models (issue: convolutional and deep networks).

Expected values come from the architectures' definitions (layer shapes, parameter formulas,
where the feedback points sit) and from what DFA is meant to compute at a residual block: the
weight gradients of block ``k`` depend on the signal ``B_k e`` at block ``k``'s point alone.
Every model is built tiny (width options) so the fast tier stays fast on two CPU cores.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import methods, models
from bpfree.options import OptionError
from bpfree.points import FeedbackPoint, feedback_points, handled

TINY = {
    "cnn": dict(channels=(3, 5), hidden=6),
    "alexnet": dict(channels=(3, 4, 5, 4, 4), hidden=(6, 6)),
    "vgg16": dict(width=1 / 16, hidden=(96, 96)),  # 6 hidden units after the multiplier
    "resnet20": dict(channels=(2, 3, 4)),
    "resnet56": dict(channels=(2, 3, 4)),
}
SHAPES = [(1, 28, 28), (3, 32, 32)]
NUM_POINTS = {"cnn": 3, "alexnet": 7, "vgg16": 15, "resnet20": 9, "resnet56": 27}
HAS_BN = {"cnn": True, "alexnet": True, "vgg16": True, "resnet20": True, "resnet56": True}


def build(name, shape=(3, 32, 32), classes=10, **extra):
    torch.manual_seed(0)
    return models.create(name, shape, classes, **{**TINY[name], **extra})


def point_inputs(model, x):
    """``[(name, h_l)]`` in forward order, from a plain forward pass with a recording handler."""
    names = {id(p): n for n, p in feedback_points(model)}
    seen = []

    def record(point, h):
        seen.append((names[id(point)], h.detach()))
        return h

    with handled(model, record), torch.no_grad():
        model(x)
    return seen


# --------------------------------------------------------------------------- shapes and points


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(TINY))
def test_every_model_maps_images_to_logits(name, shape):
    model = build(name, shape, classes=7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()
    assert name in models.available()


@pytest.mark.parametrize("name", sorted(TINY))
def test_point_count_order_and_recorded_shapes(name):
    model = build(name)
    points = feedback_points(model)
    assert len(points) == NUM_POINTS[name]
    seen = point_inputs(model, torch.randn(2, 3, 32, 32))
    # every point fires once per forward pass, in registration order, after a ReLU
    assert [n for n, _ in seen] == [n for n, _ in points]
    assert all((h >= 0).all() for _, h in seen)
    assert [tuple(h.shape[1:]) for _, h in seen] == [tuple(s) for s in model.point_shapes]


def _vgg_expected(size):
    chans = [4, 4, 8, 8, 16, 16, 16, 32, 32, 32, 32, 32, 32]  # VGG-16 channels / 16
    pool_after = {1, 3, 6, 9, 12}
    out, s = [], size
    for i, c in enumerate(chans):
        if i in pool_after:
            s = math.ceil(s / 2)
        out.append((c, s, s))
    return out + [(6,), (6,)]


EXPECTED_SHAPES = {
    ("cnn", 28): [(3, 14, 14), (5, 7, 7), (6,)],
    ("cnn", 32): [(3, 16, 16), (5, 8, 8), (6,)],
    ("alexnet", 28): [(3, 14, 14), (4, 7, 7), (5, 7, 7), (4, 7, 7), (4, 4, 4), (6,), (6,)],
    ("alexnet", 32): [(3, 16, 16), (4, 8, 8), (5, 8, 8), (4, 8, 8), (4, 4, 4), (6,), (6,)],
    ("vgg16", 28): _vgg_expected(28),
    ("vgg16", 32): _vgg_expected(32),
    ("resnet20", 32): [(2, 32, 32)] * 3 + [(3, 16, 16)] * 3 + [(4, 8, 8)] * 3,
    ("resnet20", 28): [(2, 28, 28)] * 3 + [(3, 14, 14)] * 3 + [(4, 7, 7)] * 3,
    ("resnet56", 32): [(2, 32, 32)] * 9 + [(3, 16, 16)] * 9 + [(4, 8, 8)] * 9,
}


@pytest.mark.parametrize("name,size", sorted(EXPECTED_SHAPES))
def test_points_sit_where_the_architecture_says(name, size):
    channels = 1 if size == 28 else 3
    model = build(name, (channels, size, size))
    seen = point_inputs(model, torch.randn(2, channels, size, size))
    assert [tuple(h.shape[1:]) for _, h in seen] == EXPECTED_SHAPES[(name, size)]


def test_point_names_are_readable():
    assert [n for n, _ in feedback_points(build("cnn"))] == ["conv1_point", "conv2_point", "fc1_point"]
    names = [n for n, _ in feedback_points(build("resnet20"))]
    assert names[:4] == ["layer1.0.point", "layer1.1.point", "layer1.2.point", "layer2.0.point"]
    assert names[-1] == "layer3.2.point"


def test_vgg_point_follows_conv_bn_relu_pool():
    model = build("vgg16")
    block = model.conv2  # the second conv block ends with the first pooling
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
    assert isinstance(model.conv2_point, FeedbackPoint)
    assert [type(m) for m in model.conv1] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]


def test_full_size_vgg16_first_point_has_65536_features():
    # construction only (no forward): the first point carries 64 * 32 * 32 features
    model = models.create("vgg16", (3, 32, 32), 100)
    assert model.point_shapes[0] == (64, 32, 32) and math.prod(model.point_shapes[0]) == 65536
    assert len(feedback_points(model)) == 15
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


# --------------------------------------------------------------------------- parameters and options


def test_cnn_parameter_count_matches_the_layer_formula():
    c1, c2, hid, o = 32, 64, 512, 10
    # default: BatchNorm (scale and shift per channel or unit) replaces the conv and FC biases
    expected = (1 * c1 * 25 + 2 * c1) + (c1 * c2 * 25 + 2 * c2) + (c2 * 7 * 7 * hid + 2 * hid) + (hid * o + o)
    model = models.create("cnn", (1, 28, 28), o)
    assert sum(p.numel() for p in model.parameters()) == expected == 1_663_978
    plain = (1 * c1 * 25 + c1) + (c1 * c2 * 25 + c2) + (c2 * 7 * 7 * hid + hid) + (hid * o + o)
    model = models.create("cnn", (1, 28, 28), o, batchnorm=False)
    assert sum(p.numel() for p in model.parameters()) == plain == 1_663_370


def _resnet_params(n, channels=(16, 32, 64), c_in=3, o=10, shortcut="A"):
    conv = lambda a, b, k=3: a * b * k * k  # noqa: E731
    total = conv(c_in, channels[0]) + 2 * channels[0]  # stem conv + BN
    prev = channels[0]
    for c in channels:
        for i in range(n):
            total += conv(prev, c) + conv(c, c) + 4 * c  # two convs, two BNs
            if prev != c and shortcut == "B":
                total += conv(prev, c, 1) + 2 * c
            prev = c
    return total + channels[-1] * o + o


@pytest.mark.parametrize("name,n,shortcut", [("resnet20", 3, "A"), ("resnet20", 3, "B"), ("resnet56", 9, "A")])
def test_resnet_parameter_counts(name, n, shortcut):
    model = models.create(name, (3, 32, 32), 10, shortcut=shortcut)
    assert sum(p.numel() for p in model.parameters()) == _resnet_params(n, shortcut=shortcut)
    if name == "resnet20" and shortcut == "A":
        assert _resnet_params(3) == 269_722  # the paper's "0.27M"


@pytest.mark.parametrize("name", sorted(TINY))
def test_batchnorm_option_removes_every_batchnorm(name):
    def count(m):
        return sum(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.modules())

    with_bn, without = build(name, batchnorm=True), build(name, batchnorm=False)
    assert count(without) == 0
    assert count(with_bn) > 0
    default = build(name)
    assert (count(default) > 0) == HAS_BN[name]
    # without BN the convolutions get their biases back
    assert all(m.bias is not None for m in without.modules() if isinstance(m, nn.Conv2d))
    assert all(m.bias is None for m in with_bn.modules() if isinstance(m, nn.Conv2d))
    assert without(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet_shortcut_options():
    a = build("resnet20", shortcut="A")
    b = build("resnet20", shortcut="B")
    assert sum(isinstance(m, nn.Conv2d) for m in a.modules()) == 19
    assert sum(isinstance(m, nn.Conv2d) for m in b.modules()) == 21  # + two 1x1 projections
    # option A: subsample and zero-pad channels symmetrically
    from bpfree.models.resnet import PadShortcut

    h = torch.arange(2 * 4 * 4, dtype=torch.float32).view(1, 2, 4, 4)
    out = PadShortcut(2, 4, 2)(h)
    assert out.shape == (1, 4, 2, 2)
    assert torch.equal(out[0, 1:3], h[0, :, ::2, ::2])
    assert (out[0, 0] == 0).all() and (out[0, 3] == 0).all()


def test_width_multiplier_and_bad_options():
    half = models.create("resnet20", (3, 32, 32), 10, width=0.5)
    assert half.point_shapes[0] == (8, 32, 32) and half.point_shapes[-1] == (32, 8, 8)
    assert models.create("vgg16", (3, 32, 32), 10, width=0.25).point_shapes[0] == (16, 32, 32)
    with pytest.raises(OptionError, match="width"):
        models.create("cnn", (1, 28, 28), 10, width=0)
    with pytest.raises(OptionError, match="channels"):
        models.create("alexnet", (3, 32, 32), 10, channels=(8, 8))
    with pytest.raises(ValueError, match=r"model 'vgg16' takes images of shape \(channels, height, width\)"):
        models.create("vgg16", (784,), 10)


def test_resnet_without_bn_starts_at_a_sane_scale():
    # the 1/sqrt(#blocks) branch scaling keeps ResNet-56 without BN from exploding at init
    torch.manual_seed(0)
    model = models.create("resnet56", (3, 32, 32), 10, batchnorm=False)
    with torch.no_grad():
        out = model(torch.randn(16, 3, 32, 32))
    assert out.abs().max() < 10


# --------------------------------------------------------------------------- one step of each method


def _step(name, method, **extra):
    model = build(name, **extra)
    torch.manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    m = methods.create(method, model, seed=0) if method != "bp" else methods.create(method, model)
    result = m.step(x, y, F.cross_entropy)
    return model, m, result


def _assert_all_grads_finite(model):
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert missing == [] and bad == []
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


def _method_cases():
    cases = []
    for name in sorted(TINY):
        for method in ("bp", "dfa", "grape"):
            cases.append(pytest.param(name, method, id=f"{name}-{method}"))
    return cases


@pytest.mark.parametrize("name,method", _method_cases())
def test_one_step_fills_a_finite_grad_for_every_parameter(name, method):
    model, _, result = _step(name, method)
    assert torch.isfinite(result.loss)
    _assert_all_grads_finite(model)


@pytest.mark.parametrize("name", sorted(TINY))
def test_one_grape_step_without_batchnorm(name):
    model, m, _ = _step(name, "grape", batchnorm=False)
    _assert_all_grads_finite(model)
    assert set(m.state.jacobian.mean) == {n for n, _ in feedback_points(model)}
    for n, B in m.state.feedback.items():
        assert B.shape == (math.prod(dict(zip([k for k, _ in feedback_points(model)], model.point_shapes))[n]), 10)


# --------------------------------------------------------------------------- BatchNorm and GrAPE


def test_grape_estimate_leaves_batchnorm_statistics_alone():
    model = build("alexnet")
    grape = methods.create("grape", model, samples=4)
    x = torch.randn(8, 3, 32, 32)
    before = copy.deepcopy(model.state_dict())
    estimates = grape.estimator(x.device).estimate(x, None)  # BatchNorm: the central difference
    assert set(estimates) == {n for n, _ in feedback_points(model)}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_grape_step_moves_batchnorm_statistics_exactly_as_one_dfa_step():
    # the estimate must not add a second update of the running statistics
    torch.manual_seed(0)
    model = build("resnet20")
    twin = copy.deepcopy(model)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    methods.create("grape", model, samples=4).step(x, y, F.cross_entropy)
    methods.create("dfa", twin).step(x, y, F.cross_entropy)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        if "running" in key or "num_batches" in key:
            assert torch.equal(a, b), key


# --------------------------------------------------------------------------- DFA at residual blocks


def _resnet_dfa_grads(model, x, y, feedback):
    """Gradients of every parameter after one DFA step with the given ``B_l`` (others untouched)."""
    model.zero_grad(set_to_none=True)
    dfa = methods.create("dfa", model, seed=0)
    dfa.state.feedback = {k: v.clone() for k, v in feedback.items()}
    dfa.step(x, y, F.cross_entropy)
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}


def _block_params(model, k):
    """Names of the parameters that belong to block ``k``'s segment (block 0 includes the stem)."""
    names = {f"{prefix}.{n}" for prefix, b in _block_prefixes(model)[k:k + 1] for n, _ in b.named_parameters()}
    if k == 0:
        names |= {f"stem.{n}" for n, _ in model.stem.named_parameters()}
    return names


def _block_prefixes(model):
    return [(f"layer{s}.{i}", b) for s in (1, 2, 3) for i, b in enumerate(getattr(model, f"layer{s}"))]


@pytest.mark.parametrize("shortcut", ["A", "B"])
def test_resnet_block_gradients_depend_only_on_their_own_point(shortcut):
    model = build("resnet20", shortcut=shortcut)
    torch.manual_seed(3)
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    probe = methods.create("dfa", model, seed=0)
    probe.step(x, y, F.cross_entropy)  # creates every B_l
    full_B = {k: v.clone() for k, v in probe.state.feedback.items()}
    names = [n for n, _ in feedback_points(model)]
    full = _resnet_dfa_grads(model, x, y, full_B)
    head = {n for n, _ in model.named_parameters() if n.startswith("head.")}
    for k in (0, 3, 4, 8):  # first block, a downsampling block (with the projection in B), its successor, last
        own = _block_params(model, k)
        assert own
        only_k = {n: (B if n == names[k] else torch.zeros_like(B)) for n, B in full_B.items()}
        g = _resnet_dfa_grads(model, x, y, only_k)
        for n in own | head:  # the block's gradients are unchanged when every other B_l is zero
            torch.testing.assert_close(g[n], full[n], rtol=1e-6, atol=1e-7)
            if n not in head:
                assert g[n].abs().sum() > 0, n
        for n in set(g) - own - head:  # and nothing leaks into any other block, either way
            assert (g[n] == 0).all(), f"gradient leaked into {n} from block {k}"
        without_k = {n: (torch.zeros_like(B) if n == names[k] else B) for n, B in full_B.items()}
        g = _resnet_dfa_grads(model, x, y, without_k)
        for n in own:
            assert (g[n] == 0).all(), f"{n} received gradient from another block's signal"


def test_resnet_dfa_cuts_the_graph_at_every_block_input():
    # under DFA each block (but the first) receives a tensor with no autograd history, so the
    # shortcut cannot carry gradient back across blocks
    model = build("resnet20", shortcut="B")
    inputs = []
    hooks = [b.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for _, b in _block_prefixes(model)]
    dfa = methods.create("dfa", model)
    records = []  # (name, h_l) as each point receives it, before the cut
    hooks += [p.register_forward_hook(lambda mod, args, out, n=n: records.append((n, args[0]))) for n, p in dfa.points]
    dfa.forward_cut(torch.randn(3, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert inputs[0].requires_grad  # the stem output, part of block 0's segment
    assert all(not h.requires_grad and h.grad_fn is None for h in inputs[1:])
    # autograd: h_k depends on block k's parameters only (and block 0's on the stem's)
    prefixes = _block_prefixes(model)
    for k, (name, h) in enumerate(records):
        params = dict(model.named_parameters())
        grads = torch.autograd.grad(h.sum(), list(params.values()), allow_unused=True, retain_graph=True)
        reached = {n for n, g in zip(params, grads) if g is not None}
        assert reached == _block_params(model, k), (k, name)
        assert name == f"{prefixes[k][0]}.point"


# --------------------------------------------------------------------------- slow: the CLI on real data


def _cli_cases():
    cases = []
    for name in ("cnn", "alexnet", "vgg16", "resnet20", "resnet56"):
        for method in ("bp", "dfa", "grape"):
            cases.append(pytest.param(name, method, id=f"{name}-{method}"))
    return cases


@pytest.mark.slow
@pytest.mark.parametrize("name,method", _cli_cases())
def test_cli_trains_every_model_on_padded_fashion_mnist(tmp_path, name, method):
    from bpfree import cli
    from bpfree.data import DataError, fetch

    try:
        fetch("fashion-mnist", progress=False)
    except DataError as e:  # pragma: no cover - depends on the machine
        pytest.skip(f"Fashion-MNIST is not available here: {e}")
    out = tmp_path / "run"
    code = cli.main(["train", "--model", name, "--dataset", "fashion-mnist", "--set", "pad=2", "--method", method,
                     "--limit-train", "256", "--limit-test", "256", "--epochs", "1", "--out", str(out),
                     "--no-progress"])
    assert code == 0
    import json

    summary = json.loads(Path(out / "summary.json").read_text())
    assert summary["model"] == name and math.isfinite(summary["test_loss"])
    assert 0.0 <= summary["test_accuracy"] <= 1.0
