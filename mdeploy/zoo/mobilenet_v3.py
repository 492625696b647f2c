"""MobileNetV3 Small and Large (Howard et al. 2019), key-for-key and shape-for-shape identical to torchvision's.

``features.0`` is the 3x3 stride-2 hardswish stem, then one :class:`InvertedResidualV3` per table row, then a
1x1 conv to 6x the last block's channels. ``classifier`` is linear, hardswish, dropout, linear. Batch norm uses
eps=0.001 and momentum=0.01 as torchvision does (a briefly trained V3 needs its BN statistics re-estimated).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from .layers import ConvBNAct, InvertedResidualV3, bn_v3, init_weights, make_divisible


class Bneck(NamedTuple):
    """One row of the paper's Tables 1 and 2 (channels before the width multiplier)."""

    in_channels: int
    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    use_hs: bool  # hardswish (HS) rather than ReLU (RE)
    stride: int


RE, HS = False, True

V3_LARGE: list[Bneck] = [
    Bneck(16, 3, 16, 16, False, RE, 1),
    Bneck(16, 3, 64, 24, False, RE, 2),
    Bneck(24, 3, 72, 24, False, RE, 1),
    Bneck(24, 5, 72, 40, True, RE, 2),
    Bneck(40, 5, 120, 40, True, RE, 1),
    Bneck(40, 5, 120, 40, True, RE, 1),
    Bneck(40, 3, 240, 80, False, HS, 2),
    Bneck(80, 3, 200, 80, False, HS, 1),
    Bneck(80, 3, 184, 80, False, HS, 1),
    Bneck(80, 3, 184, 80, False, HS, 1),
    Bneck(80, 3, 480, 112, True, HS, 1),
    Bneck(112, 3, 672, 112, True, HS, 1),
    Bneck(112, 5, 672, 160, True, HS, 2),
    Bneck(160, 5, 960, 160, True, HS, 1),
    Bneck(160, 5, 960, 160, True, HS, 1),
]
V3_LARGE_LAST = 1280

V3_SMALL: list[Bneck] = [
    Bneck(16, 3, 16, 16, True, RE, 2),
    Bneck(16, 3, 72, 24, False, RE, 2),
    Bneck(24, 3, 88, 24, False, RE, 1),
    Bneck(24, 5, 96, 40, True, HS, 2),
    Bneck(40, 5, 240, 40, True, HS, 1),
    Bneck(40, 5, 240, 40, True, HS, 1),
    Bneck(40, 5, 120, 48, True, HS, 1),
    Bneck(48, 5, 144, 48, True, HS, 1),
    Bneck(48, 5, 288, 96, True, HS, 2),
    Bneck(96, 5, 576, 96, True, HS, 1),
    Bneck(96, 5, 576, 96, True, HS, 1),
]
V3_SMALL_LAST = 1024


class MobileNetV3(nn.Module):
    """A MobileNetV3 built from a bneck table; use :class:`MobileNetV3Large` or :class:`MobileNetV3Small`."""

    def __init__(
        self,
        setting: list[Bneck],
        last_channel: int,
        width_mult: float = 1.0,
        num_classes: int = 1000,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()

        def scale(c: int) -> int:
            return make_divisible(c * width_mult, 8)

        layers: list[nn.Module] = [ConvBNAct(3, scale(setting[0].in_channels), stride=2, norm=bn_v3, act=nn.Hardswish)]
        for row in setting:
            layers.append(
                InvertedResidualV3(
                    scale(row.in_channels),
                    row.kernel,
                    scale(row.expanded),
                    scale(row.out_channels),
                    row.use_se,
                    row.use_hs,
                    row.stride,
                )
            )
        last_in = scale(setting[-1].out_channels)
        layers.append(ConvBNAct(last_in, 6 * last_in, kernel_size=1, norm=bn_v3, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.last_channel = scale(last_channel)
        self.classifier = nn.Sequential(
            nn.Linear(6 * last_in, self.last_channel),
            nn.Hardswish(),
            nn.Dropout(p=dropout),
            nn.Linear(self.last_channel, num_classes),
        )
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


class MobileNetV3Large(MobileNetV3):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__(V3_LARGE, V3_LARGE_LAST, width_mult, num_classes, dropout)


class MobileNetV3Small(MobileNetV3):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__(V3_SMALL, V3_SMALL_LAST, width_mult, num_classes, dropout)
