"""The ops of detection and segmentation heads (issue 15): RESIZE (``F.interpolate``, ``nn.Upsample``,
``nn.UpsamplingNearest2d``, ``nn.UpsamplingBilinear2d``, sizes from another tensor's ``.shape[-2:]``) and
CONV_TRANSPOSE (``nn.ConvTranspose2d``, ``F.conv_transpose2d``: stride, padding, output_padding, groups, depthwise,
dilation, with and without bias, BatchNorm folded and ReLU/ReLU6 fused into it), each through the executor, ONNX
Runtime, LiteRT (XNNPACK) and the MIL reference, fp32 and int8, with XNNPACK's partitions; a DeepLab-like model
(ASPP pooling branch upsampled from 1x1), an FPN top-down path and DBNet's head; ``.pt2`` and TorchScript; the
clear errors for what a target cannot write as PyTorch computes it.

Each small model puts its op between convolutions (so the int8 grids around it are real ones), is calibrated on
real photos and checked on other photos.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeploy.calibration.config import QuantRecipe
from mdeploy.converters import REGISTRY, Target
from mdeploy.converters.tflite_report import xnnpack_partitions
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Activation, Graph, Op, ResizeAttrs
from mdeploy.graph.resize import nearest_indices
from mdeploy.loading import load_model
from mdeploy.quantize.ptq import quantize
from tests.model_library import SAVERS
from tests.op_harness import (INFO, assert_fp32_everywhere, assert_int8_everywhere, build_and_trace, export_and_run,
                              photo_sets, reference)

SIZE = 32  # the stem's map is 16 x 16; no output's last axis is 10 (the label count: Core ML would make a classifier)
C = 16


class Fn(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class Around(nn.Module):
    """conv -> op -> conv: the op reads and feeds real int8 grids."""

    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module, out: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, stride=2, padding=1), nn.ReLU6())
        self.op = op if isinstance(op, nn.Module) else Fn(op)
        self.head = nn.LazyConv2d(out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.op(self.stem(x)))


def bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm with statistics a trained one could have (folding must change the weights)."""
    norm = nn.BatchNorm2d(channels)
    with torch.no_grad():
        norm.running_mean.uniform_(-0.5, 0.5)
        norm.running_var.uniform_(0.5, 2.0)
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return norm


