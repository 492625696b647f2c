"""Building blocks of the MobileNet zoo.

The module layout (and therefore every state-dict key) follows torchvision's ``mobilenetv2.py``,
``mobilenetv3.py`` and ``ops/misc.py``, so torchvision checkpoints load strictly:

- :class:`ConvBNAct` is a ``Sequential`` of conv (``0``), batch norm (``1``) and an optional activation (``2``).
- :class:`InvertedResidual` (V2) keeps its layers in ``conv``; :class:`InvertedResidualV3` keeps them in
  ``block``, with a :class:`SqueezeExcitation` (``fc1``, ``fc2``) after the depthwise conv.
- :class:`DepthwiseSeparable` (V1, no torchvision counterpart) has ``dw`` and ``pw`` ``ConvBNAct`` children.

Two deliberate differences from torchvision that do not change keys, shapes or outputs: activations are not
in-place (so forward hooks on a batch norm see its real output, which calibration relies on), and residual
additions are out-of-place (``x + f(x)``), which keeps ``torch.export`` graphs free of mutations.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

NormFactory = Callable[[int], nn.Module]
ActFactory = Callable[[], nn.Module]


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` without dropping more than 10% (TF-slim's rule)."""
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


def bn_v2(channels: int) -> nn.BatchNorm2d:
    """Batch norm as in torchvision's MobileNetV2 (PyTorch defaults: eps=1e-5, momentum=0.1)."""
    return nn.BatchNorm2d(channels)


def bn_v3(channels: int) -> nn.BatchNorm2d:
    """Batch norm as in torchvision's MobileNetV3 (eps=0.001, momentum=0.01)."""
    return nn.BatchNorm2d(channels, eps=0.001, momentum=0.01)


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + optional activation; ``padding`` keeps the size at stride 1."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        norm: NormFactory = bn_v2,
        act: ActFactory | None = nn.ReLU6,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            norm(out_channels),
        ]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)
        self.out_channels = out_channels


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (skipped when ``expand_ratio == 1``), 3x3 depthwise, 1x1 linear project."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvBNAct(inp, hidden, kernel_size=1))
        layers += [
            ConvBNAct(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            bn_v2(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:  # fixed at construction: not data-dependent
            return x + self.conv(x)
        return self.conv(x)


class SqueezeExcitation(nn.Module):
    """Squeeze-and-excitation as in torchvision (``fc1``/``fc2`` are 1x1 convs with bias; V3 uses hardsigmoid)."""

    def __init__(
        self,
        input_channels: int,
        squeeze_channels: int,
        activation: ActFactory = nn.ReLU,
        scale_activation: ActFactory = nn.Hardsigmoid,
    ) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


class InvertedResidualV3(nn.Module):
    """MobileNetV3 bneck: optional 1x1 expand, kxk depthwise, optional SE, 1x1 linear project."""

    def __init__(
        self,
        in_channels: int,
        kernel: int,
        expanded_channels: int,
        out_channels: int,
        use_se: bool,
        use_hs: bool,
        stride: int,
    ) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.use_res_connect = stride == 1 and in_channels == out_channels
        act: ActFactory = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded_channels != in_channels:
            layers.append(ConvBNAct(in_channels, expanded_channels, kernel_size=1, norm=bn_v3, act=act))
        layers.append(
            ConvBNAct(
                expanded_channels,
                expanded_channels,
                kernel_size=kernel,
                stride=stride,
                groups=expanded_channels,
                norm=bn_v3,
                act=act,
            )
        )
        if use_se:
            layers.append(SqueezeExcitation(expanded_channels, make_divisible(expanded_channels // 4, 8)))
        layers.append(ConvBNAct(expanded_channels, out_channels, kernel_size=1, norm=bn_v3, act=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.block(x)
        return self.block(x)


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block: 3x3 depthwise conv + BN + ReLU (``dw``), then 1x1 pointwise + BN + ReLU (``pw``)."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.dw = ConvBNAct(inp, inp, kernel_size=3, stride=stride, groups=inp, act=nn.ReLU)
        self.pw = ConvBNAct(inp, oup, kernel_size=1, act=nn.ReLU)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        return self.pw(self.dw(x))


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: kaiming-normal convs, unit BN, N(0, 0.01) linears, zero biases.

    Skipped on the meta device (shape-only models), where the first random init costs a second.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def pool_flatten(x: Tensor) -> Tensor:
    """Global average pool to 1x1 and flatten to (N, C), export-friendly."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, (1, 1)), 1)
