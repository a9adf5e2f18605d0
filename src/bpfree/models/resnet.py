"""CIFAR ResNets (He et al. 2016, section 4.2): ResNet-20 and ResNet-56, with a point per block.

Architecture (depth ``6n + 2``: ``n = 3`` for ResNet-20, ``n = 9`` for ResNet-56)::

    input (batch, C, H, W)
    stem:   Conv3x3(C -> 16) [BN] ReLU                              (batch, 16, H, W)
    layer1: n basic blocks, 16 channels                             (batch, 16, H, W)
    layer2: n basic blocks, 32 channels, the first with stride 2    (batch, 32, H/2, W/2)
    layer3: n basic blocks, 64 channels, the first with stride 2    (batch, 64, H/4, W/4)
    global average pool -> head: Linear(64, o)                      (batch, o)

A basic block computes ``h_k = ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(h_{k-1}))))) + s(h_{k-1}))``, where
the shortcut ``s`` is the identity when the shape is kept. Where a block halves the resolution and
doubles the channels the ``shortcut`` option picks the projection:

* ``"A"`` (the paper's choice for CIFAR, the default): no parameters; ``h_{k-1}`` is subsampled
  (every second pixel) and the new channels are zeros (half the padding before, half after);
* ``"B"``: a 1x1 convolution with stride 2 followed by BatchNorm (when ``batchnorm``).

Convolutions are He-normal initialised. ``batchnorm=False`` (the ablation) removes every BatchNorm,
gives the convolutions biases and scales the last convolution of every residual branch by
``1/sqrt(3n)`` at initialisation, so that the activations do not grow as ``2^(3n)`` with depth.

Parameters at the defaults on 32x32x3 with 10 classes: ResNet-20 269,722 (A) / 272,474 (B),
ResNet-56 853,018 (A).

**Feedback points and DFA.** Every residual block ends with a :class:`~bpfree.points.FeedbackPoint`
placed at its output, *after* the addition and the ReLU, so a point sees ``h_k`` of shape
``(batch, c, H_k, W_k)`` and ``n_l = c H_k W_k`` (16384, 8192 and 4096 features per stage at
32x32). ResNet-20 has 9 points, ResNet-56 has 27. The stem has no point of its own: it belongs to
the segment of the first block, whose signal reaches it through that block's two paths. The head
(average pool and linear layer) receives the output error directly.

Under a DFA-family method the point hands the next block ``h_k`` *detached*. Inside block ``k`` the
signal ``B_k e`` arriving at ``h_k`` is backpropagated locally through both the residual path (the
two convolutions, BN, ReLU) and the shortcut (the projection's parameters in option B); both paths
start from the detached ``h_{k-1}``, so the signal stops there. The shortcut therefore does not
carry gradient from block ``k+1`` into block ``k`` or earlier: the weight gradients of block ``k``
depend only on the signal at block ``k``'s point (tests/test_conv_models.py checks this by zeroing
every other ``B_l``). Under BP the points are identities and the network is an ordinary ResNet.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..options import option
from ..points import FeedbackPoint
from . import register
from .cnn import check_positive, check_width, image_shape, init_conv_weights, scaled


def conv3x3(cin: int, cout: int, stride: int = 1, *, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=bias)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``(batch, cin, H, W) -> (batch, cout, ceil(H/s), ceil(W/s))`` without parameters.

    Takes every ``stride``-th pixel and pads the channel dimension with zeros, ``(cout - cin) // 2``
    channels before the input's and the rest after.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        if cout < cin:
            raise ValueError(f"an option-A shortcut cannot reduce channels ({cin} -> {cout})")
        self.cin, self.cout, self.stride = cin, cout, stride

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            h = h[:, :, :: self.stride, :: self.stride]
        extra = self.cout - self.cin
        return F.pad(h, (0, 0, 0, 0, extra // 2, extra - extra // 2)) if extra else h

    def extra_repr(self) -> str:
        return f"{self.cin} -> {self.cout}, stride={self.stride}"


class BasicBlock(nn.Module):
    """``h_k = ReLU(residual(h_{k-1}) + shortcut(h_{k-1}))``, then the block's feedback point.

    ``(batch, cin, H, W) -> (batch, cout, ceil(H/stride), ceil(W/stride))``. ``residual`` is
    ``Conv3x3(stride) [BN] ReLU Conv3x3 [BN]``; ``shortcut`` is the identity, :class:`PadShortcut`
    (option A) or ``Conv1x1(stride) [BN]`` (option B). ``point`` is the last operation.
    """

    def __init__(self, cin: int, cout: int, stride: int, *, batchnorm: bool, shortcut: str) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv3x3(cin, cout, stride, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        layers += [nn.ReLU(), conv3x3(cout, cout, bias=not batchnorm)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        self.residual = nn.Sequential(*layers)
        if stride == 1 and cin == cout:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(cin, cout, stride)
        else:
            proj: list[nn.Module] = [nn.Conv2d(cin, cout, 1, stride=stride, bias=not batchnorm)]
            if batchnorm:
                proj.append(nn.BatchNorm2d(cout))
            self.shortcut = nn.Sequential(*proj)
        self.act = nn.ReLU()
        self.point = FeedbackPoint()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.point(self.act(self.residual(h) + self.shortcut(h)))


class CifarResNet(nn.Module):
    """Stem, three stages of ``blocks`` :class:`BasicBlock` each, global average pool, linear head.

    Input ``(batch, C, H, W)``, output ``(batch, o)``. Points: ``layer{s}.{i}.point`` for stage
    ``s`` in 1..3 and block ``i`` in 0..blocks-1.
    """

    def __init__(self, image: tuple[int, int, int], blocks: int, channels: tuple[int, int, int], num_classes: int,
                 *, batchnorm: bool = True, shortcut: str = "A") -> None:
        super().__init__()
        c_in, h, w = image
        stem: list[nn.Module] = [conv3x3(c_in, channels[0], bias=not batchnorm)]
        if batchnorm:
            stem.append(nn.BatchNorm2d(channels[0]))
        stem.append(nn.ReLU())
        self.stem = nn.Sequential(*stem)
        c = channels[0]
        self.point_shapes: list[tuple[int, int, int]] = []
        for s, cout in enumerate(channels, 1):
            layer = []
            for i in range(blocks):
                stride = 2 if (s > 1 and i == 0) else 1
                layer.append(BasicBlock(c, cout, stride, batchnorm=batchnorm, shortcut=shortcut))
                if stride == 2:
                    h, w = -(-h // 2), -(-w // 2)
                c = cout
                self.point_shapes.append((c, h, w))
            setattr(self, f"layer{s}", nn.Sequential(*layer))
        self.pool = nn.Sequential(OrderedDict(avg=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten()))
        self.head = nn.Linear(c, num_classes)
        init_conv_weights(self)
        if not batchnorm:
            # Without BN the variance would double in every block (identity + a variance-keeping
            # branch); scaling each branch's last conv by 1/sqrt(#blocks) keeps it O(1) at any depth.
            n = len(self.blocks())
            with torch.no_grad():
                for b in self.blocks():
                    b.residual[-1].weight.mul_(n ** -0.5)

    def blocks(self) -> list[BasicBlock]:
        """The residual blocks in forward order."""
        return [b for layer in (self.layer1, self.layer2, self.layer3) for b in layer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.head(self.pool(h))


@dataclass
class ResNetOptions:
    channels: tuple[int, ...] = option((16, 32, 64), "channels of the three stages")
    width: float = option(1.0, "multiplier on every channel count")
    batchnorm: bool = option(True, "BatchNorm after every convolution (False: the no-BN ablation)")
    shortcut: str = option("A", "shortcut where a block changes shape: A zero-padding identity (paper, CIFAR), "
                                "B 1x1 conv projection", choices=("A", "B"))

    def check(self) -> None:
        check_positive("channels", self.channels, 3)
        check_width(self.width)


def _builder(depth: int):
    blocks = (depth - 2) // 6

    def build(input_shape: tuple[int, ...], num_classes: int, o: ResNetOptions) -> nn.Module:
        image = image_shape(input_shape, f"resnet{depth}")
        channels = tuple(scaled(c, o.width) for c in o.channels)
        return CifarResNet(image, blocks, channels, num_classes, batchnorm=o.batchnorm, shortcut=o.shortcut)

    return build


register("resnet20", "CIFAR ResNet-20 (3x3 basic blocks, 16/32/64 channels); a point after every residual block",
         ResNetOptions)(_builder(20))
register("resnet56", "CIFAR ResNet-56 (3x9 basic blocks, 16/32/64 channels); a point after every residual block",
         ResNetOptions)(_builder(56))
