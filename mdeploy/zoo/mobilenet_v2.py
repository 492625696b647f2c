"""MobileNetV2 (Sandler et al. 2018), key-for-key and shape-for-shape identical to torchvision's.

``features.0`` is the 3x3 stride-2 stem, ``features.1..17`` the inverted residual blocks of the table below,
``features.18`` the 1x1 conv to 1280 channels; ``classifier`` is dropout then linear. Batch norm keeps
PyTorch's defaults (eps=1e-5, momentum=0.1), activations are ReLU6.
"""

from __future__ import annotations

from torch import Tensor, nn

from .layers import ConvBNAct, InvertedResidual, init_weights, make_divisible, pool_flatten

STEM_CHANNELS = 32
LAST_CHANNELS = 1280

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat): the paper's Table 2.
V2_SETTING: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        channels = make_divisible(STEM_CHANNELS * width_mult, 8)
        # As in torchvision (and the paper), the last conv never shrinks below 1280 channels.
        self.last_channel = make_divisible(LAST_CHANNELS * max(1.0, width_mult), 8)
        layers: list[nn.Module] = [ConvBNAct(3, channels, stride=2)]
        for t, c, n, s in V2_SETTING:
            out_channels = make_divisible(c * width_mult, 8)
            for i in range(n):
                layers.append(InvertedResidual(channels, out_channels, s if i == 0 else 1, expand_ratio=t))
                channels = out_channels
        layers.append(ConvBNAct(channels, self.last_channel, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(self.last_channel, num_classes))
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(pool_flatten(self.features(x)))
