"""PaddleOCR's PP-OCRv3 text detector (DB), written as PaddleOCR defines it, with standard torch layers.

The model is PaddleOCR's ``BaseModel`` with the det config ``ch_PP-OCRv3_det_student.yml``:

- ``backbone``: ``ppocr/modeling/backbones/det_mobilenet_v3.py`` MobileNetV3 "large", scale 0.5, ``disable_se``.
  Unlike torchvision's V3, every block has its 1x1 expand conv (even when it does not widen), there is no
  classifier, and the blocks are cut into four stages whose outputs (strides 4, 8, 16, 32) feed the neck.
- ``neck``: ``ppocr/modeling/necks/rse_fpn.py`` RSEFPN, 96 channels, ``shortcut=True``: residual
  squeeze-excitation layers (``x + se(x)``) around a top-down FPN, four 24-channel maps upsampled to stride 4
  and concatenated.
- ``head``: ``ppocr/modeling/heads/det_db_head.py`` DBHead's inference path: only the ``binarize`` branch,
  which gives the shrink (probability) map at input resolution. The ``thresh`` branch is used in training
  only and is absent from the exported inference model, so it has no weights to load and is left out.

Module names follow Paddle's, so a Paddle state dict maps key for key (BatchNorm ``_mean``/``_variance``
are ``running_mean``/``running_var``). Two Paddle details reproduced exactly: Paddle's batch norm uses
eps=1e-5, and its hardsigmoid is ``clip(0.2 * x + 0.5, 0, 1)``, not torch's ``clip(x / 6 + 0.5, 0, 1)``.

Preprocessing (RapidOCR 1.2.13's ``TextDetector``, PaddleOCR's ``DetResizeForTest`` + ``NormalizeImage``):
the image is **BGR** (as cv2 reads it), scaled by 1/255, then normalised with the ImageNet mean/std in the
order written (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) applied to B, G, R; sides are resized so the
shorter one is at least 736 (``limit_type: min``) and each rounded to a multiple of 32 (the network needs it:
its strides reach 32 and the FPN adds maps of neighbouring strides).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..errors import BadInputError
from .layers import make_divisible

__all__ = ["PPOCRv3Det", "det_input", "det_resize", "det_resize_shape", "DET_MEAN", "DET_STD"]


class DetBneck(NamedTuple):
    """One row of det_mobilenet_v3's ``cfg`` (channels before the scale)."""

    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    act: str  # "relu" or "hardswish"
    stride: int


RE, HS = "relu", "hardswish"

DET_LARGE: list[DetBneck] = [
    DetBneck(3, 16, 16, False, RE, 1),
    DetBneck(3, 64, 24, False, RE, 2),
    DetBneck(3, 72, 24, False, RE, 1),
    DetBneck(5, 72, 40, True, RE, 2),
    DetBneck(5, 120, 40, True, RE, 1),
    DetBneck(5, 120, 40, True, RE, 1),
    DetBneck(3, 240, 80, False, HS, 2),
    DetBneck(3, 200, 80, False, HS, 1),
    DetBneck(3, 184, 80, False, HS, 1),
    DetBneck(3, 184, 80, False, HS, 1),
    DetBneck(3, 480, 112, True, HS, 1),
    DetBneck(3, 672, 112, True, HS, 1),
    DetBneck(5, 672, 160, True, HS, 2),
    DetBneck(5, 960, 160, True, HS, 1),
    DetBneck(5, 960, 160, True, HS, 1),
]
DET_LARGE_STEM = 16
DET_LARGE_LAST = 960  # cls_ch_squeeze: the 1x1 conv closing the last stage
DET_LARGE_FIRST_SPLIT = 2  # start_idx: only stride-2 rows after row 2 open a new stage

# ch_PP-OCRv3_det_student.yml
PPOCR_V3_SCALE = 0.5
PPOCR_V3_DISABLE_SE = True
PPOCR_V3_NECK_CHANNELS = 96

# Preprocessing contract (see the module docstring); the mean/std apply to the channels of a BGR image.
DET_MEAN = (0.485, 0.456, 0.406)
DET_STD = (0.229, 0.224, 0.225)
DET_LIMIT_SIDE_LEN = 736
DET_LIMIT_TYPE = "min"
DET_MULTIPLE = 32
DET_THRESH = 0.3  # DBPostProcess's binarisation threshold of the shrink map

_ACTS = {RE: nn.ReLU, HS: nn.Hardswish}


class PaddleHardsigmoid(nn.Module):
    """Paddle's ``F.hardsigmoid(x, slope=0.2, offset=0.5)`` = ``clip(0.2 x + 0.5, 0, 1)`` (ONNX HardSigmoid with
    alpha=0.2, beta=0.5). torch's ``nn.Hardsigmoid`` is ``clip(x / 6 + 0.5, 0, 1)``: a different function."""

    def __init__(self, slope: float = 0.2, offset: float = 0.5) -> None:
        super().__init__()
        self.slope = slope
        self.offset = offset

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x * self.slope + self.offset, 0.0, 1.0)

    def extra_repr(self) -> str:
        return f"slope={self.slope}, offset={self.offset}"


