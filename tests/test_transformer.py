"""The Transformer language model: shapes, causality, feedback points, and oracles for DFA and GrAPE.

Expected values come from what the code is meant to compute: BP gradients from ``loss.backward()``,
exact Jacobians from autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

import bpfree
from bpfree import models
from bpfree.feedback.estimators import sample_jacobians
from bpfree.models.transformer import TransformerLM
from bpfree.options import OptionError
from bpfree.points import Head, feedback_points, head_marker

V = 13



def lm(seed=0, **kw) -> TransformerLM:
    torch.manual_seed(seed)
    o = dict(depth=2, d_model=16, heads=2, dropout=0.0)
    o.update(kw)
    return models.create("transformer", (8,), V, **o)


def tokens(b=3, t=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g), torch.randint(0, V, (b, t), generator=g)


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("feedback", ["macro", "micro"])
@pytest.mark.parametrize("error_at", ["hidden", "logits"])
@pytest.mark.parametrize("tied", [True, False])
def test_shapes_points_and_head(feedback, error_at, tied):
    model = lm(feedback=feedback, error_at=error_at, tied=tied, depth=3)
    x, _ = tokens(b=2, t=5)  # shorter than the context
    assert model(x).shape == (2, 5, V)
    names = [n for n, _ in feedback_points(model)]
    if feedback == "macro":
        assert names == [f"blocks.{i}.point" for i in range(3)]
    else:
        assert names == [f"blocks.{i}.{p}" for i in range(3) for p in ("attn_point", "act_point", "point")]
    assert isinstance(head_marker(model), Head) == (error_at == "hidden")
    assert (model.proj.weight is model.embed.weight) == tied


@pytest.mark.parametrize("feedback,error_at", [("macro", "hidden"), ("micro", "hidden"), ("micro", "logits")])
def test_feedback_matrices_act_per_token(feedback, error_at):
    model = lm(feedback=feedback, error_at=error_at, d_ff=24)
    x, y = tokens()
    dfa = bpfree.methods.create("dfa", model)
    dfa.step(x, y, lm_loss)
    o = 16 if error_at == "hidden" else V
    for name, B in dfa.state.feedback.items():
        n = 24 if name.endswith("act_point") else 16
        assert B.shape == (n, o), name
    for p in model.parameters():  # every parameter is reached by some signal
        assert p.grad is not None and torch.isfinite(p.grad).all()


def test_options_and_input_errors():
    with pytest.raises(OptionError, match="divide"):
        models.create("transformer", (8,), V, d_model=10, heads=4)
    with pytest.raises(OptionError, match="feedback"):
        models.create("transformer", (8,), V, feedback="nano")
    with pytest.raises(ValueError, match=r"input_shape \(context,\)"):
        models.create("transformer", (1, 28, 28), V)
    with pytest.raises(ValueError, match="max_context"):
        models.create("transformer", (8,), V, max_context=4)
    model = lm()
    with pytest.raises(ValueError, match="1 to 8 tokens"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model(torch.full((1, 4), V))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    assert models.create("transformer", (8,), V, max_context=16).context == 16


# --------------------------------------------------------------------------- causality


def embedding_output(model):
    """A forward hook that keeps ``h_0`` (the dropout output after token + position embedding)."""
    kept = []
    handle = model.drop.register_forward_hook(lambda m, i, out: kept.append(out))
    return kept, handle


@pytest.mark.parametrize("feedback", ["macro", "micro"])
def test_output_at_t_depends_only_on_tokens_up_to_t(feedback):
    model = lm(feedback=feedback, depth=2)
    x, _ = tokens(b=2, t=8)
    kept, handle = embedding_output(model)
    out = model(x)
    handle.remove()
    h0 = kept[0]
    for t in range(8):
        (g,) = torch.autograd.grad(out[:, t].sum(), h0, retain_graph=True)
        assert torch.all(g[:, t + 1 :] == 0), f"output {t} depends on later tokens"
        assert torch.all(g[:, : t + 1].abs().sum(-1) > 0), f"output {t} ignores earlier tokens"


def test_forward_mode_path_is_causal_and_matches_the_fused_attention():
    # Under forward AD the attention is computed step by step (no fused kernel); its primal must
    # equal the fused result, and a tangent at token s must not reach outputs t < s.
    model = lm(depth=2)
    x, _ = tokens(b=2, t=8)
    with torch.no_grad():
        plain = model(x)
    s = 5
    first = model.blocks[0].point

    def inject(point, h):
        if point is first:
            d = torch.zeros_like(h)
            d[:, s:] = torch.randn_like(d[:, s:])
            return fwAD.make_dual(h, d)
        return h

    first.handler = inject
    try:
        with torch.no_grad(), fwAD.dual_level():
            y = model(x)
            primal, tangent = fwAD.unpack_dual(y)
    finally:
        first.handler = None
    torch.testing.assert_close(primal, plain, rtol=1e-5, atol=1e-6)
    assert torch.all(tangent[:, :s] == 0) and tangent[:, s:].abs().sum() > 0


# --------------------------------------------------------------------------- oracles


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("activation", ["gelu", "relu"])
def test_one_block_dfa_with_B_equal_to_J_transpose_gives_the_bp_gradients(tied, activation):
    # One block, macro point at its output h_1, Head right after it: z = h_1, so J = dz/dh_1 = I
    # for every token (and no cross-token term). DFA with B = J^T = I sends B e = e = J^T e: the BP
    # signal. Every parameter, the tied embedding included, must then get exactly the BP gradient.
    model = lm(depth=1, tied=tied, activation=activation)
    x, y = tokens(b=4)
    bpfree.methods.create("bp", model).step(x, y, lm_loss)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    dfa = bpfree.methods.create("dfa", model)
    dfa.state.feedback = {"blocks.0.point": torch.eye(16)}
    result = dfa.step(x, y, lm_loss)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)
    torch.testing.assert_close(result.loss, lm_loss(model(x), y))


def test_one_block_dfa_with_a_random_B_differs_from_bp_only_inside_the_block():
    # Control for the oracle above: with a random B the block's weights (and the input embedding
    # rows) get other gradients, while the head (final LayerNorm) still gets exactly its BP gradient.
    model = lm(depth=1, tied=False)
    x, y = tokens(b=4)
    bpfree.methods.create("bp", model).step(x, y, lm_loss)
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    bpfree.methods.create("dfa", model, seed=5).step(x, y, lm_loss)
    got = dict(model.named_parameters())
    for n in ("norm.weight", "norm.bias", "proj.weight"):
        torch.testing.assert_close(got[n].grad, expected[n], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(got["blocks.0.fc1.weight"].grad, expected["blocks.0.fc1.weight"])
    assert not torch.allclose(got["embed.weight"].grad, expected["embed.weight"])


def exact_per_token_jacobians(model, x):
    """``(mean_{i,t} dz_t/dh1_t, mean_{i,t} sum_s dz_t/dh1_s)`` at the first block output, each ``(d, d)``.

    ``z = block_2(h1)`` (the Head follows the last block's point); one exact autograd Jacobian
    ``(T, d, T, d)`` per sequence ``i``.
    """
    with torch.no_grad():
        h1 = model.blocks[0](model.drop(model.embed(x) + model.pos.weight[: x.shape[1]]))
    diag, rows = [], []
    t = torch.arange(x.shape[1])
    for h in h1:
        J = torch.autograd.functional.jacobian(lambda v: model.blocks[1](v[None])[0], h, vectorize=True)
        diag.append(J[t, :, t, :])  # (T, d, d): dz_t / dh_t
        rows.append(J.sum(2))  # (T, d, d): sum_s dz_t / dh_s
    return torch.stack(diag).mean((0, 1)), torch.stack(rows).mean((0, 1))


def test_grape_per_token_estimate_converges_to_the_exact_mean_jacobian():
    # Tangents d_l ~ N(0, I) at every token of every point; u = tangent at the Head. The estimate
    # mean_{i,t} u_{i,t} d_{i,t}^T must converge to mean_{i,t} dz_t/dh_t (the cross-token terms
    # dz_t/dh_s, s < t, average out), and for the last block output to I.
    model = lm(depth=2, d_model=8, heads=2)
    with torch.no_grad():  # larger residual branches, so that J is far from I and cross terms matter
        for blk in model.blocks:
            for lin in (blk.attn.qkv, blk.attn.out, blk.fc1, blk.fc2):
                lin.weight.mul_(6.0)
    x, _ = tokens(b=64, t=8, seed=4)
    exact, with_cross = exact_per_token_jacobians(model, x)
    assert (exact - torch.eye(8)).norm() > 0.3 * exact.norm()  # not trivially the identity
    assert (with_cross - exact).norm() > 0.3 * exact.norm()  # the cross terms are not negligible
    names = {id(p): n for n, p in feedback_points(model)}
    g = torch.Generator().manual_seed(0)
    total = {n: torch.zeros(8, 8) for n in names.values()}
    errors = {}
    for k in range(1, 201):
        for n, J in sample_jacobians(model, x, names, g).items():
            total[n] += J
        if k in (50, 200):  # 512 token-samples per pass
            errors[k] = ((total["blocks.0.point"] / k - exact).norm() / exact.norm()).item()
            last = ((total["blocks.1.point"] / k - torch.eye(8)).norm() / 8**0.5).item()
            assert last < (0.06 if k == 50 else 0.03)
    assert errors[200] < 0.03
    assert errors[200] < 0.75 * errors[50]  # the error falls like 1/sqrt(passes): 1/2 expected
    assert (total["blocks.0.point"] / 200 - with_cross).norm() > 5 * errors[200] * exact.norm()


# --------------------------------------------------------------------------- methods run


@pytest.mark.parametrize("method,feedback", [("bp", "macro"), ("dfa", "macro"), ("grape", "macro"), ("grape", "micro")])
def test_methods_train_a_tiny_lm_on_a_repeating_sequence(method, feedback):
    # A deterministic cycle of 7 tokens: every method must lower the loss from about log 13.
    # (A smoke test: in 40 steps BP reaches ~0.7 x the first loss, DFA macro ~0.7, micro ~0.8.)
    model = lm(feedback=feedback, dropout=0.0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    seq = torch.arange(64) % 7
    x = torch.stack([seq[i : i + 8] for i in range(0, 48, 3)])
    y = torch.stack([seq[i + 1 : i + 9] for i in range(0, 48, 3)])
    m = bpfree.methods.create(method, model, **({"samples": 4} if method == "grape" else {}))
    first = None
    for _ in range(40):
        opt.zero_grad()
        r = m.step(x, y, lm_loss)
        opt.step()
        first = float(r.loss) if first is None else first
    assert first > 2.0 and float(r.loss) < 0.9 * first
