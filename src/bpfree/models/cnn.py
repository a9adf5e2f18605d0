"""Shallow CNN (two conv+pool stages, one hidden FC layer), and the pieces the conv models share.

``cnn``::

    input (batch, C, H, W)
    conv1: Conv2d(C, c1, 5, pad 2) [-> BN] -> act -> MaxPool 2    -> point  (batch, c1, H/2, W/2)
    conv2: Conv2d(c1, c2, 5, pad 2) [-> BN] -> act -> MaxPool 2   -> point  (batch, c2, H/4, W/4)
    flatten -> fc1: Linear(c2*H/4*W/4, hidden) [-> BN] -> act     -> point  (batch, hidden)
    head: Linear(hidden, o)                                                 (batch, o)

(``H/2`` rounds up: pooling uses ``ceil_mode``, so 28 px gives 14, 7 and 32 px gives 16, 8.)
With the defaults (32, 64 channels, 512 hidden) on 28x28x1 the points carry 6272, 3136 and 512
features; the model has 1.66 M parameters (2.16 M on 32x32x3), with 10 classes. BatchNorm is on by
default, as in the published shallow CNN; ``batchnorm=False`` is the ablation.

The helpers here (:func:`image_shape`, :func:`conv_block`, :func:`fc_block`, :func:`ConvFCNet`)
build every plain (non-residual) conv model of the zoo: a stack of conv stages, each followed by
a :class:`~bpfree.points.FeedbackPoint`, then hidden FC layers each followed by a point, then the
head. Points are named ``conv<i>_point`` and ``fc<i>_point``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ..options import OptionError, option
from ..points import FeedbackPoint
from . import register
from .mlp import ACTIVATIONS


def image_shape(input_shape: tuple[int, ...], model: str, min_size: int = 1) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_shape``, or a ValueError that names the model and the shape."""
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(
            f"model {model!r} takes images of shape (channels, height, width), got input shape "
            f"{tuple(input_shape)}; use a conv model with an image dataset"
        )
    c, h, w = (int(s) for s in input_shape)
    if h < min_size or w < min_size:
        raise ValueError(f"model {model!r} needs images of at least {min_size}x{min_size} pixels, got {h}x{w}")
    return c, h, w


def scaled(n: int, width: float) -> int:
    """``n`` channels or units times the ``width`` multiplier, rounded, at least 1."""
    return max(1, int(round(n * width)))


def check_width(width: float) -> None:
    if not width > 0:
        raise OptionError(f"option 'width' must be positive, got {width}")


def check_positive(name: str, values: Sequence[int], count: int | None = None) -> None:
    if count is not None and len(values) != count:
        raise OptionError(f"option {name!r} needs {count} values, got {len(values)}: {tuple(values)}")
    if any(v < 1 for v in values):
        raise OptionError(f"option {name!r} needs positive values, got {tuple(values)}")


