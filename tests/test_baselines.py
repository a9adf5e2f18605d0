"""The baseline zoo: FA, sign symmetry (uSF/brSF/frSF), DKP, DRTP, PEPITA, forward gradients.

Every expected value is computed here by hand (closed forms written out with plain tensor
operations, or plain ``loss.backward()`` for BP references), never taken from the method's output.
Hand-sized networks run in float64 so that formula checks hold to ~1e-12.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bpfree import methods
from bpfree.models.mlp import MLP
from bpfree.points import FeedbackPoint
from bpfree.train.config import resolve
from bpfree.train.loop import Run, resume

DT = torch.float64
ZOO = ["fa", "usf", "brsf", "frsf", "dkp", "drtp", "pepita", "fg-weight", "fg-activity"]



def close(a, b, tol=1e-10):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def bp_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Reference: plain ``loss.backward()`` on a copy of ``model``."""
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    return [p.grad.clone() for p in ref.parameters()]


def two_layer(points: bool = True, n_in: int = 4, hidden: int = 3, o: int = 2, seed: int = 0) -> nn.Sequential:
    """``Linear(n_in, hidden) -> tanh -> [point] -> Linear(hidden, o)`` in float64."""
    torch.manual_seed(seed)
    layers = [nn.Linear(n_in, hidden), nn.Tanh()] + ([FeedbackPoint()] if points else []) + [nn.Linear(hidden, o)]
    return nn.Sequential(*layers).to(DT)


def batch(n: int = 5, n_in: int = 4, o: int = 2, seed: int = 1, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g, dtype=DT).requires_grad_(grad)
    y = torch.randint(0, o, (n,), generator=g)
    return x, y


def forward_by_hand(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor):
    """``(h1, e)`` of the two-layer net: ``h1 = tanh(x W1^T + b1)``, ``e = (softmax(y) - onehot) / N``."""
    W1, b1, W2, b2 = (p.detach() for p in model.parameters())
    h1 = torch.tanh(x.detach() @ W1.t() + b1)
    out = h1 @ W2.t() + b2
    e = (torch.softmax(out, 1) - F.one_hot(y, out.shape[1]).to(DT)) / len(y)
    return h1, e


# ------------------------------------------------------------------------------------------
# FA
# ------------------------------------------------------------------------------------------


def conv_net() -> nn.Sequential:
    """Stride, groups, dilation, 'same' and reflect padding, BatchNorm, pooling and a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect"), nn.ReLU(), FeedbackPoint(),
        nn.Conv2d(4, 4, 4, stride=2, padding=1, groups=2), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 3, 4, padding="same", dilation=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(3 * 2 * 2, 3),
    ).to(DT)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_fa_with_B_equal_to_W_is_backprop(kind):
    """FA replaces only W by B in the input gradient: with B = W every gradient is BP's."""
    if kind == "mlp":
        torch.manual_seed(0)
        model = MLP(12, (7, 5), 3, activation="tanh").to(DT)
        x = torch.randn(6, 3, 4, dtype=DT)
    else:
        model = conv_net()
        x = torch.randn(5, 2, 8, 8, dtype=DT)
    y = torch.randint(0, 3, (x.shape[0],))
    ref = copy.deepcopy(model)
    xr = x.clone().requires_grad_()
    F.cross_entropy(ref(xr), y).backward()
    fa = methods.create("fa", model)
    assert len(fa.layers) == (3 if kind == "mlp" else 4)
    for name, m in fa.layers:
        fa.state.backward[name] = m.weight.detach().clone()
    xm = x.clone().requires_grad_()
    fa.step(xm, y, F.cross_entropy)
    for p, q in zip(model.parameters(), ref.parameters()):
        close(p.grad, q.grad)
    close(xm.grad, xr.grad)
    # the layers are plain again, and BatchNorm statistics moved exactly as under BP
    assert all("forward" not in m.__dict__ for _, m in fa.layers)
    for a, b in zip(model.buffers(), ref.buffers()):
        close(a, b)