class TopDown(nn.Module):
    """An FPN step: the coarser map (a stride-2 conv of this one) upsampled to this map's own size (taken from
    ``.shape[-2:]``, as torchvision's FeaturePyramidNetwork does) and added to its lateral 1x1 conv."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.down, self.lateral = nn.Conv2d(C, C, 3, 2, 1), nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        coarse = F.relu(self.down(x))
        kwargs = {"align_corners": False} if self.mode == "bilinear" else {}
        return self.lateral(x) + F.interpolate(coarse, size=x.shape[-2:], mode=self.mode, **kwargs)


class DBHead(nn.Module):
    """DBNet's (PaddleOCR's DBHead) probability branch: conv 3x3 + BN + ReLU, then twice ConvTranspose2d(2, stride 2)
    + BN (+ ReLU), then sigmoid: back to the input's resolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(C, C // 4, 3, padding=1, bias=False), bn(C // 4)
        self.conv2, self.bn2 = nn.ConvTranspose2d(C // 4, C // 4, 2, stride=2), bn(C // 4)
        self.conv3 = nn.ConvTranspose2d(C // 4, 1, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return torch.sigmoid(self.conv3(x))


class DBNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, C, 3, 2, 1), nn.ReLU6(), nn.Conv2d(C, C, 3, 2, 1), nn.ReLU6())
        self.head = DBHead()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class DeepLabLike(nn.Module):
    """torchvision's DeepLabV3 in small: backbone (stride 4), ASPP with a dilated 3x3 branch and the image-pooling
    branch (AdaptiveAvgPool2d(1) -> conv -> BN -> ReLU -> F.interpolate to the features' ``.shape[-2:]``, a 1x1
    map broadcast), concat, projection, classifier, and F.interpolate back to the input's ``.shape[-2:]``."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, C, 3, 2, 1), bn(C), nn.ReLU6(), nn.Conv2d(C, 2 * C, 3, 2, 1),
                                      bn(2 * C), nn.ReLU6())
        self.atrous = nn.Sequential(nn.Conv2d(2 * C, C, 3, padding=2, dilation=2, bias=False), bn(C), nn.ReLU())
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(2 * C, C, 1, bias=False), bn(C), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(2 * C, C, 1, bias=False), bn(C), nn.ReLU())
        self.classifier = nn.Conv2d(C, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        pooled = F.interpolate(self.pooling(features), size=features.shape[-2:], mode="bilinear", align_corners=False)
        y = self.classifier(self.project(torch.cat([self.atrous(features), pooled], dim=1)))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


def conv_transpose_functional() -> nn.Module:
    """F.conv_transpose2d with a registered weight: dilation 2, padding 2 > output_padding 1, stride 2."""
    module = Fn(lambda x: F.conv_transpose2d(x, module.weight, module.bias, stride=2, padding=2, output_padding=1,
                                             dilation=2))
    module.weight = nn.Parameter(torch.randn(C, 8, 3, 3) * 0.1)
    module.bias = nn.Parameter(torch.randn(8) * 0.1)
    return module


# name -> (model, the IR ops it must produce)
MODELS: dict[str, tuple[Callable[[], nn.Module], set[Op]]] = {
    # nearest by whole factors (FPN's 2x): repetition in every target
    "interpolate_nearest_x2": (lambda: Around(lambda x: F.interpolate(x, scale_factor=2, mode="nearest")), {Op.RESIZE}),
    "upsample_nearest_x3": (lambda: Around(nn.Upsample(scale_factor=3)), {Op.RESIZE}),
    "upsampling_nearest2d_x2": (lambda: Around(nn.UpsamplingNearest2d(scale_factor=2)), {Op.RESIZE}),
    "fpn_nearest_to_shape": (lambda: Around(TopDown("nearest")), {Op.RESIZE, Op.ADD}),
    # other nearest sampling
    "nearest_to_size": (lambda: Around(lambda x: F.interpolate(x, size=(11, 21), mode="nearest")), {Op.RESIZE}),
    "nearest_exact_to_size": (lambda: Around(lambda x: F.interpolate(x, size=(11, 21), mode="nearest-exact")),
                              {Op.RESIZE}),
    "nearest_downscale": (lambda: Around(lambda x: F.interpolate(x, scale_factor=0.5)), {Op.RESIZE}),
    "nearest_scale_sets_sampling": (lambda: Around(lambda x: F.interpolate(x, scale_factor=1.3)), {Op.RESIZE}),
    # bilinear
    "bilinear_to_size": (lambda: Around(lambda x: F.interpolate(x, size=(11, 21), mode="bilinear")), {Op.RESIZE}),
    "bilinear_align_corners": (lambda: Around(lambda x: F.interpolate(x, size=(11, 21), mode="bilinear",
                                                                      align_corners=True)), {Op.RESIZE}),
    "upsample_bilinear_x2": (lambda: Around(nn.Upsample(scale_factor=2, mode="bilinear")), {Op.RESIZE}),
    "upsampling_bilinear2d_x2": (lambda: Around(nn.UpsamplingBilinear2d(scale_factor=2)), {Op.RESIZE}),
    "bilinear_x1_5": (lambda: Around(lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear")), {Op.RESIZE}),
    "bilinear_downscale": (lambda: Around(lambda x: F.interpolate(x, size=(7, 5), mode="bilinear")), {Op.RESIZE}),
    "fpn_bilinear_to_shape": (lambda: Around(TopDown("bilinear")), {Op.RESIZE, Op.ADD}),
    "deeplab_like": (DeepLabLike, {Op.RESIZE, Op.GLOBAL_AVG_POOL, Op.CONCAT}),
    # transposed convolutions
    "conv_transpose_k2s2": (lambda: Around(nn.ConvTranspose2d(C, C, 2, stride=2)), {Op.CONV_TRANSPOSE}),
    "conv_transpose_k4s2p1_relu6": (lambda: Around(nn.Sequential(nn.ConvTranspose2d(C, 8, 4, 2, 1), nn.ReLU6())),
                                    {Op.CONV_TRANSPOSE}),
    "conv_transpose_grouped_output_padding": (lambda: Around(nn.ConvTranspose2d(C, C, 3, 2, 1, 1, groups=4,
                                                                                bias=False)), {Op.CONV_TRANSPOSE}),
    "conv_transpose_depthwise_bn": (lambda: Around(nn.Sequential(nn.ConvTranspose2d(C, C, 3, 2, 1, 1, groups=C),
                                                                 bn(C), nn.ReLU())), {Op.CONV_TRANSPOSE}),
    "conv_transpose_output_padding_only": (lambda: Around(nn.ConvTranspose2d(C, C, 2, 2, output_padding=1)),
                                           {Op.CONV_TRANSPOSE}),
    "conv_transpose_stride1": (lambda: Around(nn.ConvTranspose2d(C, C, 3, 1, 1)), {Op.CONV_TRANSPOSE}),
    "conv_transpose_dilated_functional": (lambda: Around(conv_transpose_functional()), {Op.CONV_TRANSPOSE}),
    "dbnet_head": (DBNetLike, {Op.CONV_TRANSPOSE, Op.SIGMOID}),
}

# XNNPACK (LiteRT 2.3) refuses RESIZE_NEAREST_NEIGHBOR and GATHER, fp32 and int8: nearest sampling other than by
# whole factors runs on LiteRT's builtin kernels, a partition boundary on each side. Everything else here is one
# partition: RESIZE_BILINEAR, the CONCATENATION + RESHAPE repetition and TRANSPOSE_CONV (+ SLICE).
OUTSIDE_XNNPACK = {"nearest_to_size": ["RESIZE_NEAREST_NEIGHBOR"], "nearest_exact_to_size": ["RESIZE_NEAREST_NEIGHBOR"],
                   "nearest_downscale": ["RESIZE_NEAREST_NEIGHBOR"],
                   "nearest_scale_sets_sampling": ["GATHER", "GATHER"]}
# ExecuTorch's partitioner gives XNNPACK no nearest resize (upsampling by whole factors is written as copies,
# converters/pte_forms.py): the same four run on its portable kernels, fp32 and int8
PTE_OUTSIDE = {"nearest_to_size": ("aten::upsample_nearest2d",), "nearest_downscale": ("aten::upsample_nearest2d",),
               "nearest_scale_sets_sampling": ("aten::upsample_nearest2d",),
               "nearest_exact_to_size": ("aten::arange", "aten::index", "aten::unsqueeze_copy",
                                         "dim_order_ops::_to_dim_order_copy")}


@pytest.fixture(scope="module")
def images(calib_dir: Path, demo_assets) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(calibration photos, other photos to check on), preprocessed at SIZE."""
    return photo_sets(calib_dir, demo_assets.eval_dir, SIZE)


