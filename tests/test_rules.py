"""Each feedback rule against its formula, and the toy fixed-target dynamics (REFERENCE Q5)."""

import math

import pytest
import torch

from bpfree.feedback import rules
from bpfree.feedback.matrices import frobenius_cos, rowcos, rownorm
from bpfree.feedback.toy import fixed_target_dynamics, start_with_cosine

B = torch.tensor([[3.0, 4.0], [1.0, 0.0]], dtype=torch.float64)
G = torch.tensor([[4.0, 3.0], [0.0, 2.0]], dtype=torch.float64)
# by hand: rows of B have norms 5, 1; rows of G norms 5, 2; row cosines 24/25 and 0.
C = torch.tensor([24 / 25, 0.0], dtype=torch.float64)
ETA = 0.1


def test_hand_example_cosines():
    torch.testing.assert_close(rowcos(B, G), C)
    torch.testing.assert_close(frobenius_cos(B, G), torch.tensor(24 / (math.sqrt(26) * math.sqrt(29)), dtype=torch.float64))


def test_alt1_formula():
    # g~ rows: G rows rescaled to |B_i|: (4,3)*5/5 = (4,3); (0,2)*1/2 = (0,1)
    gt = torch.tensor([[4.0, 3.0], [0.0, 1.0]], dtype=torch.float64)
    expect = torch.stack([
        B[0] - ETA * (1 - 24 / 25) * B[0] + ETA * (24 / 25) * gt[0],
        B[1] - ETA * 1.0 * B[1] + 0.0 * gt[1],
    ])
    torch.testing.assert_close(rules.alt1(B, G, ETA), expect)


