"""Oracle tests of BP, DFA and GrAPE (issue: foundation).

Expected values come from what each method is meant to compute (see tests/README.md).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree.feedback import rules
from bpfree.feedback.estimators import RunningJacobian, sample_jacobians
from bpfree.feedback.matrices import frobenius_cos, rowcos
from bpfree.methods.base import MethodGenerator
from bpfree.metrics.jacobians import mean_jacobians, per_sample_jacobians
from bpfree.options import OptionError


def one_hidden(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 5), act(), bpfree.FeedbackPoint(), nn.Linear(5, 3))


def grads_of(model):
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("act", [nn.Tanh, nn.ReLU])
def test_dfa_with_B_equal_to_J_transpose_gives_exactly_the_bp_gradients(act):
    # y = W2 h + b2 with h = act(W1 x + b1): J = dy/dh = W2, so B = W2^T makes B e = J^T e.
    model = one_hidden(act=act)
    x, y = torch.randn(9, 7), torch.randint(0, 3, (9,))
    bpfree.methods.create("bp", model).step(x, y, F.cross_entropy)
    expected = grads_of(model)
    model.zero_grad()
    dfa = bpfree.methods.create("dfa", model)
    dfa.state.feedback = {"2": model[3].weight.detach().t().clone()}
    result = dfa.step(x, y, F.cross_entropy)
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=1e-7)
    torch.testing.assert_close(result.loss, F.cross_entropy(model(x), y))


def test_dfa_signal_is_B_e_and_accumulates_like_backward():
    model = one_hidden()
    x, y = torch.randn(4, 7), torch.randint(0, 3, (4,))
    dfa = bpfree.methods.create("dfa", model, seed=3)
    dfa.step(x, y, F.cross_entropy)
    g1 = model[0].weight.grad.clone()
    # by hand: e = (softmax(y) - onehot)/batch; delta = (B e) * act'(a); dW1 = delta^T x
    B = dfa.state.feedback["2"]
    a = model[0](x)
    e = (F.softmax(model(x), 1) - F.one_hot(y, 3)) / 4
    delta = (e @ B.t()) * (1 - torch.tanh(a) ** 2)
    torch.testing.assert_close(g1, (delta.t() @ x).detach(), rtol=1e-5, atol=1e-6)
    dfa.step(x, y, F.cross_entropy)  # .grad accumulates, as loss.backward() does
    torch.testing.assert_close(model[0].weight.grad, 2 * g1)


def test_dfa_cuts_the_graph_between_blocks():
    model = bpfree.models.create("mlp", (6,), 3, widths=(5, 4, 4))
    seen = []
    for m in model:
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].requires_grad))
    x = torch.randn(3, 6)
    bpfree.methods.create("dfa", model).step(x, torch.tensor([0, 1, 2]), F.cross_entropy)
    # Linear layers after a point see a detached input: no input gradients cross blocks.
    assert seen == [False, False, False, False]
    seen.clear()
    bpfree.methods.create("bp", model).step(x, torch.tensor([0, 1, 2]), F.cross_entropy)
    assert seen == [False, True, True, True]


def test_feedback_matrix_shapes_and_initial_scale():
    model = bpfree.models.create("mlp", (30,), 10, widths=(400, 300))
    dfa = bpfree.methods.create("dfa", model)
    dfa.step(torch.randn(2, 30), torch.tensor([0, 1]), F.cross_entropy)
    shapes = {n: tuple(B.shape) for n, B in dfa.state.feedback.items()}
    assert shapes == {"3": (400, 10), "6": (300, 10)}
    # entries have variance scale^2 / o = 0.1
    assert abs(dfa.state.feedback["3"].var().item() - 0.1) < 0.01
    u = bpfree.methods.create("dfa", model, init="uniform")
    u.step(torch.randn(2, 30), torch.tensor([0, 1]), F.cross_entropy)
    B = u.state.feedback["3"]
    assert B.abs().max() <= math.sqrt(3 / 10) and abs(B.var().item() - 0.1) < 0.01


def test_jacobian_estimate_is_unbiased_and_converges():
    torch.manual_seed(0)
    model = bpfree.models.create("mlp", (6,), 4, widths=(8, 8, 8))
    x = torch.randn(32, 6)
    exact = mean_jacobians(model, x)
    grape = bpfree.methods.create("grape", model)
    g = torch.Generator().manual_seed(0)
    avg = RunningJacobian("cumulative")
    draws = 400
    for _ in range(draws):
        avg.update(sample_jacobians(model, x, grape.names, g))
    for name, J in exact.items():
        assert avg.count[name] == draws
        # 400 draws x 32 samples: cosine well above the 0.95 the issue asks for
        assert frobenius_cos(avg.mean[name], J) > 0.95, name
    # one point at a time gives the same expectation
    avg1 = RunningJacobian("cumulative")
    for _ in range(200):
        for name in exact:
            avg1.update(sample_jacobians(model, x, grape.names, g, only=name))
    for name, J in exact.items():
        assert frobenius_cos(avg1.mean[name], J) > 0.95


def test_single_point_estimate_matches_the_closed_form_on_a_linear_head():
    # With one point, u = J d exactly (linear head), so J~ = (1/k) sum_i J d_i d_i^T: check directly.
    model = one_hidden()
    x = torch.randn(5, 7)
    grape = bpfree.methods.create("grape", model)
    g = torch.Generator().manual_seed(7)
    est = sample_jacobians(model, x, grape.names, g)["2"]
    d = torch.randn(5, 5, generator=torch.Generator().manual_seed(7))
    J = model[3].weight.detach()
    torch.testing.assert_close(est, J @ (d.t() @ d) / 5, rtol=1e-5, atol=1e-6)


def test_rescale_rule_matches_its_formula_and_keeps_the_frobenius_norm():
    B = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -2.0]])
    G = torch.tensor([[2.0, 0.0], [1.0, -1.0], [0.0, 1.0]])
    c = torch.tensor([1.0, 0.0, -1.0])  # row cosines by hand
    torch.testing.assert_close(rowcos(B, G), c)
    eta = 0.1
    by_hand = torch.tensor([[1.0, 0.0], [0.9, 0.9], [0.0, -1.6]])  # (1 - eta (1 - c_i)) B_i
    torch.testing.assert_close(rules.rescale(B, G, eta), by_hand)
    norm0 = float(B.norm())
    new = rules.update_feedback(B, G, rule="rescale", eta=eta, norm0=norm0, noise=0.0)
    torch.testing.assert_close(new, by_hand * norm0 / by_hand.norm())
    torch.testing.assert_close(new.norm(), torch.tensor(norm0))
    # with its default noise the norm is still restored exactly
    noisy = rules.update_feedback(B, G, rule="rescale", eta=eta, norm0=norm0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(noisy.norm(), torch.tensor(norm0))
    assert not torch.allclose(noisy, new)


def test_grape_keeps_feedback_norms_over_training_steps(blobs):
    x, y = blobs
    model = bpfree.models.create("mlp", (16,), 4, widths=(12, 12))
    grape = bpfree.methods.create("grape", model, eta=0.05)
    grape.step(x, y, F.cross_entropy)
    norms = {n: float(B.norm()) for n, B in grape.state.feedback.items()}
    for _ in range(5):
        grape.step(x, y, F.cross_entropy)
    for n, B in grape.state.feedback.items():
        assert abs(float(B.norm()) - norms[n]) < 1e-4 * norms[n]
    # default every=4: steps 1 and 5 estimate and update
    assert grape.state.steps == 6 and all(c == 2 for c in grape.state.jacobian.count.values())


def test_align_applies_the_rule_to_each_B_with_the_running_estimate(blobs):
    # align(): Jbar <- running mean of the estimates, then B_l <- update_feedback(B_l, Jbar_l^T);
    # B_l keeps its values' meaning (n_l, o) but is stored in Jbar_l^T's layout from then on.
    x, y = blobs
    model = bpfree.models.create("mlp", (16,), 4, widths=(12, 12))
    grape = bpfree.methods.create("grape", model, rule="cosine", eta=0.3)
    grape.step(x, y, F.cross_entropy)
    before = {n: B.clone() for n, B in grape.state.feedback.items()}
    g = torch.Generator().manual_seed(5)
    est = {n: torch.randn(4, 12, generator=g) for n in grape.state.feedback}
    count = dict(grape.state.jacobian.count)
    mean = {n: grape.state.jacobian.mean[n] + (est[n] - grape.state.jacobian.mean[n]) / (count[n] + 1) for n in est}
    with torch.no_grad():
        grape.align(est)
    for n, B in grape.state.feedback.items():
        want = rules.update_feedback(before[n], mean[n].t().contiguous(), rule="cosine", eta=0.3,
                                     norm0=grape.state.norm0[n])
        torch.testing.assert_close(B, want, rtol=1e-5, atol=1e-6)
        assert B.t().is_contiguous() and B.shape == (12, 4)


def test_state_dict_round_trip_reproduces_the_next_step(blobs):
    x, y = blobs
    torch.manual_seed(0)
    model = bpfree.models.create("mlp", (16,), 4, widths=(12, 12))
    grape = bpfree.methods.create("grape", model, eta=0.05)
    for _ in range(3):
        grape.step(x, y, F.cross_entropy)
    state = grape.state_dict()
    twin = bpfree.methods.create("grape", model, eta=0.05)
    twin.load_state_dict(state)
    model.zero_grad()
    grape.step(x, y, F.cross_entropy)
    g_a = grads_of(model)
    B_a = {n: B.clone() for n, B in grape.state.feedback.items()}
    model.zero_grad()
    twin.step(x, y, F.cross_entropy)
    for a, p in zip(g_a, model.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=0, atol=0)
    for n in B_a:
        torch.testing.assert_close(twin.state.feedback[n], B_a[n], rtol=0, atol=0)


def test_errors_name_the_problem(blobs):
    x, y = blobs
    model = bpfree.models.create("mlp", (16,), 4)
    with pytest.raises(ValueError, match="unknown method 'nope'; available: .*dfa"):
        bpfree.methods.create("nope", model)
    with pytest.raises(OptionError, match="unknown option for method 'grape': etaa; valid options: .*eta"):
        bpfree.methods.create("grape", model, etaa=1)
    with pytest.raises(OptionError, match="option 'rule' cannot be 'magic'; choose one of: cosine, rescale"):
        bpfree.methods.create("grape", model, rule="magic")
    with pytest.raises(OptionError, match="option 'eta' takes a number"):
        bpfree.methods.create("grape", model, eta="fast")
    with pytest.raises(ValueError, match="has none"):
        bpfree.methods.create("dfa", nn.Sequential(nn.Linear(16, 4)))
    dfa = bpfree.methods.create("dfa", model)
    with pytest.raises(ValueError, match=r"cannot take input of shape \(64, 15\)"):
        dfa.step(x[:, :15], y, F.cross_entropy)
    with pytest.raises(ValueError, match="x holds 64 samples but y holds 63"):
        dfa.step(x, y[:63], F.cross_entropy)
    with pytest.raises(IndexError, match="out of bounds"):
        dfa.step(x, torch.full_like(y, 9), F.cross_entropy)
    with pytest.raises(ValueError, match="unknown model 'mpl'"):
        bpfree.models.create("mpl", (16,), 4)
    with pytest.raises(ValueError, match="widths"):
        bpfree.models.create("mlp", (16,), 4, widths=())


def test_per_sample_jacobian_helper_matches_the_closed_form():
    # h = tanh(W1 x + b1); y = W2 h + b2  =>  dy/dh = W2 for every sample
    model = one_hidden()
    J = per_sample_jacobians(model, torch.randn(3, 7))["2"]
    torch.testing.assert_close(J, model[3].weight.detach().expand(3, 3, 5))


def _peak_live_bytes(step) -> int:
    """Peak of live tensor bytes allocated during ``step()`` (from the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("method", ["dfa", "grape"])
def test_peak_step_memory_is_bps(method):
    # Both end a step holding the same gradients; BP holds one block's intermediate gradient at
    # a time, and so must the direct-feedback delivery (no signal, no h_l kept past its block).
    # What DFA must keep besides is the output error e (batch x o floats) for every block's
    # signal (the links z_l = h_l B_l, batch x o each, are let go after the forward pass, before
    # the peak). GrAPE's estimate pass runs before any
    # gradient exists, so it adds nothing at the peak; its state (B_l, Jbar_l) predates the step.
    x = torch.randn(64, 20)
    y = torch.randint(0, 10, (64,))
    peaks = {}
    for name in ("bp", method):
        torch.manual_seed(0)
        model = bpfree.models.create("mlp", (20,), 10, widths=(256, 256, 256))
        m = bpfree.methods.create(name, model)
        for _ in range(2):  # feedback matrices, estimates and their buffers exist from here on
            model.zero_grad(set_to_none=True)
            m.step(x, y, F.cross_entropy)
        model.zero_grad(set_to_none=True)
        peaks[name] = _peak_live_bytes(lambda: m.step(x, y, F.cross_entropy))
    e_bytes = 64 * 10 * 4
    assert peaks[method] <= peaks["bp"] + e_bytes + 4, peaks


def test_method_generator_draws_from_its_seed_and_resumes_from_a_saved_state():
    a = MethodGenerator(3)
    assert a.state_dict() is None  # never used: nothing to save
    first = torch.randn(4, generator=a.on("cpu"))
    torch.testing.assert_close(first, torch.randn(4, generator=torch.Generator().manual_seed(3)), rtol=0, atol=0)
    saved = a.state_dict()
    second = torch.randn(4, generator=a.on("cpu"))
    b = MethodGenerator(3)
    b.load_state_dict(saved)  # before first use: applied when the generator is created
    torch.testing.assert_close(torch.randn(4, generator=b.on("cpu")), second, rtol=0, atol=0)
    a.load_state_dict(None)  # back to the seed
    torch.testing.assert_close(torch.randn(4, generator=a.on("cpu")), first, rtol=0, atol=0)


# --------------------------------------------------------------------------- the step's data flow


def _count_backward_calls(monkeypatch):
    """Count the autograd engine's backward/grad entries (every ``backward()`` and ``autograd.grad``)."""
    import torch.autograd as autograd_pkg

    calls = []
    real = autograd_pkg._engine_run_backward

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(autograd_pkg, "_engine_run_backward", counting)
    return calls


@pytest.mark.parametrize("method", ["bp", "dfa", "grape", "drtp", "dkp"])
@pytest.mark.parametrize("head", [False, True])
def test_a_direct_feedback_step_is_one_backward_call_like_bp(method, head, monkeypatch):
    # e = dL/dy, the head's gradients and every block's signal all come out of loss.backward();
    # with a Head marker too (e = dL/dz there). GrAPE's estimate runs without autograd.
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8), nn.Tanh(), bpfree.FeedbackPoint(), nn.Linear(8, 8), nn.Tanh(),
              bpfree.FeedbackPoint(), nn.Linear(8, 5)]
    if head:
        layers += [bpfree.Head(), nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers)
    m = bpfree.methods.create(method, model)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    m.step(x, y, F.cross_entropy)  # the first step creates B_l
    calls = _count_backward_calls(monkeypatch)
    for _ in range(4):  # GrAPE's update step is one of these (every=4)
        model.zero_grad()
        m.step(x, y, F.cross_entropy)
    assert len(calls) == 4
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("method", ["bp", "dfa", "grape", "dkp", "drtp", "fa", "usf", "brsf", "frsf", "pepita",
                                    "fg-weight", "fg-activity"])
