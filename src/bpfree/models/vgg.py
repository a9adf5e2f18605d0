"""VGG-16 with BatchNorm for 32x32 inputs: 13 conv layers and a 3-layer classifier.

Configuration "D" of Simonyan & Zisserman (2015), 3x3 convolutions, as commonly adapted to CIFAR
(the classifier acts on the 512 x 1 x 1 map left after five poolings)::

    input (batch, C, 32, 32)
    block  1- 2: Conv3x3  64 [BN] ReLU (x2), pool after the 2nd  -> (batch,  64, 16, 16)
    block  3- 4: Conv3x3 128 [BN] ReLU (x2), pool after the 2nd  -> (batch, 128,  8,  8)
    block  5- 7: Conv3x3 256 [BN] ReLU (x3), pool after the 3rd  -> (batch, 256,  4,  4)
    block  8-10: Conv3x3 512 [BN] ReLU (x3), pool after the 3rd  -> (batch, 512,  2,  2)
    block 11-13: Conv3x3 512 [BN] ReLU (x3), pool after the 3rd  -> (batch, 512,  1,  1)
    flatten -> fc1: Linear(512, 512) [BN] ReLU -> fc2: Linear(512, 512) [BN] ReLU
    head: Linear(512, o)

A feedback point follows every conv block (conv + BN + ReLU, and the pool where there is one)
and each hidden FC layer: 15 points. The first carries ``64*32*32 = 65536`` features (its ``B_l``
is ``65536 x o``). Pooling rounds up (``ceil_mode``), so 28x28 inputs work as well
(28 -> 14 -> 7 -> 4 -> 2 -> 1). ``batchnorm=False`` (the ablation) removes all BatchNorm.
Parameters at the defaults: 15.25 M on 32x32x3 with 10 classes (14.71 M in the conv layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..options import option
from . import register
from .cnn import ConvFCNet, ConvStage, check_positive, check_width, image_shape, init_conv_weights, scaled

#: VGG-16 ("D"): channels of the 13 conv layers; "M" is a 2x2 max pooling after the previous one.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@dataclass
class VGGOptions:
    width: float = option(1.0, "multiplier on every channel count and hidden width (0.25: a quarter-width VGG-16)")
    hidden: tuple[int, ...] = option((512, 512), "widths of the hidden fully connected layers (empty: none)")
    batchnorm: bool = option(True, "BatchNorm after each conv and hidden FC layer (False: the no-BN ablation)")

    def check(self) -> None:
        check_positive("hidden", self.hidden)
        check_width(self.width)


def vgg_stages(config, width: float) -> list[ConvStage]:
    """The conv stages of a VGG configuration (channels and ``"M"`` pooling markers)."""
    stages: list[ConvStage] = []
    for item in config:
        if item == "M":
            last = stages[-1]
            stages[-1] = ConvStage(last.channels, last.kernel, pool=True)
        else:
            stages.append(ConvStage(scaled(int(item), width), kernel=3))
    return stages


@register("vgg16", "VGG-16 with BatchNorm for 32x32 inputs (13 conv + 3 FC); points after each conv block and hidden FC",
          VGGOptions)
def build_vgg16(input_shape: tuple[int, ...], num_classes: int, o: VGGOptions) -> nn.Module:
    image = image_shape(input_shape, "vgg16")
    model = ConvFCNet(image, vgg_stages(VGG16, o.width), [scaled(m, o.width) for m in o.hidden], num_classes,
                      batchnorm=o.batchnorm)
    return init_conv_weights(model)