class ConvBNLayer(nn.Module):
    """det_mobilenet_v3's ConvBNLayer: conv (no bias), batch norm (eps 1e-5), optional relu/hardswish."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1,
        act: str | None = None,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=1e-5)
        self.act = _ACTS[act]() if act is not None else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.bn(self.conv(x))
        if self.act is not None:  # fixed at construction
            x = self.act(x)
        return x


class SEModule(nn.Module):
    """Squeeze-excitation of det_mobilenet_v3 and rse_fpn: pool, 1x1 conv (bias), relu, 1x1 conv (bias),
    Paddle hardsigmoid, times the input."""

    def __init__(self, in_channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.conv1 = nn.Conv2d(in_channels, in_channels // reduction, 1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(in_channels // reduction, in_channels, 1)
        self.hardsigmoid = PaddleHardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.hardsigmoid(self.conv2(self.relu(self.conv1(self.avg_pool(x)))))
        return x * scale


class ResidualUnit(nn.Module):
    """det_mobilenet_v3's bneck: 1x1 expand (always present), kxk depthwise, optional SE, 1x1 linear."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, kernel_size: int, stride: int,
                 use_se: bool, act: str) -> None:
        super().__init__()
        self.if_shortcut = stride == 1 and in_channels == out_channels
        self.expand_conv = ConvBNLayer(in_channels, mid_channels, 1, act=act)
        self.bottleneck_conv = ConvBNLayer(mid_channels, mid_channels, kernel_size, stride, groups=mid_channels,
                                           act=act)
        self.mid_se = SEModule(mid_channels) if use_se else None
        self.linear_conv = ConvBNLayer(mid_channels, out_channels, 1)

    def forward(self, inputs: Tensor) -> Tensor:
        x = self.bottleneck_conv(self.expand_conv(inputs))
        if self.mid_se is not None:
            x = self.mid_se(x)
        x = self.linear_conv(x)
        if self.if_shortcut:
            x = inputs + x
        return x


class MobileNetV3Det(nn.Module):
    """det_mobilenet_v3's MobileNetV3 ("large"): a stem ``conv`` then ``stage0``..``stage3``; returns the four
    stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, scale: float = PPOCR_V3_SCALE, disable_se: bool = PPOCR_V3_DISABLE_SE) -> None:
        super().__init__()
        inplanes = make_divisible(DET_LARGE_STEM * scale)
        self.conv = ConvBNLayer(3, inplanes, 3, stride=2, act=HS)
        stages: list[list[nn.Module]] = [[]]
        self.out_channels: list[int] = []
        for i, row in enumerate(DET_LARGE):
            if row.stride == 2 and i > DET_LARGE_FIRST_SPLIT:
                self.out_channels.append(inplanes)
                stages.append([])
            out = make_divisible(scale * row.out_channels)
            stages[-1].append(ResidualUnit(inplanes, make_divisible(scale * row.expanded), out, row.kernel,
                                           row.stride, row.use_se and not disable_se, row.act))
            inplanes = out
        last = make_divisible(scale * DET_LARGE_LAST)
        stages[-1].append(ConvBNLayer(inplanes, last, 1, act=HS))
        self.out_channels.append(last)
        self.stage_names = tuple(f"stage{i}" for i in range(len(stages)))  # Paddle's sublayer names
        for name, layers in zip(self.stage_names, stages):
            self.add_module(name, nn.Sequential(*layers))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.conv(x)
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class RSELayer(nn.Module):
    """rse_fpn's RSELayer: a conv (no bias, 'same' padding) then ``x + se(x)`` (or ``se(x)`` without shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, shortcut: bool = True) -> None:
        super().__init__()
        self.in_conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.se_block = SEModule(out_channels)
        self.shortcut = shortcut

    def forward(self, ins: Tensor) -> Tensor:
        x = self.in_conv(ins)
        if self.shortcut:
            return x + self.se_block(x)
        return self.se_block(x)


def upsample(x: Tensor, factor: int) -> Tensor:
    """Paddle's ``F.upsample(mode="nearest")``: ONNX Resize nearest, asymmetric, floor = torch's "nearest"."""
    return F.interpolate(x, scale_factor=factor, mode="nearest")