def pooled(n: int) -> int:
    """Spatial size after ``MaxPool2d(2, ceil_mode=True)``: ``ceil(n / 2)``."""
    return -(-n // 2)


def conv_block(cin: int, cout: int, kernel: int, *, batchnorm: bool, pool: bool,
               activation: str = "relu") -> nn.Sequential:
    """``Conv2d(cin, cout, kernel, padding=kernel//2) [-> BatchNorm2d] -> act [-> MaxPool2d(2)]``.

    ``(batch, cin, H, W) -> (batch, cout, H', W')`` with ``H' = ceil(H/2)`` if ``pool`` else ``H``.
    The convolution has a bias only without BatchNorm (BN's shift makes it redundant).
    """
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(ACTIVATIONS[activation]())
    if pool:
        layers.append(nn.MaxPool2d(2, ceil_mode=True))
    return nn.Sequential(*layers)


def fc_block(nin: int, nout: int, *, batchnorm: bool, activation: str = "relu") -> nn.Sequential:
    """``Linear(nin, nout) [-> BatchNorm1d] -> act``: ``(batch, nin) -> (batch, nout)``."""
    layers: list[nn.Module] = [nn.Linear(nin, nout, bias=not batchnorm)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(nout))
    layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def init_conv_weights(model: nn.Module) -> nn.Module:
    """He-normal (fan-out, ReLU) conv weights, zero conv biases, BN scale 1 and shift 0.

    The usual initialisation of VGG and ResNet, so deep models without BatchNorm start with
    activations of a sensible scale. Linear layers keep PyTorch's default.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


@dataclass(frozen=True)
class ConvStage:
    """One conv stage of :class:`ConvFCNet`: output channels, kernel size, pooling after it."""

    channels: int
    kernel: int = 3
    pool: bool = False


class ConvFCNet(nn.Sequential):
    """Conv stages, then hidden FC layers, then a linear head, with a point after every stage/layer.

    Input ``(batch, C, H, W)``; output ``(batch, o)`` logits. Children, in order::

        conv1, conv1_point, ..., convK, convK_point, flatten,
        fc1, fc1_point, ..., fcM, fcM_point, head

    ``convi`` is :func:`conv_block` (its point sees ``(batch, c_i, H_i, W_i)``, ``n_l = c_i H_i W_i``);
    ``fci`` is :func:`fc_block` (its point sees ``(batch, m_i)``); ``head`` is ``Linear(., o)``.
    """

    def __init__(self, image: tuple[int, int, int], stages: Sequence[ConvStage], hidden: Sequence[int],
                 num_classes: int, *, batchnorm: bool, activation: str = "relu") -> None:
        c, h, w = image
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        shapes: list[tuple[int, ...]] = []
        for i, s in enumerate(stages, 1):
            layers[f"conv{i}"] = conv_block(c, s.channels, s.kernel, batchnorm=batchnorm, pool=s.pool,
                                            activation=activation)
            layers[f"conv{i}_point"] = FeedbackPoint()
            c = s.channels
            if s.pool:
                h, w = pooled(h), pooled(w)
            shapes.append((c, h, w))
        layers["flatten"] = nn.Flatten()
        n = c * h * w
        for i, m in enumerate(hidden, 1):
            layers[f"fc{i}"] = fc_block(n, m, batchnorm=batchnorm, activation=activation)
            layers[f"fc{i}_point"] = FeedbackPoint()
            n = m
            shapes.append((m,))
        layers["head"] = nn.Linear(n, num_classes)
        super().__init__(layers)
        #: the shape of ``h_l`` (without batch) at each point, in order
        self.point_shapes: list[tuple[int, ...]] = shapes


@dataclass
class CNNOptions:
    channels: tuple[int, ...] = option((32, 64), "output channels of the two conv stages (5x5 kernels)")
    hidden: int = option(512, "width of the hidden fully connected layer")
    width: float = option(1.0, "multiplier on every channel count and hidden width")
    batchnorm: bool = option(True, "BatchNorm after each conv and the hidden FC layer, as in the published shallow CNN (False: the no-BN ablation)")
    activation: str = option("relu", "non-linearity", choices=tuple(ACTIVATIONS))

    def check(self) -> None:
        check_positive("channels", self.channels, 2)
        check_positive("hidden", (self.hidden,))
        check_width(self.width)


@register("cnn", "shallow CNN: 2 conv(5x5)+pool stages, 1 hidden FC; points after each stage and the FC", CNNOptions)
def build_cnn(input_shape: tuple[int, ...], num_classes: int, o: CNNOptions) -> nn.Module:
    image = image_shape(input_shape, "cnn")
    stages = [ConvStage(scaled(ch, o.width), kernel=5, pool=True) for ch in o.channels]
    return ConvFCNet(image, stages, [scaled(o.hidden, o.width)], num_classes,
                     batchnorm=o.batchnorm, activation=o.activation)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["CNNOptions", "ConvFCNet", "ConvStage", "build_cnn", "conv_block", "count_parameters", "fc_block",
           "image_shape", "init_conv_weights", "pooled", "scaled"]