def test_fa_gradients_match_the_formula():
    """dW2 = e^T h1; delta1 = (e B2) * tanh'(a1); dW1 = delta1^T x; dx = delta1 B1 (not W1, W2)."""
    model = two_layer(points=False)
    x, y = batch(grad=True)
    fa = methods.create("fa", model, seed=3)
    fa.step(x, y, F.cross_entropy)
    W1, b1, W2, b2 = model.parameters()
    h1, e = forward_by_hand(model, x, y)
    B1, B2 = fa.state.backward["0"], fa.state.backward["2"]
    delta1 = (e @ B2) * (1 - h1**2)
    close(W2.grad, e.t() @ h1)
    close(b2.grad, e.sum(0))
    close(W1.grad, delta1.t() @ x.detach())
    close(b1.grad, delta1.sum(0))
    close(x.grad, delta1 @ B1)
    # B is fixed random, not W: the hidden gradient differs from BP's
    assert not torch.allclose(W1.grad, bp_grads(model, x.detach(), y)[0])


def test_fa_backward_matrices_have_the_default_init_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 300), nn.ReLU(), nn.Linear(300, 10))
    for init in ("uniform", "normal"):
        fa = methods.create("fa", model, init=init, scale=2.0)
        B = fa.state.backward["0"]
        assert B.shape == (300, 400)
        # U(-a, a) with a = scale / sqrt(fan_in): variance a^2 / 3
        assert abs(B.var().item() / (4.0 / 400 / 3) - 1) < 0.03
        if init == "uniform":
            assert B.abs().max() <= 2.0 / math.sqrt(400)
    # a different seed gives a different B; the same seed the same
    assert torch.equal(methods.create("fa", model).state.backward["2"], methods.create("fa", model).state.backward["2"])
    assert not torch.equal(methods.create("fa", model, seed=1).state.backward["2"], methods.create("fa", model).state.backward["2"])


def test_fa_restores_the_layers_when_the_forward_pass_fails():
    model = two_layer(points=False)
    fa = methods.create("fa", model)
    with pytest.raises(ValueError, match="cannot take input of shape"):
        fa.step(torch.randn(5, 7, dtype=DT), torch.zeros(5, dtype=torch.long), F.cross_entropy)
    assert all("forward" not in m.__dict__ for _, m in fa.layers)
    model(torch.randn(2, 4, dtype=DT))  # the ordinary forward still works


# ------------------------------------------------------------------------------------------
# sign symmetry
# ------------------------------------------------------------------------------------------


def expected_scale(W: torch.Tensor, scale: str) -> float:
    if scale == "rms":
        return float(W.norm() / math.sqrt(W.numel()))
    if scale == "init":
        return 1.0 / math.sqrt(3 * W.shape[1])
    return 1.0