def test_a_step_leaves_nothing_on_the_method_but_its_declared_state(method, blobs):
    # What lasts across steps is method.state; a step adds no attribute, and no other attribute
    # holds a tensor (nothing of one step is parked for the next call).
    x, y = blobs
    torch.manual_seed(0)
    model = bpfree.models.create("mlp", (x.shape[1],), int(y.max()) + 1, widths=(8, 8))
    m = bpfree.methods.create(method, model)
    before = set(vars(m))
    for _ in range(3):
        model.zero_grad()
        m.step(x[:16], y[:16], F.cross_entropy)
    assert set(vars(m)) == before
    for name, value in vars(m).items():
        if name != "state":
            assert not isinstance(value, torch.Tensor), name
            if isinstance(value, dict):
                assert not any(isinstance(v, torch.Tensor) for v in value.values()), name


def test_state_is_declared_once_and_checked_on_load(blobs):
    x, y = blobs
    model = bpfree.models.create("mlp", (x.shape[1],), int(y.max()) + 1, widths=(8,))
    m = bpfree.methods.create("grape", model)
    m.step(x[:16], y[:16], F.cross_entropy)
    assert sorted(m.state) == ["calibrate_epoch", "calibrate_next", "feedback", "feedback_grad_norm", "generator",
                               "jacobian", "norm0", "steps"]
    with pytest.raises(AttributeError, match="not a declared state entry"):
        m.state.pending = 1
    with pytest.raises(ValueError, match="checkpoint holds"):
        m.load_state_dict({**m.state_dict(), "pending": 1})
    with pytest.raises(ValueError, match="points this model lacks"):
        m.load_state_dict({"feedback": {"nowhere": torch.zeros(8, 3)}})
    # a saved state is a copy: changing the method afterwards leaves it as it was
    saved = m.state_dict()
    (point,) = m.state.feedback
    m.state.feedback[point].add_(1.0)
    assert not torch.equal(saved["feedback"][point], m.state.feedback[point])
    m.load_state_dict(saved)
    torch.testing.assert_close(m.state.feedback[point], saved["feedback"][point], rtol=0, atol=0)
    assert m.state.jacobian.count == saved["jacobian"]["count"]