def test_alt2_formula():
    expect = torch.tensor([[0.9 * 3 + 0.4, 0.9 * 4 + 0.3], [0.9, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(rules.alt2(B, G, ETA), expect)


def test_cosine_rule_is_a_gradient_step_on_each_units_one_minus_cos():
    Bv = B.clone().requires_grad_()
    loss = (1 - rowcos(Bv, G)).sum()
    (grad,) = torch.autograd.grad(loss, Bv)
    torch.testing.assert_close(rules.cosine(B, G, ETA), B - ETA * grad)
    # and the full update normalises every row to |B_0|_F / sqrt(n)
    new = rules.update_feedback(B, G, rule="cosine", eta=ETA, norm0=float(B.norm()))
    torch.testing.assert_close(new.norm(dim=1), torch.full((2,), float(B.norm()) / math.sqrt(2), dtype=torch.float64))


def test_regress_formula_and_no_renormalisation_by_default():
    expect = B - ETA * (B - G)
    torch.testing.assert_close(rules.regress(B, G, ETA), expect)
    torch.testing.assert_close(rules.update_feedback(B, G, rule="regress", eta=ETA, norm0=123.0), expect)


def test_blend_formula_moves_toward_G_rescaled_as_a_whole():
    # |B|_F = sqrt(26), |G|_F = sqrt(29): G enters scaled by sqrt(26/29), rows keep G's norm ratio
    expect = (1 - ETA) * B + ETA * G * math.sqrt(26 / 29)
    torch.testing.assert_close(rules.blend(B, G, ETA), expect)
    new = rules.update_feedback(B, G, rule="blend", eta=1.0, norm0=2.0)
    torch.testing.assert_close(new, G * (2.0 / math.sqrt(29)))  # eta = 1: G itself at |B_0|_F
    torch.testing.assert_close(rules.blend(B, 7 * G, ETA), rules.blend(B, G, ETA))  # |G| does not matter


def test_renormalisations():
    torch.testing.assert_close(rules.renormalise(B, "frobenius", 2.0).norm(), torch.tensor(2.0, dtype=torch.float64))
    rows = rules.renormalise(B, "rows", 2.0)
    torch.testing.assert_close(rows.norm(dim=1), torch.full((2,), 2 / math.sqrt(2), dtype=torch.float64))
    assert rules.renormalise(B, "none", 2.0) is B
    with pytest.raises(ValueError, match="unknown renormalisation"):
        rules.renormalise(B, "max", 1.0)


def test_start_with_cosine_is_exact():
    g = torch.Generator().manual_seed(0)
    Gs = torch.randn(20, 5, generator=g, dtype=torch.float64)
    for c0 in (-0.9, 0.0, 0.5):
        torch.testing.assert_close(rowcos(start_with_cosine(Gs, c0, g), Gs), torch.full((20,), c0, dtype=torch.float64))


@pytest.mark.parametrize("rule", ["alt2", "cosine", "regress"])
def test_rules_that_turn_B_raise_the_unit_cosine_from_zero(rule):
    traj = fixed_target_dynamics(rule, 0.0, steps=100, eta=0.05)
    assert abs(traj["unit_cos"][0]) < 1e-9
    assert traj["unit_cos"][-1] > 0.5, traj["unit_cos"][-1]


def test_alt1_pulls_each_row_toward_the_sign_of_its_cosine():
    # alt1's pull toward g~ is weighted by c_i itself: c_i = 0 is a fixed point, rows with
    # c_i > 0 turn toward +g_i and rows with c_i < 0 toward -g_i.
    traj = fixed_target_dynamics("alt1", 0.0, steps=100, eta=0.05)
    assert max(abs(c) for c in traj["unit_cos"]) < 1e-9
    up = fixed_target_dynamics("alt1", 0.1, steps=100, eta=0.05)
    assert up["unit_cos"][-1] > 0.5
    down = fixed_target_dynamics("alt1", -0.1, steps=100, eta=0.05)
    assert down["unit_cos"][-1] < -0.5


def test_rescale_only_rescales_rows():
    # Without noise, (1 - eta (1 - c_i)) > 0 scales each row: no row ever turns.
    traj = fixed_target_dynamics("rescale", 0.3, steps=100, eta=0.05, noise=0.0)
    assert max(abs(c - 0.3) for c in traj["unit_cos"]) < 1e-9


def test_rescale_frobenius_cosine_grows_when_row_cosines_differ():
    # rows at cosines +0.9 and -0.9 : the rule shrinks the misaligned row, so the Frobenius cosine rises
    g = torch.Generator().manual_seed(1)
    Gs = torch.randn(2, 4, generator=g, dtype=torch.float64)
    B0 = torch.cat([start_with_cosine(Gs[:1], 0.9, g), start_with_cosine(Gs[1:], -0.9, g)])
    B1 = B0
    for _ in range(50):
        B1 = rules.update_feedback(B1, Gs, rule="rescale", eta=0.1, norm0=float(B0.norm()), noise=0.0)
    assert float(frobenius_cos(B1, Gs)) > float(frobenius_cos(B0, Gs)) + 0.1
    torch.testing.assert_close(rowcos(B1, Gs), rowcos(B0, Gs))


@pytest.mark.parametrize("rule", list(rules.RULES))
def test_rules_do_not_depend_on_memory_layout(rule):
    # GrAPE keeps B_l in the memory layout of Jbar_l^T (a transposed view); the update is the same
    # function of the values: row-major and transposed-storage inputs give equal results.
    g = torch.Generator().manual_seed(3)
    Bc, Gc = torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    Bt, Gt = Bc.t().contiguous().t(), Gc.t().contiguous().t()
    assert not Bt.is_contiguous() and torch.equal(Bt, Bc)
    for renorm in rules.RENORMS:
        want = rules.update_feedback(Bc, Gc, rule=rule, eta=0.2, norm0=3.0, noise=0.0, renorm=renorm)
        got = rules.update_feedback(Bt, Gt, rule=rule, eta=0.2, norm0=3.0, noise=0.0, renorm=renorm)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rownorm(Bt), torch.linalg.vector_norm(Bc, dim=1), rtol=1e-12, atol=1e-12)