@pytest.mark.parametrize("scale", ["rms", "init", "unit"])
def test_usf_one_layer_matches_the_formula(scale):
    """One Linear: dx = e (sign(W) s), dW = e^T x, db = sum e."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    x, y = batch(o=3, grad=True)
    methods.create("usf", model, scale=scale).step(x, y, F.cross_entropy)
    W, b = (p.detach() for p in model.parameters())
    out = x.detach() @ W.t() + b
    e = (torch.softmax(out, 1) - F.one_hot(y, 3).to(DT)) / len(y)
    close(x.grad, e @ (torch.sign(W) * expected_scale(W, scale)))
    close(model[0].weight.grad, e.t() @ x.detach())
    close(model[0].bias.grad, e.sum(0))


@pytest.mark.parametrize("scale", ["rms", "init"])
def test_usf_two_layers_matches_the_formula(scale):
    """dW1 = ((e sign(W2) s2) * tanh'(a1))^T x; dW2 = e^T h1 (BP's)."""
    model = two_layer(points=True)  # the point is ignored (identity) under usf
    x, y = batch()
    methods.create("usf", model, scale=scale).step(x, y, F.cross_entropy)
    W1, b1, W2, b2 = model.parameters()
    h1, e = forward_by_hand(model, x, y)
    B2 = torch.sign(W2.detach()) * expected_scale(W2.detach(), scale)
    delta1 = (e @ B2) * (1 - h1**2)
    close(W1.grad, delta1.t() @ x)
    close(b1.grad, delta1.sum(0))
    close(W2.grad, e.t() @ h1)
    if scale == "rms":  # |B|_F = |W|_F: the backward keeps BP's magnitude
        close(B2.norm(), W2.detach().norm())


def test_frsf_and_brsf_use_sign_of_W_times_random_magnitudes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).to(DT)
    W = model[0].weight.detach()
    s = float(W.norm() / math.sqrt(W.numel()))
    # frSF: fixed |R|, the same at every step
    x, y = batch(o=3, grad=True)
    fr = methods.create("frsf", model)
    M = fr.state.magnitudes["0"].clone()
    assert (M >= 0).all()
    fr.step(x, y, F.cross_entropy)
    out = x.detach() @ W.t() + model[0].bias.detach()
    e = (torch.softmax(out, 1) - F.one_hot(y, 3).to(DT)) / len(y)
    close(x.grad, e @ (torch.sign(W) * M * s))
    assert torch.equal(fr.state.magnitudes["0"], M)
    # brSF: |R| drawn afresh each step from the method's generator: regenerate it here
    br = methods.create("brsf", model, seed=7)
    state = br.state.generator.on(W.device).get_state()
    x.grad = None
    br.step(x, y, F.cross_entropy)
    g = torch.Generator().manual_seed(0)
    g.set_state(state)
    R1 = torch.randn(W.shape, generator=g, dtype=DT).abs()
    close(x.grad, e @ (torch.sign(W) * R1 * s))
    x.grad = None
    br.step(x, y, F.cross_entropy)
    R2 = torch.randn(W.shape, generator=g, dtype=DT).abs()
    close(x.grad, e @ (torch.sign(W) * R2 * s))
    assert not torch.allclose(R1, R2)


def test_sign_family_magnitudes_have_unit_second_moment():
    """E[M^2] = 1, so E|B|_F^2 = |W|_F^2 under scale=rms (20000 entries: std of the mean ~0.01)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100))
    for name in ("brsf", "frsf"):
        m = methods.create(name, model)
        B = m.backward_weight("0", model[0])
        W = model[0].weight.detach()
        assert torch.equal(torch.sign(B), torch.sign(W))
        assert abs((B.norm() / W.norm()).item() ** 2 - 1) < 0.05


# ------------------------------------------------------------------------------------------
# DRTP and DKP
# ------------------------------------------------------------------------------------------

B_HAND = torch.tensor([[0.5, -1.0], [2.0, 0.25], [-0.75, 1.5]], dtype=DT)  # (n_1, o) = (3, 2)


def test_drtp_matches_the_formula():
    """delta1 = (B y*/N) * tanh'(a1), dW1 = delta1^T x; the head keeps its true gradient e^T h1."""
    model = two_layer()
    x, y = batch()
    m = methods.create("drtp", model)
    m.state.feedback["2"] = B_HAND.clone()
    m.step(x, y, F.cross_entropy)
    W1, b1, W2, b2 = model.parameters()
    h1, e = forward_by_hand(model, x, y)
    target = F.one_hot(y, 2).to(DT) / len(y)
    delta1 = (target @ B_HAND.t()) * (1 - h1**2)
    close(W1.grad, delta1.t() @ x)
    close(b1.grad, delta1.sum(0))
    close(W2.grad, e.t() @ h1)
    close(b2.grad, e.sum(0))


def test_drtp_creates_feedback_over_the_classes():
    model = two_layer(o=3)
    x, y = batch(o=3)
    m = methods.create("drtp", model)
    m.step(x, y, F.cross_entropy)
    assert m.state.feedback["2"].shape == (3, 3)