def test_probe_signals_are_the_signals_a_step_delivers(blobs):
    # B_l e for every point with the current B_l, with .grad filled as by a step, and no state change
    x, y = blobs
    torch.manual_seed(0)
    model = bpfree.models.create("mlp", (x.shape[1],), int(y.max()) + 1, widths=(8, 8))
    m = bpfree.methods.create("dfa", model)
    m.step(x[:16], y[:16], F.cross_entropy)
    state = m.state_dict()
    model.zero_grad()
    signals = m.probe_signals(x[:16], y[:16], F.cross_entropy)
    out = model(x[:16]).detach().requires_grad_()
    (e,) = torch.autograd.grad(F.cross_entropy(out, y[:16]), out)
    assert set(signals) == set(m.state.feedback)
    for name, B in m.state.feedback.items():
        torch.testing.assert_close(signals[name], e @ B.t(), rtol=1e-6, atol=1e-8)
    assert m.state.steps == state["steps"]


def test_under_autocast_the_signal_is_projected_in_float32():
    # h_l and e are bfloat16 under autocast; the link multiplies by B_l in float32, so the signal
    # block l receives is (e B_l^T computed in float32) rounded once to bfloat16, not a bfloat16
    # product of a rounded B_l.
    torch.manual_seed(0)
    model = one_hidden()
    dfa = bpfree.methods.create("dfa", model)
    x, y = torch.randn(9, 7), torch.randint(0, 3, (9,))
    dfa.step(x, y, F.cross_entropy)  # B_l exists from here on
    seen = {}
    point = model[2]
    def watch(mod, args, out):  # the gradient h_l receives is the signal of its block
        args[0].register_hook(lambda g: seen.setdefault("signal", g))

    handle = point.register_forward_hook(watch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        record = dfa.forward_cut(x)
        dfa.deliver(record, F.cross_entropy(record.output, y))
    handle.remove()
    e, B = record.delivery.error, dfa.state.feedback["2"]
    assert e.dtype == torch.bfloat16 and seen["signal"].dtype == torch.bfloat16
    want = (e.float() @ B.t()).to(torch.bfloat16)
    torch.testing.assert_close(seen["signal"], want, rtol=0, atol=0)
    assert not torch.equal(want, e @ B.t().to(torch.bfloat16))  # the test can tell the two apart


def test_a_generator_state_from_another_device_reseeds_with_a_warning():
    # A CUDA generator state (16 bytes: seed and offset) cannot drive a CPU generator (5056 bytes of
    # Mersenne-twister state) or the reverse. Resuming on the other kind of device draws from the
    # documented seed derived from the saved bytes, the same on every resume, and says so.
    from bpfree.methods.base import reseed_from

    foreign = torch.arange(16, dtype=torch.uint8)  # the shape of a CUDA generator's state
    expected = torch.randn(5, generator=torch.Generator().manual_seed(reseed_from(foreign)))
    for _ in range(2):
        g = MethodGenerator(3)
        g.load_state_dict(foreign)
        with pytest.warns(RuntimeWarning, match="another kind of device.*reseeded"):
            drawn = torch.randn(5, generator=g.on("cpu"))
        torch.testing.assert_close(drawn, expected, rtol=0, atol=0)
    # a state of the right kind still continues the stream exactly, without a warning
    a = MethodGenerator(3)
    torch.randn(4, generator=a.on("cpu"))
    b = MethodGenerator(3)
    b.load_state_dict(a.state_dict())
    import warnings as w
    with w.catch_warnings():
        w.simplefilter("error")
        torch.testing.assert_close(torch.randn(4, generator=b.on("cpu")), torch.randn(4, generator=a.on("cpu")),
                                   rtol=0, atol=0)
    assert reseed_from(foreign) == int.from_bytes(__import__("hashlib").sha256(bytes(range(16))).digest()[:8],
                                                  "little") & (2**63 - 1)


class _PerTokenHeads(nn.Module):
    """(batch, T, 4) -> point on (batch, T, 2, 3) -> (batch, T, 5): feedback per token over 6 features."""

    def __init__(self):
        super().__init__()
        self.a, self.point, self.b = nn.Linear(4, 6), bpfree.FeedbackPoint(), nn.Linear(6, 5)

    def forward(self, x):
        h = torch.tanh(self.a(x)).reshape(x.shape[0], x.shape[1], 2, 3)
        return self.b(self.point(h).reshape(x.shape[0], x.shape[1], 6))


def _two_steps_same_grads(model, method, x, y, loss_fn):
    # The first step (no B_l yet: e through the head, then one call with every signal) and the
    # second (links into the tap) must deliver the same signals with the same B_l: equal .grad.
    m = bpfree.methods.create(method, model)
    grads = []
    for _ in range(2):
        model.zero_grad()
        m.step(x, y, loss_fn)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return m


@pytest.mark.parametrize("method", ["dfa", "drtp"])
def test_both_deliveries_agree_on_a_per_token_point_with_several_feature_dims(method):
    torch.manual_seed(0)
    x, y = torch.randn(3, 7, 4), torch.randint(0, 5, (3, 7))
    lm = lambda out, t: F.cross_entropy(out.reshape(-1, 5), t.reshape(-1))
    m = _two_steps_same_grads(_PerTokenHeads(), method, x, y, lm)
    assert m.state.feedback["point"].shape == (6, 5)  # per token: n_l = 2 * 3


def test_a_point_the_forward_pass_skips_leaves_the_others_linked(monkeypatch):
    # A declared point that this forward pass never visits gets no B_l; the visited ones are still
    # linked (one backward call per step from the second on) and the diagnostics still probe them.
    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.spare = one_hidden(), bpfree.FeedbackPoint()  # spare: never called

        def forward(self, x):
            return self.net(x)

    model = WithSpare()
    x, y = torch.randn(9, 7), torch.randint(0, 3, (9,))
    m = _two_steps_same_grads(model, "dfa", x, y, F.cross_entropy)
    assert set(m.state.feedback) == {"net.2"}
    calls = _count_backward_calls(monkeypatch)
    model.zero_grad()
    m.step(x, y, F.cross_entropy)
    assert len(calls) == 1
    assert set(m.probe_signals(x, y, F.cross_entropy)) == {"net.2"}


def test_feedback_for_another_output_width_is_refused_by_name():
    torch.manual_seed(0)
    three = bpfree.methods.create("dfa", one_hidden())
    three.step(torch.randn(4, 7), torch.randint(0, 3, (4,)), F.cross_entropy)
    four = nn.Sequential(nn.Linear(7, 5), nn.Tanh(), bpfree.FeedbackPoint(), nn.Linear(5, 4))
    m = bpfree.methods.create("dfa", four)
    m.load_state_dict(three.state_dict())
    with pytest.raises(ValueError, match=r"point '2' projects 4 outputs now, but its feedback matrix is \(5, 3\)"):
        m.step(torch.randn(4, 7), torch.randint(0, 4, (4,)), F.cross_entropy)


@pytest.mark.parametrize("method", ["dfa", "grape"])
def test_peak_step_memory_is_bps_with_a_vocabulary_wide_error(method):
    # e at the logits of a language model (o = vocabulary): a link per point must not hold a
    # (batch, T, o) value; the step's peak stays within BP's plus e itself.
    V = 4000
    x, y = torch.randint(0, V, (4, 16)), torch.randint(0, V, (4, 16))
    lm = lambda out, t: F.cross_entropy(out.reshape(-1, V), t.reshape(-1))
    peaks = {}
    for name in ("bp", method):
        torch.manual_seed(0)
        model = bpfree.models.create("transformer", (16,), V, depth=6, d_model=32, heads=4, error_at="logits")
        m = bpfree.methods.create(name, model)
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            m.step(x, y, lm)
        model.zero_grad(set_to_none=True)
        peaks[name] = _peak_live_bytes(lambda: m.step(x, y, lm))
    e_bytes = 4 * 16 * V * 4
    assert peaks[method] <= peaks["bp"] + e_bytes + 16, peaks
