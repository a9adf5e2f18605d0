"""Your own model for bpfree: ``--model py:experiments/examples/small_cnn.py:SmallCNN``.

bpfree calls ``SmallCNN(input_shape, n_outputs, **options)``; ``channels`` and ``hidden`` are
options (``--set channels=16``). The model is not a plain ``nn.Sequential``, so it marks its own
block boundaries with ``bpfree.FeedbackPoint`` (identities under BP) for the DFA family.
"""

from torch import nn

import bpfree


class SmallCNN(nn.Module):
    """``(batch, C, H, W)`` -> conv 3x3, ReLU, 2x2 max-pool -> point -> FC, ReLU -> point -> logits."""

    def __init__(self, input_shape, n_outputs, channels: int = 8, hidden: int = 64):
        super().__init__()
        c, h, w = input_shape
        self.conv = nn.Sequential(nn.Conv2d(c, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(channels * (h // 2) * (w // 2), hidden), nn.ReLU())
        self.points = nn.ModuleList([bpfree.FeedbackPoint(), bpfree.FeedbackPoint()])
        self.out = nn.Linear(hidden, n_outputs)

    def forward(self, x):
        return self.out(self.points[1](self.fc(self.points[0](self.conv(x)))))