def test_drtp_needs_integer_class_labels():
    model = two_layer()
    x, _ = batch()
    m = methods.create("drtp", model)
    with pytest.raises(ValueError, match="integer labels"):
        m.step(x, torch.rand(5, 2, dtype=DT), lambda out, t: ((out - t) ** 2).mean())
    with pytest.raises(ValueError, match=r"outside the 2 classes"):
        m.step(x, torch.tensor([0, 1, 2, 0, 1]), F.cross_entropy)
    with pytest.raises(ValueError, match="one integer label per output row"):
        m.step(x, torch.zeros(5, 2, dtype=torch.long), lambda out, t: out.sum())
    assert all(p.grad is None for p in model.parameters())  # refused before any gradient


def test_dkp_matches_the_formula():
    """Step t: DFA with B_t; then B_{t+1} = B_t - eta (h1^T e + wd B_t). Checked over two steps."""
    eta, wd = 0.3, 0.1
    model = two_layer()
    x, y = batch()
    m = methods.create("dkp", model, eta=eta, weight_decay=wd)
    m.state.feedback["2"] = B_HAND.clone()
    B = B_HAND.clone()
    W1, b1, W2, b2 = model.parameters()
    for _ in range(2):
        for p in model.parameters():
            p.grad = None
        m.step(x, y, F.cross_entropy)
        h1, e = forward_by_hand(model, x, y)
        delta1 = (e @ B.t()) * (1 - h1**2)  # the signal uses this step's B, before its update
        close(W1.grad, delta1.t() @ x)
        close(W2.grad, e.t() @ h1)
        B = B - eta * (h1.t() @ e + wd * B)
        close(m.state.feedback["2"], B)
        with torch.no_grad():  # move the weights so the second step sees new h1, e
            for p in model.parameters():
                p -= 0.5 * p.grad


def test_dkp_feedback_follows_the_transposed_head_update():
    """At the last hidden point the DKP step is exactly minus eta times the head's weight gradient, transposed."""
    model = two_layer()
    x, y = batch()
    m = methods.create("dkp", model, eta=1.0, weight_decay=0.0)
    m.state.feedback["2"] = B_HAND.clone()
    m.step(x, y, F.cross_entropy)
    close(m.state.feedback["2"], B_HAND - model[3].weight.grad.t())


# ------------------------------------------------------------------------------------------
# PEPITA
# ------------------------------------------------------------------------------------------


def test_pepita_matches_the_closed_form_on_two_layers():
    """x_mod = x + F e~ (e~ = softmax - onehot); dW1 = mean (h1 - h1_mod) x_mod^T; dW2 = mean e~ h1_mod^T."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), FeedbackPoint(), nn.Linear(4, 3)).to(DT)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 5, generator=g, dtype=DT)
    y = torch.randint(0, 3, (6,), generator=g)
    Fm = torch.randn(5, 3, generator=g, dtype=DT)  # a large F so that the passes differ visibly
    m = methods.create("pepita", model)
    m.state.F = Fm.clone()
    res = m.step(x, y, F.cross_entropy)
    W1, b1, W2, b2 = (p.detach() for p in model.parameters())
    h1 = torch.tanh(x @ W1.t() + b1)
    out = h1 @ W2.t() + b2
    err = torch.softmax(out, 1) - F.one_hot(y, 3).to(DT)  # per-sample error
    x_mod = x + err @ Fm.t()
    h1m = torch.tanh(x_mod @ W1.t() + b1)
    N = len(y)
    close(model[0].weight.grad, (h1 - h1m).t() @ x_mod / N)
    close(model[0].bias.grad, (h1 - h1m).mean(0))
    close(model[3].weight.grad, err.t() @ h1m / N)
    close(model[3].bias.grad, err.mean(0))
    close(res.loss, F.cross_entropy(out, y))
    close(res.output, out)


def test_pepita_matches_the_closed_form_with_one_conv_layer():
    """The conv update correlates (h1 - h1_mod) with patches of x_mod (F.unfold), i.e. the same outer product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), FeedbackPoint(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(2 * 3 * 3, 3)).to(DT)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 1, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 3, (4,), generator=g)
    Fm = torch.randn(64, 3, generator=g, dtype=DT) * 0.5
    m = methods.create("pepita", model)
    m.state.F = Fm.clone()
    m.step(x, y, F.cross_entropy)
    Wc, bc, W2, b2 = (p.detach() for p in model.parameters())
    N = len(y)

    def conv(inp):  # 3x3 valid convolution by patches: (N, 2, 6, 6)
        patches = F.unfold(inp, 3)  # (N, 9, 36)
        return (Wc.reshape(2, 9) @ patches + bc[:, None]).reshape(N, 2, 6, 6), patches

    a1, _ = conv(x)
    h1 = a1.clamp_min(0)
    out = F.max_pool2d(h1, 2).flatten(1) @ W2.t() + b2
    err = torch.softmax(out, 1) - F.one_hot(y, 3).to(DT)
    x_mod = x + (err @ Fm.t()).reshape(x.shape)
    a1m, patches_m = conv(x_mod)
    h1m = a1m.clamp_min(0)
    pm = F.max_pool2d(h1m, 2).flatten(1)
    diff = (h1 - h1m).reshape(N, 2, 36) / N
    close(model[0].weight.grad, torch.einsum("ncl,nkl->ck", diff, patches_m).reshape(2, 1, 3, 3))
    close(model[0].bias.grad, diff.sum((0, 2)))
    close(model[5].weight.grad, err.t() @ pm / N)
    close(model[5].bias.grad, err.mean(0))