class RSEFPN(nn.Module):
    """rse_fpn's RSEFPN: 1x1 RSE layers to ``out_channels``, top-down sums, 3x3 RSE layers to a quarter each,
    upsampled to stride 4 and concatenated (deepest first)."""

    def __init__(self, in_channels: list[int], out_channels: int = PPOCR_V3_NECK_CHANNELS,
                 shortcut: bool = True) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.ins_conv = nn.ModuleList(RSELayer(c, out_channels, 1, shortcut) for c in in_channels)
        self.inp_conv = nn.ModuleList(
            RSELayer(out_channels, out_channels // 4, 3, shortcut) for _ in in_channels
        )

    def forward(self, x: list[Tensor]) -> Tensor:
        c2, c3, c4, c5 = x
        in5 = self.ins_conv[3](c5)
        in4 = self.ins_conv[2](c4)
        in3 = self.ins_conv[1](c3)
        in2 = self.ins_conv[0](c2)

        out4 = in4 + upsample(in5, 2)  # stride 16
        out3 = in3 + upsample(out4, 2)  # stride 8
        out2 = in2 + upsample(out3, 2)  # stride 4

        p5 = upsample(self.inp_conv[3](in5), 8)
        p4 = upsample(self.inp_conv[2](out4), 4)
        p3 = upsample(self.inp_conv[1](out3), 2)
        p2 = self.inp_conv[0](out2)
        return torch.cat([p5, p4, p3, p2], dim=1)


class Head(nn.Module):
    """det_db_head's Head: 3x3 conv + BN + relu, 2x2 stride-2 transposed conv + BN + relu, 2x2 stride-2
    transposed conv to one channel, sigmoid (stride 4 back to the input resolution)."""

    def __init__(self, in_channels: int, kernel_list: tuple[int, int, int] = (3, 2, 2)) -> None:
        super().__init__()
        mid = in_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, kernel_list[0], padding=kernel_list[0] // 2, bias=False)
        self.conv_bn1 = nn.BatchNorm2d(mid, eps=1e-5)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.ConvTranspose2d(mid, mid, kernel_list[1], stride=2)
        self.conv_bn2 = nn.BatchNorm2d(mid, eps=1e-5)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.ConvTranspose2d(mid, 1, kernel_list[2], stride=2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.conv_bn1(self.conv1(x)))
        x = self.relu2(self.conv_bn2(self.conv2(x)))
        return torch.sigmoid(self.conv3(x))


class DBHead(nn.Module):
    """det_db_head's DBHead at inference: the ``binarize`` branch's shrink map (``thresh`` is training-only)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.binarize = Head(in_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.binarize(x)


class PPOCRv3Det(nn.Module):
    """PP-OCRv3 text detector: (N, 3, H, W) normalised BGR, H and W multiples of 32 -> (N, 1, H, W) shrink map."""

    def __init__(self, scale: float = PPOCR_V3_SCALE, disable_se: bool = PPOCR_V3_DISABLE_SE,
                 neck_channels: int = PPOCR_V3_NECK_CHANNELS) -> None:
        super().__init__()
        self.backbone = MobileNetV3Det(scale, disable_se)
        self.neck = RSEFPN(self.backbone.out_channels, neck_channels, shortcut=True)
        self.head = DBHead(neck_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.neck(self.backbone(x)))


def det_resize_shape(height: int, width: int, limit_side_len: int = DET_LIMIT_SIDE_LEN,
                     limit_type: str = DET_LIMIT_TYPE) -> tuple[int, int]:
    """PaddleOCR's ``DetResizeForTest.resize_image_type0`` target (height, width): scale so the shorter side
    reaches ``limit_side_len`` ("min"; "max" caps the longer side instead), truncate, round to multiples of 32."""
    if limit_type == "max":
        ratio = limit_side_len / max(height, width) if max(height, width) > limit_side_len else 1.0
    elif limit_type == "min":
        ratio = limit_side_len / min(height, width) if min(height, width) < limit_side_len else 1.0
    else:
        raise BadInputError(f"limit_type must be 'min' or 'max', got {limit_type!r}")
    resize_h = int(round(int(height * ratio) / DET_MULTIPLE) * DET_MULTIPLE)
    resize_w = int(round(int(width * ratio) / DET_MULTIPLE) * DET_MULTIPLE)
    if resize_h <= 0 or resize_w <= 0:
        raise BadInputError(f"a {width}x{height} image is too small for the detector")
    return resize_h, resize_w


def det_resize(image: Image.Image, limit_side_len: int = DET_LIMIT_SIDE_LEN,
               limit_type: str = DET_LIMIT_TYPE) -> Image.Image:
    """``image`` resized as ``det_resize_shape`` says, bilinear (PaddleOCR uses cv2.resize, which does not
    antialias when shrinking: expect small differences from PIL there)."""
    height, width = det_resize_shape(image.height, image.width, limit_side_len, limit_type)
    if (height, width) == (image.height, image.width):
        return image
    return image.resize((width, height), Image.Resampling.BILINEAR)


def det_input(image: Image.Image) -> np.ndarray:
    """(1, 3, H, W) float32 detector input of an image whose sides are multiples of 32 (see ``det_resize``):
    RGB to BGR, x / 255, minus DET_MEAN, divided by DET_STD (both in B, G, R order)."""
    if image.width % DET_MULTIPLE or image.height % DET_MULTIPLE:
        raise BadInputError(
            f"detector input sides must be multiples of {DET_MULTIPLE}, got {image.width}x{image.height}: "
            f"resize with det_resize first"
        )
    bgr = np.asarray(image.convert("RGB"), dtype=np.float32)[:, :, ::-1]
    mean = np.array(DET_MEAN, dtype=np.float32)
    std = np.array(DET_STD, dtype=np.float32)
    normalised = (bgr * np.float32(1 / 255) - mean) / std
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])
