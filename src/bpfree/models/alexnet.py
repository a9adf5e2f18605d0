"""AlexNet for small images (CIFAR style) with BatchNorm: 5 conv layers and 3 FC layers.

The channel widths of AlexNet (64, 192, 384, 256, 256) and its two 4096-wide hidden FC layers,
adapted to 32x32 inputs (stride-1 convolutions, 2x2 max pooling), as in the CIFAR versions used by
the feedback-alignment literature::

    input (batch, C, H, W)
    conv1: Conv 5x5 (C -> 64)    [BN] ReLU, MaxPool 2   -> point (batch,  64, H/2, W/2)
    conv2: Conv 5x5 (64 -> 192)  [BN] ReLU, MaxPool 2   -> point (batch, 192, H/4, W/4)
    conv3: Conv 3x3 (192 -> 384) [BN] ReLU              -> point (batch, 384, H/4, W/4)
    conv4: Conv 3x3 (384 -> 256) [BN] ReLU              -> point (batch, 256, H/4, W/4)
    conv5: Conv 3x3 (256 -> 256) [BN] ReLU, MaxPool 2   -> point (batch, 256, H/8, W/8)
    flatten -> fc1: Linear(256*H/8*W/8, 4096) [BN] ReLU -> point (batch, 4096)
               fc2: Linear(4096, 4096) [BN] ReLU        -> point (batch, 4096)
    head: Linear(4096, o)                                         (batch, o)

``H/2`` rounds up (``ceil_mode`` pooling), so 28 px gives 14, 7, 4 and 32 px gives 16, 8, 4.
Seven feedback points: one after each conv stage and each hidden FC layer. With
``batchnorm=True`` (the default, as in GrAPE's AlexNet) BatchNorm follows every conv and hidden FC
layer; ``batchnorm=False`` (the ablation) removes all BatchNorm and gives those layers biases.
Parameters at the defaults: 36.06 M on 32x32x3 with 10 classes (the FC layers hold 33.6 M of them).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..options import option
from . import register
from .cnn import ConvFCNet, ConvStage, check_positive, check_width, image_shape, init_conv_weights, scaled


@dataclass
class AlexNetOptions:
    channels: tuple[int, ...] = option((64, 192, 384, 256, 256), "output channels of the five conv layers")
    hidden: tuple[int, ...] = option((4096, 4096), "widths of the two hidden fully connected layers")
    width: float = option(1.0, "multiplier on every channel count and hidden width")
    batchnorm: bool = option(True, "BatchNorm after each conv and hidden FC layer (False: the no-BN ablation)")

    def check(self) -> None:
        check_positive("channels", self.channels, 5)
        check_positive("hidden", self.hidden, 2)
        check_width(self.width)


KERNELS = (5, 5, 3, 3, 3)
POOL_AFTER = (True, True, False, False, True)


@register("alexnet", "CIFAR-style AlexNet with BatchNorm (5 conv, 3 FC); points after each conv and hidden FC",
          AlexNetOptions)
def build_alexnet(input_shape: tuple[int, ...], num_classes: int, o: AlexNetOptions) -> nn.Module:
    image = image_shape(input_shape, "alexnet")
    stages = [ConvStage(scaled(c, o.width), kernel=k, pool=p) for c, k, p in zip(o.channels, KERNELS, POOL_AFTER)]
    model = ConvFCNet(image, stages, [scaled(m, o.width) for m in o.hidden], num_classes, batchnorm=o.batchnorm)
    return init_conv_weights(model)