def test_pepita_projection_scale():
    torch.manual_seed(0)
    model = MLP(100, (8,), 4)
    m = methods.create("pepita", model, f_scale=0.05)
    m.step(torch.randn(3, 100), torch.tensor([0, 1, 2]), F.cross_entropy)
    a = 0.05 * math.sqrt(6 / 100)
    assert m.state.F.shape == (100, 4) and m.state.F.abs().max() <= a and m.state.F.abs().max() > 0.9 * a


@pytest.mark.parametrize("bad, match", [
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(32, 3)),
     "at most one convolutional layer"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2)), "BatchNorm1d"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5), nn.Linear(3, 2)), "Dropout"),
    (lambda: nn.Sequential(nn.Linear(4, 3), nn.PReLU(), nn.Linear(3, 2)), "PReLU"),
    (lambda: nn.Sequential(nn.ReLU()), "at least one"),
])
def test_pepita_refuses_what_it_cannot_train(bad, match):
    with pytest.raises(ValueError, match=match):
        methods.create("pepita", bad())


def test_pepita_needs_a_sequential_chain():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x))) + x[:, :2]

    with pytest.raises(ValueError, match="needs an nn.Sequential"):
        methods.create("pepita", Custom())


# ------------------------------------------------------------------------------------------
# forward gradients
# ------------------------------------------------------------------------------------------


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def test_fg_weight_is_unbiased():
    """Mean of K = 1500 estimates (g.v) v vs the BP gradient.

    For v ~ N(0, I_P), Var[(g.v) v_j] = |g|^2 + g_j^2, so the mean's relative error has rms
    sqrt((P + 1) / K) = 0.13 for P = 26; we require < 0.3 and cosine > 0.95.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (8,), generator=g)
    ref = flat(bp_grads(model, x, y))
    res = methods.create("fg-weight", model, samples=1500).step(x, y, F.cross_entropy)
    est = flat(p.grad for p in model.parameters())
    assert (est - ref).norm() / ref.norm() < 0.3
    assert F.cosine_similarity(est, ref, 0) > 0.95
    close(res.loss, F.cross_entropy(model(x), y))


def test_fg_weight_single_sample_matches_its_closed_form():
    """With K = 1 the estimate is exactly (grad L . v) v for the v the method draws (regenerated here)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    ref = bp_grads(model, x, y)
    m = methods.create("fg-weight", model, seed=4)
    state = m.state.generator.on(torch.device("cpu")).get_state()
    m.step(x, y, F.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    v = [torch.randn(p.shape, generator=gen, dtype=DT) for p in model.parameters()]
    dd = sum((a * b).sum() for a, b in zip(ref, v))
    for p, vi in zip(model.parameters(), v):
        close(p.grad, dd * vi)


def deep_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), FeedbackPoint(), nn.Linear(5, 4), nn.Tanh(), FeedbackPoint(),
                         nn.Linear(4, 2)).to(DT)


