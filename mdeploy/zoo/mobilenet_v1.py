"""MobileNetV1 (Howard et al. 2017, Table 1), built from a layer table.

Layout: a 3x3 stride-2 stem conv to 32 channels, 13 depthwise-separable blocks, global average pool, dropout,
linear. Every conv is followed by batch norm and ReLU, as in the paper. The width multiplier scales every
channel count with ``make_divisible(c * width_mult, 8)``, the classifier input included.

State-dict keys: ``features.0.{0,1}.*`` (stem), ``features.N.dw.{0,1}.*`` and ``features.N.pw.{0,1}.*`` for
N = 1..13, ``classifier.1.*`` (``classifier.0`` is the dropout), the same classifier layout as MobileNetV2.

``dropout`` defaults to 0.2 like the other zoo models (TF-slim trained V1 with 0.001); it has no effect at
inference.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import ConvBNAct, DepthwiseSeparable, init_weights, make_divisible, pool_flatten

STEM_CHANNELS = 32

# (output channels, stride) of each depthwise-separable block: the paper's Table 1. The paper prints stride 2
# for the last depthwise conv, but its own output size (7x7 in, 7x7 out) and every reference implementation
# use stride 1.
V1_BLOCKS: list[tuple[int, int]] = [
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (512, 1),
    (1024, 2),
    (1024, 1),
]


class MobileNetV1(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        channels = make_divisible(STEM_CHANNELS * width_mult, 8)
        layers: list[nn.Module] = [ConvBNAct(3, channels, stride=2, act=nn.ReLU)]
        for out, stride in V1_BLOCKS:
            out_channels = make_divisible(out * width_mult, 8)
            layers.append(DepthwiseSeparable(channels, out_channels, stride))
            channels = out_channels
        self.features = nn.Sequential(*layers)
        self.last_channel = channels
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(channels, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(pool_flatten(self.features(x)))
