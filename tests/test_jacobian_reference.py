"""The exact reference Jacobians with BatchNorm in training mode (bpfree.metrics.jacobians).

Model: ``h`` (a feedback point, 6 features) -> BatchNorm1d -> tanh -> Linear(6, 2) -> ``y``.
With the batch statistics ``mu, var`` held constant, sample ``i``'s Jacobian is
``dy_i/dh_i = W diag(tanh'(a_i)) diag(gamma / sqrt(var + eps))`` with ``a_i`` the normalised,
scaled ``h_i``; the reference is its batch mean. Letting the gradient flow through ``mu`` and
``var`` (``coupled=True``) instead sums every ``dy_j/dh_i``; BatchNorm's backward makes the batch
sum of its input gradient zero per feature, so the coupled batch mean is the zero matrix.
A forward-mode estimate with independent per-sample tangents targets the first.
"""

import torch
from torch import nn

import bpfree
from bpfree.feedback.estimators import sample_jacobians
from bpfree.feedback.matrices import frobenius_cos
from bpfree.metrics.jacobians import mean_jacobians, per_sample_jacobians


def bn_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), bpfree.FeedbackPoint(), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-0.5, 0.5)
    return model.train()


def analytic(model, x):
    h = model[0](x).detach()
    bn, W = model[2], model[4].weight.detach()
    scale = bn.weight.detach() / torch.sqrt(h.var(0, unbiased=False) + bn.eps)
    a = (h - h.mean(0)) * scale + bn.bias.detach()
    per_sample = W[None] * (1 - torch.tanh(a) ** 2)[:, None, :] * scale[None, None, :]  # (batch, 2, 6)
    return per_sample


def test_reference_holds_batch_statistics_constant():
    model, x = bn_model(), torch.randn(32, 3)
    expected = analytic(model, x)
    running = model[2].running_mean.clone()
    assert torch.allclose(mean_jacobians(model, x)["1"], expected.mean(0), atol=1e-6)
    assert torch.allclose(per_sample_jacobians(model, x)["1"], expected, atol=1e-6)
    assert torch.equal(model[2].running_mean, running)  # the reference pass does not update statistics
    assert "forward" not in vars(model[2])  # the module's own forward is back


def test_coupled_batch_mean_is_zero_through_batchnorm():
    model, x = bn_model(), torch.randn(32, 3)
    coupled = mean_jacobians(model, x, coupled=True)["1"]
    assert coupled.abs().max() < 1e-6
    assert mean_jacobians(model, x)["1"].abs().max() > 0.1


def test_forward_mode_estimate_converges_to_the_frozen_reference():
    # E[u_i d_i^T] = dy_i/dh_i: the cross-sample tangents through the batch statistics are
    # independent of d_i and average out, so 400 estimates of 32 samples come close.
    model, g = bn_model(), torch.Generator().manual_seed(1)
    names = {id(model[1]): "1"}
    x = torch.randn(32, 3)
    reference = mean_jacobians(model, x)["1"]
    estimate = sum(sample_jacobians(model, x, names, g)["1"] for _ in range(400)) / 400
    assert frobenius_cos(estimate, reference) > 0.95