@pytest.mark.parametrize("points, draws, tol", [("each", 600, 0.3), ("joint", 1000, 0.5)])
def test_fg_activity_is_unbiased(points, draws, tol):
    """Mean of K activity estimates, backpropagated inside blocks, vs BP's weight gradients.

    Each per-sample estimate s d (d ~ N(0, I_n)) has relative variance about n + 1 (n <= 5 here);
    600 draws leave a relative error of about 0.1 per hidden tensor (tolerance 0.3). In joint mode
    the other point's tangents add zero-mean cross terms, several times larger than the first
    block's small gradient: 1000 draws give about 0.2 there (tolerance 0.5). Overall cosine > 0.95;
    the head's gradient is exact.
    """
    model = deep_net()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (8,), generator=g)
    ref = bp_grads(model, x, y)
    methods.create("fg-activity", model, samples=draws, points=points).step(x, y, F.cross_entropy)
    est = [p.grad for p in model.parameters()]
    for a, b in zip(est, ref):
        assert (a - b).norm() / b.norm() < tol
    close(est[-2], ref[-2])  # head weight: its true gradient
    assert F.cosine_similarity(flat(est), flat(ref), 0) > 0.95


def test_fg_activity_single_draw_matches_its_closed_form():
    """One point, linear head: u = d W2^T, s_i = e_i . u_i, g_i = s_i d_i; dW1 = (g * tanh'(a1))^T x."""
    model = two_layer()
    x, y = batch()
    m = methods.create("fg-activity", model, seed=2)
    state = m.state.generator.on(torch.device("cpu")).get_state()
    m.step(x, y, F.cross_entropy)
    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    d = torch.randn(5, 3, generator=gen, dtype=DT)
    W1, b1, W2, b2 = model.parameters()
    h1, e = forward_by_hand(model, x, y)
    s = ((d @ W2.detach().t()) * e).sum(1)
    delta1 = (s[:, None] * d) * (1 - h1**2)
    close(W1.grad, delta1.t() @ x)
    close(W2.grad, e.t() @ h1)


