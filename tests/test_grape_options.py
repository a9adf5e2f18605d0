"""GrAPE's estimator options and calibration, against independent computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bpfree
from bpfree.feedback.estimators import RunningJacobian, block_parameters, weight_perturbation_jacobians
from bpfree.feedback.matrices import frobenius_cos
from bpfree.metrics.jacobians import mean_jacobians
from bpfree.options import OptionError


def mlp(widths=(16, 16), seed=0):
    torch.manual_seed(seed)
    return bpfree.models.create("mlp", (12,), 5, widths=widths)


def data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def test_train_pass_estimator_leaves_the_dfa_gradients_unchanged():
    model = mlp()
    x, y = data()
    a = bpfree.methods.create("grape", model, eta=0.0, noise=0.0)
    b = bpfree.methods.create("grape", model, eta=0.0, noise=0.0, estimator="train-pass")
    a.step(x, y, F.cross_entropy)
    b.step(x, y, F.cross_entropy)
    b.state.feedback = {k: v.clone() for k, v in a.state.feedback.items()}
    b.state.norm0 = dict(a.state.norm0)
    model.zero_grad()
    a.step(x, y, F.cross_entropy)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    b.step(x, y, F.cross_entropy)
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


@pytest.mark.parametrize("options", [dict(estimator="train-pass"), dict(points="each"), dict(average="ema", beta=0.9), dict(tangents="central"),
                                     dict(tangents="onesided"), dict(tangents="forward")])
def test_estimator_variants_converge_to_the_exact_mean_jacobian(options):
    model = mlp()
    x, y = data()
    exact = mean_jacobians(model, x)
    grape = bpfree.methods.create("grape", model, eta=0.0, samples=48, **options)
    for _ in range(150):
        grape.step(x, y, F.cross_entropy)  # no optimizer step: the Jacobian stays fixed
    cos = {k: float(frobenius_cos(grape.state.jacobian.mean[k], exact[k])) for k in exact}
    threshold = 0.8 if options.get("average") == "ema" else 0.95  # ema keeps ~19 draws' worth
    assert min(cos.values()) > threshold, cos


@pytest.mark.parametrize("scheme", ["central", "onesided"])
def test_difference_schemes_equal_forward_mode_on_a_linear_net(scheme):
    # With identity blocks y is affine in every h_l, so y(h + s d) - y(h) = s J d exactly: the
    # difference estimates equal the forward-mode estimate drawn with the same tangents (the
    # three estimators draw d_l of shape (k, n_l) point by point from the same generator).
    from bpfree.feedback.estimators import (central_difference_jacobians, onesided_difference_jacobians,
                                            sample_jacobians)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 9), bpfree.FeedbackPoint(), nn.Linear(9, 7), bpfree.FeedbackPoint(),
                          nn.Linear(7, 5)).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    names = {id(p): n for n, p in bpfree.feedback_points(model)}
    want = sample_jacobians(model, x, names, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    if scheme == "central":
        got = central_difference_jacobians(model, x, names, g, step=0.5)
    else:
        with torch.no_grad():
            got = onesided_difference_jacobians(model, x, names, g, model(x), step=0.5)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)  # outer_mean is float32


@pytest.mark.parametrize("scheme", ["central", "onesided"])
def test_a_difference_pass_resumed_at_the_first_point_is_the_pass_from_the_input(scheme):
    # The blocks before the first point carry no perturbation, so starting the pass from their
    # output h_1 (given) must give the same estimate as running them again: same draws, same u.
    from bpfree.feedback.estimators import (central_difference_jacobians, first_point_child,
                                            onesided_difference_jacobians)

    model = mlp(widths=(16, 16, 8)).double()
    x = data(10)[0].double()
    names = {id(p): n for n, p in bpfree.feedback_points(model)}
    i = first_point_child(model)
    assert isinstance(model[i], bpfree.FeedbackPoint) and i == 3  # Flatten, Linear, Tanh, point
    with torch.no_grad():
        h1, ref = nn.Sequential(*list(model)[:i])(x), model(x)

    def estimate(resume=None):
        g = torch.Generator().manual_seed(5)
        if scheme == "central":
            return central_difference_jacobians(model, x, names, g, 1e-2, resume=resume)
        return onesided_difference_jacobians(model, x, names, g, ref, 1e-2, resume=resume)

    want, got = estimate(), estimate(resume=(i, h1))
    assert want.keys() == got.keys() == set(names.values())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-12)
    # a model whose first marker is not a top-level point (or that is not a plain Sequential) has no resume point
    assert first_point_child(nn.Sequential(nn.Sequential(nn.Linear(3, 3), bpfree.FeedbackPoint()), nn.Linear(3, 2))) is None
    assert first_point_child(nn.Sequential(nn.Linear(3, 3), bpfree.Head(), nn.Linear(3, 2))) is None


@pytest.mark.parametrize("layer", [None, "batchnorm"])
def test_a_difference_estimate_runs_the_blocks_before_the_first_point_only_where_it_must(layer):
    # Per-sample nets: the estimate starts from the training pass's h_1 rows, so the first Linear
    # runs once per update step, and B_l moves exactly as with the pass from the input (forced by
    # a Sequential subclass with its own forward, which has no resume point). With BatchNorm in
    # training mode the sub-batch's statistics differ from the batch's: the pass starts at the input.
    class Opaque(nn.Sequential):
        def forward(self, x):
            return super().forward(x)

    def net(cls):
        torch.manual_seed(0)
        mid = [nn.BatchNorm1d(16)] if layer else []
        return cls(nn.Linear(12, 16), *mid, nn.Tanh(), bpfree.FeedbackPoint(), nn.Linear(16, 16), nn.Tanh(),
                   bpfree.FeedbackPoint(), nn.Linear(16, 5))

    x, y = data()
    runs = {}
    for cls in (nn.Sequential, Opaque):
        model = net(cls)
        calls = []
        model[0].register_forward_hook(lambda *a: calls.append(1))
        grape = bpfree.methods.create("grape", model, samples=16, every=1)
        for _ in range(3):
            calls.clear()
            grape.step(x, y, F.cross_entropy)
        runs[cls] = (len(calls), {k: v.clone() for k, v in grape.state.feedback.items()})
    assert runs[Opaque][0] == 2  # the training pass and the estimate pass
    assert runs[nn.Sequential][0] == (2 if layer else 1)
    for k, B in runs[Opaque][1].items():
        torch.testing.assert_close(runs[nn.Sequential][1][k], B, rtol=1e-6, atol=1e-7)


def test_onesided_error_is_first_order_in_the_step_on_a_curved_net():
    # On a tanh net u_onesided - J d = (step / 2) d^T H d + O(step^2): halving the step halves the
    # deviation from the forward-mode estimate (same tangents), while central falls 4-fold.
    from bpfree.feedback.estimators import (central_difference_jacobians, onesided_difference_jacobians,
                                            sample_jacobians)

    model = mlp().double()
    x = data(8)[0].double()
    names = {id(p): n for n, p in bpfree.feedback_points(model)}
    want = sample_jacobians(model, x, names, torch.Generator().manual_seed(3))

    def err(fn, step):
        got = fn(torch.Generator().manual_seed(3), step)
        return sum(float((got[k] - want[k]).norm()) for k in want)

    with torch.no_grad():
        ref = model(x)
    one = lambda g, s: onesided_difference_jacobians(model, x, names, g, ref, s)
    cen = lambda g, s: central_difference_jacobians(model, x, names, g, s)
    assert err(one, 1e-2) / err(one, 5e-3) == pytest.approx(2.0, rel=0.05)
    assert err(cen, 1e-2) / err(cen, 5e-3) == pytest.approx(4.0, rel=0.05)


def test_auto_tangents_pick_the_cheapest_valid_scheme():
    plain = bpfree.methods.create("grape", mlp())
    assert plain.tangent_scheme(torch.device("cpu")) == "onesided"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert plain.tangent_scheme(torch.device("cpu")) == "forward"
    for layer in (nn.BatchNorm1d(16), nn.Dropout(0.1)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(12, 16), layer, nn.Tanh(), bpfree.FeedbackPoint(), nn.Linear(16, 5))
        assert bpfree.methods.create("grape", model).tangent_scheme(torch.device("cpu")) == "central"
        model.eval()  # BatchNorm with running statistics, dropout off: per-sample again
        assert bpfree.methods.create("grape", model).tangent_scheme(torch.device("cpu")) == "onesided"
    for options in (dict(estimator="train-pass"), dict(perturb="weight"), dict(points="each")):
        assert bpfree.methods.create("grape", mlp(), **options).tangent_scheme(torch.device("cpu")) == "forward"


def test_onesided_under_autocast_is_refused():
    model = mlp()
    x, y = data()
    grape = bpfree.methods.create("grape", model, tangents="onesided")
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(RuntimeError, match="autocast"):
        grape.step(x, y, F.cross_entropy)


def test_block_parameters_are_found_per_point():
    model = mlp(widths=(4, 3))
    names = {id(p): n for n, p in bpfree.feedback_points(model)}
    blocks = block_parameters(model, torch.randn(2, 12), names)
    assert blocks == {"3": ["1.weight", "1.bias"], "6": ["4.weight", "4.bias"]}


def test_weight_perturbation_estimate_is_unbiased_where_the_jacobian_is_fixed():
    # One hidden layer: J = dy/dh = W_out for every sample. E[u t^T] = J E[t t^T] with a diagonal
    # E[t t^T] (rows of the weight tangent are independent), so the estimate's mean is W_out.
    torch.manual_seed(0)
    model = bpfree.models.create("mlp", (12,), 5, widths=(8,))
    x, _ = data(128)
    names = {id(p): n for n, p in bpfree.feedback_points(model)}
    blocks = block_parameters(model, x, names)
    g = torch.Generator().manual_seed(0)
    avg = RunningJacobian()
    for _ in range(800):
        avg.update(weight_perturbation_jacobians(model, x, names, blocks, g))
    J = model[4].weight.detach()
    assert float(frobenius_cos(avg.mean["3"], J)) > 0.98
    assert float((avg.mean["3"] - J).norm() / J.norm()) < 0.2


def test_weight_perturbation_through_the_method():
    model = mlp()
    x, y = data()
    exact = mean_jacobians(model, x)
    grape = bpfree.methods.create("grape", model, eta=0.0, samples=48, perturb="weight")
    for _ in range(300):
        grape.step(x, y, F.cross_entropy)
    # the last hidden point's Jacobian is W_out for every sample: the weighted mean is exact there
    assert float(frobenius_cos(grape.state.jacobian.mean["6"], exact["6"])) > 0.95


@pytest.mark.parametrize("method", ["dfa", "grape"])
def test_calibration_step_equals_a_bp_step(method):
    model = mlp()
    x, y = data()
    bpfree.methods.create("bp", model).step(x, y, F.cross_entropy)
    expected = [p.grad.clone() for p in model.parameters()]
    m = bpfree.methods.create(method, model, calibrate_every=3)
    calib = []
    for _ in range(6):
        model.zero_grad()
        r = m.step(x, y, F.cross_entropy)
        calib.append(r.metrics.get("calibration", 0.0))
        if calib[-1]:
            for e, p in zip(expected, model.parameters()):
                torch.testing.assert_close(p.grad, e, rtol=0, atol=0)
        else:
            assert not torch.allclose(model[1].weight.grad, expected[0])
    assert calib == [0, 0, 1, 0, 0, 1]


@pytest.mark.parametrize("unit,expected", [
    ("epochs", [0, 0, 0, 0, 1, 0, 0, 0]),     # the first step after epochs 2 and 4
    ("epoch-all", [0, 0, 1, 1, 0, 0, 1, 1]),  # epochs 2 and 4 are BP throughout
])
def test_calibration_schedules_over_epochs(unit, expected):
    x, y = data()
    m = bpfree.methods.create("dfa", mlp(), calibrate_every=2, calibrate_unit=unit)
    seen = []
    for epoch in (1, 2, 3, 4):
        for _ in range(2):
            seen.append(m.step(x, y, F.cross_entropy).metrics.get("calibration", 0.0))
        m.on_epoch_end(epoch)
    assert seen == expected


def test_epoch_all_with_T_1_makes_the_first_epoch_bp_too():
    x, y = data()
    m = bpfree.methods.create("dfa", mlp(), calibrate_every=1, calibrate_unit="epoch-all")
    assert m.step(x, y, F.cross_entropy).metrics.get("calibration") == 1.0


def test_feedback_norm_calibration_is_bp_rescaled_to_the_moving_average_of_feedback_gradient_norms():
    # calibrate_scale=feedback-norm: n <- 0.9 n + 0.1 |g_DFA| over the direct-feedback steps (the
    # first sets it); the BP step's gradients are then g_BP * n / |g_BP|.
    x, y = data()
    reference = mlp()
    bpfree.methods.create("bp", reference).step(x, y, F.cross_entropy)
    bp = [p.grad.clone() for p in reference.parameters()]
    model = mlp()
    m = bpfree.methods.create("dfa", model, calibrate_every=3, calibrate_scale="feedback-norm")
    norms = []
    for _ in range(2):
        model.zero_grad()
        m.step(x, y, F.cross_entropy)
        norms.append(torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())))
    expected_norm = 0.9 * norms[0] + 0.1 * norms[1]
    model.zero_grad()
    assert m.step(x, y, F.cross_entropy).metrics["calibration"] == 1.0
    factor = expected_norm / torch.sqrt(sum((g ** 2).sum() for g in bp))
    for g, p in zip(bp, model.parameters()):
        torch.testing.assert_close(p.grad, g * factor, rtol=1e-5, atol=1e-7)
    assert abs(float(factor) - 1) > 0.05  # the rescaling is not the identity here


def test_option_combinations_are_checked():
    with pytest.raises(OptionError, match="train-pass"):
        bpfree.methods.create("grape", mlp(), estimator="train-pass", perturb="weight")
    with pytest.raises(OptionError, match="samples"):
        bpfree.methods.create("grape", mlp(), samples=0)
    with pytest.raises(OptionError, match="calibrate_every"):
        bpfree.methods.create("dfa", mlp(), calibrate_every=-1)


def test_preset_grape2025_restores_every_original_default_and_explicit_options_win():
    from bpfree.methods.grape import GrAPE

    original = dict(rule="rescale", eta=1e-3, noise=None, renorm="auto", samples=64, average="cumulative", every=4)
    got = bpfree.methods.create("grape", mlp(), preset="grape2025").options
    assert {k: getattr(got, k) for k in original} == original
    assert bpfree.methods.create("grape", mlp(), preset="grape2025", eta=0.5).options.eta == 0.5
    # the published preset is the dataclass's own defaults
    assert bpfree.methods.create("grape", mlp()).options == GrAPE.Options()
    with pytest.raises(OptionError, match="option 'preset' cannot be 'x'"):
        bpfree.methods.create("grape", mlp(), preset="x")


def test_spatial_tangents_span_the_low_frequencies_and_the_estimate_targets_jbar_times_the_projector():
    # d = D_H^T z D_W with orthonormal DCT rows D: d lies in the span of the modes x modes lowest
    # frequencies, and E[d d^T] = P = (D_H^T D_H) kron (D_W^T D_W) per channel, so for a linear map
    # y = W vec(h) the estimate mean u d^T has expectation W P.
    from bpfree.feedback.estimators import dct_basis, sample_jacobians, spatial_tangents

    D = dct_basis(3, 6, "cpu", torch.float64)
    torch.testing.assert_close(D @ D.t(), torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(D[1], torch.cos(torch.pi * (torch.arange(6) + 0.5) / 6).double() * (2 / 6) ** 0.5)
    draw = spatial_tangents(3)
    d = draw((5, 2, 6, 6), torch.Generator().manual_seed(0), torch.device("cpu"), torch.float64)
    P = D.t() @ D
    torch.testing.assert_close(P @ d @ P, d)  # in the span
    assert draw((5, 7), torch.Generator().manual_seed(0), "cpu", torch.float32).shape == (5, 7)  # flat: N(0, I)

    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.point = bpfree.FeedbackPoint()
            self.W = torch.randn(3, 36, generator=torch.Generator().manual_seed(1))

        def forward(self, x):
            return self.point(x).reshape(x.shape[0], -1) @ self.W.t()

    model = Linear()
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(500, 1, 6, 6)
    est = sum(sample_jacobians(model, x, {id(model.point): "p"}, g, draw=draw)["p"] for _ in range(20)) / 20
    target = model.W @ torch.kron(P, P).float()
    assert float(frobenius_cos(est, target)) > 0.99
    assert float(frobenius_cos(target, model.W)) < 0.6  # the projection is not the identity here
    est_full = sample_jacobians(model, x, {id(model.point): "p"}, g)["p"]
    assert float(frobenius_cos(est_full, model.W)) > 0.8  # modes = 0: plain tangents target W itself


def test_spatial_modes_reach_every_estimator():
    model = bpfree.models.create("cnn", (1, 8, 8), 3, channels=(2, 3), hidden=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    for options in ({}, {"tangents": "forward"}, {"estimator": "train-pass"}, {"points": "each"}):
        g = bpfree.methods.create("grape", model, spatial_modes=2, eta=0.0, **options)
        g.step(x, y, F.cross_entropy)
        J = g.state.jacobian.mean["conv1_point"].reshape(3, 2, 4, 4)
        P = torch.kron(*(2 * [bpfree.feedback.estimators.dct_basis(2, 4, "cpu", torch.float32)]))
        P = P.t() @ P
        torch.testing.assert_close(J.reshape(6, 16) @ P, J.reshape(6, 16), atol=1e-5, rtol=1e-4)  # in the span
    with pytest.raises(OptionError, match="spatial_modes"):
        bpfree.methods.create("grape", model, spatial_modes=2, perturb="weight")


def test_align_flat_leaves_image_points_random_and_moves_the_flat_ones():
    model = bpfree.models.create("cnn", (1, 8, 8), 3, channels=(2, 3), hidden=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    g = bpfree.methods.create("grape", model, align="flat", eta=0.5)
    dfa = bpfree.methods.create("dfa", model)  # same seed: the same initial B_l
    for m in (g, dfa):
        m.step(x, y, F.cross_entropy)
    for name in ("conv1_point", "conv2_point"):
        assert torch.equal(g.state.feedback[name], dfa.state.feedback[name])
    assert not torch.allclose(g.state.feedback["fc1_point"], dfa.state.feedback["fc1_point"])
    assert set(g.state.jacobian.mean) == {"fc1_point"}


def test_preset_reaches_runs_configured_from_the_command_line():
    # the run configuration resolves every option; the preset must be applied there, not only in create()
    from bpfree.train.config import resolve

    cfg = resolve({"run": {"method": "grape", "model": "mlp", "dataset": "mnist"}, "method": {"preset": "grape2025"}})
    assert cfg.method["rule"] == "rescale" and cfg.method["eta"] == 1e-3 and cfg.method["preset"] == "grape2025"
    cfg = resolve({"run": {"method": "grape", "model": "mlp", "dataset": "mnist"},
                   "method": {"preset": "grape2025", "eta": 0.3}})
    assert cfg.method["rule"] == "rescale" and cfg.method["eta"] == 0.3
    assert bpfree.methods.create("grape", mlp(), **cfg.method).options.rule == "rescale"


@pytest.mark.parametrize("tangents,estimator", [("forward", "subbatch"), ("central", "subbatch"),
                                                ("auto", "train-pass")])
def test_align_flat_perturbs_only_the_flat_points(tangents, estimator):
    # On the CNN the only flat point is fc1's, and the head after it is linear: with the image
    # points unperturbed, u = d W_head^T exactly, so J~ = W_head (d^T d) / k with d the one draw the
    # generator made (regenerated from its state); were a conv point perturbed too, u would carry
    # its term and the estimate would differ. Train-pass: Jbar after two steps is the mean of the
    # two steps' estimates, each over the whole batch.
    torch.manual_seed(0)
    model = bpfree.models.create("cnn", (1, 8, 8), 3, channels=(2, 3), hidden=4)
    grape = bpfree.methods.create("grape", model, align="flat", tangents=tangents, estimator=estimator,
                                  samples=6, every=1, eta=0.0)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    W = model.head.weight.detach().clone()  # eta = 0 and no optimizer step: the head stays
    flat = [name for name, _ in grape.points if name.startswith("fc")]

    def closed_form(state):
        d = torch.randn((6, 4), generator=torch.Generator().set_state(state))
        return W @ (d.t() @ d) / 6

    states = [grape.tangent_generator(x.device).get_state()]
    grape.step(x, y, nn.functional.cross_entropy)  # makes B_l
    states.append(grape.tangent_generator(x.device).get_state())
    if estimator == "train-pass":
        grape.step(x, y, nn.functional.cross_entropy)
        est = grape.jacobian_estimates()
        expected = (closed_form(states[0]) + closed_form(states[1])) / 2
    else:
        est = grape.estimator(x.device).estimate(x, grape.forward_cut(x))
        expected = closed_form(states[1])
    assert set(est) == set(flat)
    torch.testing.assert_close(est[flat[0]], expected, rtol=1e-4, atol=1e-5)


def test_low_rank_per_output_is_each_maps_truncated_svd():
    from bpfree.feedback.matrices import low_rank_per_output

    g = torch.Generator().manual_seed(0)
    for C, HW in ((3, 8), (8, 3)):  # the Gram matrix over channels, and over space
        J = torch.randn(4, C * HW, generator=g, dtype=torch.float64)
        U, S, Vh = torch.linalg.svd(J.reshape(4, C, HW), full_matrices=False)
        expected = (U[..., :2] * S[:, None, :2]) @ Vh[:, :2]  # Eckart-Young: the nearest rank-2 map
        got = low_rank_per_output(J, C, 2)
        torch.testing.assert_close(got, expected.reshape(4, -1))
        assert torch.linalg.matrix_rank(got.reshape(4, C, HW)).tolist() == [2] * 4
        torch.testing.assert_close(low_rank_per_output(got, C, 2), got)  # a projection
        torch.testing.assert_close(low_rank_per_output(J, C, 3), J)  # full rank: unchanged
    # a map of rank 1 (B[c, hw, k] = U[k, hw] V[c, k]) is kept exactly at rank 1
    V, W = torch.randn(4, 5, 1, generator=g), torch.randn(4, 1, 6, generator=g)
    rank1 = (V @ W).reshape(4, 30)
    torch.testing.assert_close(low_rank_per_output(rank1, 5, 1), rank1)
    with pytest.raises(ValueError, match="channels"):
        low_rank_per_output(rank1, 7, 1)


def test_rank_moves_image_points_toward_the_low_rank_running_estimate_and_flat_points_as_before(monkeypatch):
    from bpfree.feedback.matrices import low_rank_per_output
    from bpfree.methods import grape as grape_module

    model = bpfree.models.create("cnn", (1, 8, 8), 3, channels=(2, 3), hidden=4)
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 3, (6,))
    targets = {}
    real = grape_module.update_feedback

    def spy(B, G, **kw):
        targets[B.data_ptr()] = G.clone()
        return real(B, G, **kw)

    monkeypatch.setattr(grape_module, "update_feedback", spy)
    g = bpfree.methods.create("grape", model, rank=1)
    g.step(x, y, F.cross_entropy)
    for name, channels in (("conv1_point", 2), ("conv2_point", 3), ("fc1_point", None)):
        G = targets[g.state.feedback[name].data_ptr()]
        Jbar = g.state.jacobian.mean[name]
        expected = Jbar if channels is None else low_rank_per_output(Jbar, channels, 1)
        torch.testing.assert_close(G, expected.t())
        if channels is not None:  # each output's (C, H*W) map of rank 1, unlike the dense estimate
            assert torch.linalg.matrix_rank(G.t().reshape(3, channels, -1)).tolist() == [1, 1, 1]
            assert min(torch.linalg.matrix_rank(Jbar.reshape(3, channels, -1)).tolist()) > 1
    with pytest.raises(OptionError, match="rank"):
        bpfree.methods.create("grape", model, rank=-1)
