"""Multi-layer perceptron with a feedback point after every hidden non-linearity."""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..options import option
from ..points import FeedbackPoint
from . import register

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass
class MLPOptions:
    widths: tuple[int, ...] = option((512, 512), "hidden layer widths, e.g. 1024,1024,1024")
    activation: str = option("tanh", "hidden non-linearity", choices=tuple(ACTIVATIONS))
    bias: bool = option(True, "Linear layers have biases")

    def check(self) -> None:
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"option 'widths' needs one or more positive widths, got {self.widths}")


class MLP(nn.Sequential):
    """``Flatten -> [Linear(n_{l-1}, n_l) -> act -> FeedbackPoint] x L -> Linear(n_L, o)``.

    Input ``(batch, *input_shape)``, output ``(batch, o)`` logits. Block ``l`` is the Linear and the
    non-linearity; its point sees ``h_l`` of shape ``(batch, n_l)``. The last Linear is the head.
    """

    def __init__(self, in_features: int, widths: tuple[int, ...], num_classes: int,
                 activation: str = "tanh", bias: bool = True) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        n = in_features
        for w in widths:
            layers += [nn.Linear(n, w, bias=bias), ACTIVATIONS[activation](), FeedbackPoint()]
            n = w
        layers.append(nn.Linear(n, num_classes, bias=bias))
        super().__init__(*layers)


@register("mlp", "multi-layer perceptron, a feedback point after each hidden layer", MLPOptions)
def build_mlp(input_shape: tuple[int, ...], num_classes: int, o: MLPOptions) -> nn.Module:
    return MLP(math.prod(input_shape), o.widths, num_classes, o.activation, o.bias)