@pytest.mark.parametrize("points", ["each", "joint"])
def test_fg_activity_with_batchnorm_updates_running_statistics_once(points):
    """The estimate passes must neither move BatchNorm's statistics nor break the training graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), FeedbackPoint(), nn.Linear(5, 2)).to(DT)
    x, y = torch.randn(8, 3, dtype=DT), torch.randint(0, 2, (8,))
    ref = copy.deepcopy(model)
    ref(x)  # one training forward: what a step should do to the statistics
    methods.create("fg-activity", model, samples=3, points=points).step(x, y, F.cross_entropy)
    for a, b in zip(model.buffers(), ref.buffers()):
        close(a, b)
    assert all(p.grad is not None for p in model.parameters())


# ------------------------------------------------------------------------------------------
# every method: trains, refuses what it cannot train, resumes, can be probed
# ------------------------------------------------------------------------------------------


def separable(n: int = 256, dim: int = 10, classes: int = 3):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(dim, classes, generator=g)
    x = torch.randn(n, dim, generator=g)
    return x, (x @ W).argmax(1)


@pytest.mark.parametrize("name", ZOO)
def test_every_method_trains_a_tiny_mlp(name):
    """A linearly separable 3-class problem, MLP 10-32-32-3, Adam lr 1e-2, 80 steps of 64.

    fg-weight perturbs all 1507 parameters at once (gradient cosine ~ 1/sqrt(P) per draw): it
    averages 8 draws per step here.
    """
    x, y = separable()
    torch.manual_seed(1)
    model = MLP(10, (32, 32), 3)
    m = methods.create(name, model, **({"samples": 8} if name == "fg-weight" else {}))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for step in range(80):
        i = (step % 4) * 64
        opt.zero_grad()
        res = m.step(x[i:i + 64], y[i:i + 64], F.cross_entropy)
        opt.step()
        losses.append(float(res.loss))
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.7


class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.attn(h, h, h)[0].mean(1))


class OwnLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


@pytest.mark.parametrize("name", ["fa", "usf", "brsf", "frsf"])
def test_fa_family_refuses_layers_it_cannot_convert(name):
    with pytest.raises(ValueError, match=r"attn \(MultiheadAttention\)"):
        methods.create(name, WithAttention())
    with pytest.raises(ValueError, match=r"Bilinear"):
        methods.create(name, nn.Sequential(nn.Linear(4, 4), nn.Bilinear(4, 4, 2)))
    with pytest.raises(ValueError, match=r"OwnLinear"):
        methods.create(name, nn.Sequential(OwnLinear(4, 2)))
    with pytest.raises(ValueError, match="lazy"):
        methods.create(name, nn.Sequential(nn.LazyLinear(2)))
    with pytest.raises(ValueError, match="at least one nn.Linear"):
        methods.create(name, nn.Sequential(nn.ReLU()))
    # norm layers, embeddings and parameter-free modules are fine
    methods.create(name, nn.Sequential(nn.Embedding(5, 4), nn.LayerNorm(4), nn.Linear(4, 2)))


@pytest.mark.parametrize("name", ["dkp", "drtp", "fg-activity"])
def test_direct_methods_need_feedback_points(name):
    with pytest.raises(ValueError, match="needs feedback points"):
        methods.create(name, nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)))


def test_fg_weight_needs_parameters_and_options_are_checked():
    frozen = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        methods.create("fg-weight", frozen)
    for name in ("fg-weight", "fg-activity"):
        with pytest.raises(ValueError, match="samples"):
            methods.create(name, deep_net(), samples=0)
    with pytest.raises(ValueError, match="scale"):
        methods.create("usf", nn.Linear(3, 2), scale="huge")
    with pytest.raises(ValueError, match="eta"):
        methods.create("dkp", deep_net(), eta=-1)


def loop_cfg(method: str, **over):
    sets = [f"{k}={v}" for k, v in over.items()]
    return resolve({"run": {"dataset": "blobs-test", "model": "mlp", "epochs": 2, "batch_size": 32,
                            "limit_train": 128, "limit_test": 64, "lr": 0.01, "method": method},
                    "model": {"widths": [16, 16]}}, sets)


@pytest.mark.parametrize("name", ["brsf", "frsf", "dkp", "drtp", "pepita", "fg-weight", "fg-activity"])
def test_resumed_and_probed_runs_match_the_plain_run(tmp_path, name):
    """State round trip through checkpoints, and diagnostics that leave training bit-identical."""
    plain = Run(loop_cfg(name, checkpoint_every=3), tmp_path / "plain", progress=False)
    plain.fit()
    part = Run(loop_cfg(name, checkpoint_every=3), tmp_path / "part", progress=False)
    real_step, calls = part.optimizer.step, [0]

    def stop_after_five(*a, **k):
        calls[0] += 1
        if calls[0] > 5:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    part.optimizer.step = stop_after_five
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resume(tmp_path / "part", progress=False)
    resumed = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    probed = Run(loop_cfg(name, diagnostics_every=3, probe_size=32), tmp_path / "probed", progress=False)
    probed.fit()
    for k, v in plain.model.state_dict().items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=0)
        torch.testing.assert_close(probed.model.state_dict()[k], v, rtol=0, atol=0)
    lines = [json.loads(l) for l in (tmp_path / "probed" / "metrics.jsonl").read_text().splitlines()]
    diag = [l for l in lines if l["kind"] == "diagnostics"]
    assert diag and all(-1 <= d["weight_grad_cos"] <= 1 for d in diag)


def test_zoo_is_registered():
    assert set(ZOO) <= set(methods.available())
    for name in ZOO:
        cls = methods.get(name)
        assert cls.summary and cls.__doc__