def _build(name: str, x: np.ndarray) -> tuple[nn.Module, Graph]:
    return build_and_trace(MODELS[name][0], SIZE, materialise=x)  # materialises the lazy head


def _assert_xnnpack(name: str, path: Path) -> None:
    report = xnnpack_partitions(path.read_bytes())
    outside = OUTSIDE_XNNPACK.get(name, [])
    assert sorted(op.split(" ")[0] for op in report["ops_outside"]) == outside, report
    assert report["partitions"] == (2 if outside else 1), report


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_everywhere(name: str, images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    calibration, x = images
    model, graph = _build(name, calibration)
    assert MODELS[name][1] <= {n.op for n in graph.nodes}
    assert_fp32_everywhere(model, graph, x, tmp_path, limit=1e-5,  # float32 reordering only
                           pte_outside=PTE_OUTSIDE.get(name, ()))
    _assert_xnnpack(name, tmp_path / "m.fp32.tflite")


# int8 SNR against PyTorch on photos the calibration did not see: stem -> op -> head quantises ~4 tensors, each per
# tensor over its calibrated range (RESIZE on its input's grid: nearest is exact there, bilinear rounds once more);
# the simulation measures 38-48 dB here (the FPN steps, which add two rounded maps, 32-33 dB; DBNet's head 59 dB).
# 25 dB leaves margin and fails a wrong grid; a wrong sampling or kernel layout fails the fp32 test long before (in
# fp32, sampling nearest at half-pixel centres measures 10.6 dB here, an unflipped transposed kernel 7-26 dB, bilinear
# with align_corners swapped 25 dB). Each runtime must reproduce the simulation to 33 dB (measured 39.7 dB and up):
# XNNPACK's int8 RESIZE_BILINEAR interpolates with fixed-point weights (where the simulation rounds the exact value
# once), Core ML's W8A8 program computes in fp16.
INT8_SNR_DB = 25.0


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_everywhere(name: str, images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    calibration, x = images
    model, graph = _build(name, calibration)
    quantized = quantize(graph, calibration, QuantRecipe.default())  # equalisation and GPTQ, as the pipeline
    assert_int8_everywhere(model, quantized.graph, quantized, x, tmp_path, min_snr_db=INT8_SNR_DB,
                           min_snr_vs_simulation_db=33.0,  # the runtime runs what the quantiser chose
                           pte_outside=PTE_OUTSIDE.get(name, ()))
    path = tmp_path / "m.int8.tflite"
    _assert_xnnpack(name, path)
    assert REGISTRY[Target.tflite].inspect(path)["graph"]["float_ops_inside"] == []
    for node in (n for n in graph.nodes if n.op is Op.RESIZE):  # on its input's grid: no requantisation
        assert quantized.activations[node.output] == quantized.activations[node.inputs[0]]


def test_batch_norm_and_activations_fold_into_transposed_convolutions(images: tuple[np.ndarray, np.ndarray]) -> None:
    calibration, _ = images
    _, graph = _build("dbnet_head", calibration)
    transposed = [n for n in graph.nodes if n.op is Op.CONV_TRANSPOSE]
    assert [n.activation for n in transposed] == [Activation.RELU, Activation.NONE]
    assert Op.AFFINE not in {n.op for n in graph.nodes} and Op.RELU not in {n.op for n in graph.nodes}
    _, graph = _build("conv_transpose_depthwise_bn", calibration)
    (node,) = [n for n in graph.nodes if n.op is Op.CONV_TRANSPOSE]
    assert node.activation is Activation.RELU and node.weight.shape == (C, 1, 3, 3)


def test_resize_keeps_the_sizes_and_only_the_scales_that_matter(images: tuple[np.ndarray, np.ndarray]) -> None:
    """A scale factor that gives whole sizes samples as the sizes do and is dropped; one that does not is kept
    (PyTorch then samples at d / 1.3, not d * 16 / 20); nearest-exact that reads what nearest reads is nearest."""
    calibration, _ = images
    expected = {"interpolate_nearest_x2": ResizeAttrs((32, 32), "nearest"),
                "bilinear_x1_5": ResizeAttrs((24, 24), "bilinear"),
                "upsampling_bilinear2d_x2": ResizeAttrs((32, 32), "bilinear", align_corners=True),
                "nearest_scale_sets_sampling": ResizeAttrs((20, 20), "nearest", scales=(1.3, 1.3))}
    for name, attrs in expected.items():
        _, graph = _build(name, calibration)
        assert [n.attrs for n in graph.nodes if n.op is Op.RESIZE] == [attrs], name
    assert not np.array_equal(nearest_indices(16, 20, False, 1.3), nearest_indices(16, 20, False))
    model = Around(lambda x: F.interpolate(x, scale_factor=2, mode="nearest-exact")).eval()
    with torch.no_grad():
        model(torch.from_numpy(calibration[:1]))
    graph = graph_from_torch(model, (1, 3, SIZE, SIZE))
    assert [n.attrs.mode for n in graph.nodes if n.op is Op.RESIZE] == ["nearest"]  # type: ignore[union-attr]


def test_saved_as_pt2_and_torchscript_trace_the_same(tmp_path: Path) -> None:
    """``torch.export`` + ``torch.export.save`` and ``torch.jit.trace`` + ``torch.jit.save`` (sizes from
    ``.shape[-2:]`` become constants, transposed convolutions come as ``aten.convolution``): the same IR."""
    torch.manual_seed(0)
    model = nn.Sequential(DeepLabLike(classes=C), DBHead()).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    expected = reference(model, x)
    histograms = []
    for kind, (save, suffix) in SAVERS.items():
        path = tmp_path / f"model{suffix}"
        save(model, example, path)
        graph = graph_from_torch(load_model(path).module, (1, 3, SIZE, SIZE))
        assert np.abs(GraphRunner(graph)(x).numpy().reshape(len(x), -1) - expected).max() <= 1e-5, kind
        assert any("ConvTranspose2d" in n.source for n in graph.nodes if n.op is Op.CONV_TRANSPOSE), kind
        histograms.append(graph.op_histogram())
    assert histograms[0] == histograms[1]
    assert histograms[0]["resize"] == 2 and histograms[0]["conv_transpose+relu"] == 1


# -- what is not supported: one line naming the op, the user's module and the target -----------------------------
@pytest.mark.parametrize(("mode", "message"), [
    ("bilinear", r"F.interpolate\(mode='bilinear', antialias=True\) at op \(Fn\) is not supported"),
    ("bicubic", r"F.interpolate\(mode='bicubic', antialias=True\) at op \(Fn\) is not supported"),
])
def test_antialiasing_is_one_clear_line(mode: str, message: str) -> None:
    model = Around(lambda x: F.interpolate(x, size=(8, 8), mode=mode, antialias=True)).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(UnsupportedOpError, match=message) as raised:
        graph_from_torch(model, (1, 3, SIZE, SIZE))
    assert "\n" not in str(raised.value)


def test_bicubic_names_the_op_and_module() -> None:
    model = Around(lambda x: F.interpolate(x, scale_factor=2, mode="bicubic")).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(UnsupportedOpError, match=r"aten.upsample_bicubic2d \(from op \(Fn\)\) is not supported"):
        graph_from_torch(model, (1, 3, SIZE, SIZE))


def test_bilinear_sampled_by_a_scale_factor_is_onnx_only(images: tuple[np.ndarray, np.ndarray],
                                                         tmp_path: Path) -> None:
    """16 x 1.3 = 20.8 -> 20 pixels sampled at (d + 0.5) / 1.3 - 0.5 (scale factor not recomputed): ONNX's Resize
    takes the scale; TFLite's and Core ML's bilinear resizes sample by the sizes, so those targets refuse it."""
    calibration, x = images
    model, graph = build_and_trace(lambda: Around(lambda t: F.interpolate(t, scale_factor=1.3, mode="bilinear")),
                                   SIZE, materialise=calibration)
    expected = reference(model, x)
    out = export_and_run(Target.onnx, graph, None, x, tmp_path / "m.onnx")
    assert np.abs(out - expected).max() <= 1e-5 * max(1.0, float(np.abs(expected).max()))
    for target, op in ((Target.tflite, "RESIZE_BILINEAR"), (Target.coreml, "resize_bilinear")):
        target_name = "TFLite" if target is Target.tflite else "Core ML"
        with pytest.raises(UnsupportedOpError, match=rf"the {target_name} target cannot resize \(16, 16\) -> "
                                                     rf"\(20, 20\) at op \(Fn\) .* scale_factor \(1.3, 1.3\) .*{op}"):
            REGISTRY[target].export(graph, None, tmp_path / f"m{REGISTRY[target].suffix}", INFO)
