"""bpfree.attach and FeedbackPoint: where points go, what is rejected, identity under BP."""

import pytest
import torch
from torch import nn

import bpfree
from bpfree.points import AttachError, FeedbackPoint, handled


def test_attach_places_a_point_after_each_hidden_nonlinearity():
    seq = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model, report = bpfree.attach(seq)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["Flatten", "Linear", "ReLU", "FeedbackPoint", "Linear", "Tanh", "FeedbackPoint", "Linear"]
    assert report.placed_after == ["2", "4"]
    assert report.unsupported == []
    # modules are shared, not copied
    assert model[1] is seq[1]


def test_attach_no_point_after_a_final_nonlinearity_and_flattens_nested():
    seq = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid()), nn.Linear(4, 2), nn.Softmax(dim=1))
    model, report = bpfree.attach(seq)
    assert [type(m).__name__ for m in model] == ["Linear", "Sigmoid", "FeedbackPoint", "Linear", "Softmax"]
    assert report.placed_after == ["0.1"]


def test_attach_rejects_what_it_cannot_handle():
    with pytest.raises(AttachError, match="nn.Sequential"):
        bpfree.attach(nn.Linear(3, 3))
    with pytest.raises(AttachError, match=r"1 \(LSTM\)"):
        bpfree.attach(nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 3), nn.Tanh(), nn.Linear(3, 2)))
    with pytest.raises(AttachError, match="no non-linearity"):
        bpfree.attach(nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2)))
    with pytest.raises(AttachError, match="already a FeedbackPoint"):
        bpfree.attach(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), FeedbackPoint(), nn.Linear(3, 2)))


def test_attach_non_strict_reports_unsupported_layers():
    _, report = bpfree.attach(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.LSTM(3, 3)), strict=False)
    assert report.unsupported == ["3 (LSTM)"]


def test_points_are_identity_without_handler_and_handlers_are_restored():
    model, _ = bpfree.attach(nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2)))
    x = torch.randn(5, 3)
    ref = model[1](model[0](x))
    assert torch.equal(model[2](ref), ref)
    with pytest.raises(RuntimeError):
        with handled(model, lambda p, h: (_ for _ in ()).throw(RuntimeError("boom"))):
            model(x)
    assert model[2].handler is None
