"""CONCAT along any axis and SOFTMAX over any axis (issue 15), the ops torchvision's SSDLite and segmentation heads
add: SSD's per-level ``view(N, A, K, H, W).permute(0, 3, 4, 1, 2).reshape(N, -1, K)`` of each feature map joined
along the anchors (dim 1 of rank 3; six levels, more than XNNPACK takes in one CONCATENATION), tokens joined along
dim 1, maps joined along H or W, pooled vectors along their features (rank 2), softmax over the channels of a map
(a segmentation's classes), over SSD's class axis, last or (transposed) dim 1, and LR-ASPP's sigmoid-gated head;
each through the executor, ONNX Runtime, LiteRT (XNNPACK) and the MIL reference, fp32 and int8, with XNNPACK's
partitions; ``.pt2`` and TorchScript; the clear errors for what stays unsupported (the batch axis).

Each small model puts its op between convolutions (so the int8 grids around it are real ones), is calibrated on
real photos and checked on other photos (``tests/test_ops_dense.py``'s harness).
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
from mdeploy.graph.ir import AxisAttrs, Graph, Op
from mdeploy.loading import load_model
from mdeploy.quantize.ptq import quantize
from tests.model_library import SAVERS
from tests.op_harness import (INFO, assert_fp32_everywhere, assert_int8_everywhere, build_and_trace, photo_sets,
                              reference)
from tests.test_ops_dense import Around, Fn, bn

SIZE = 32  # the stem's map is 16 x 16; no output's last axis is 10 (the label count: Core ML would make a classifier)
C = 16
K = 7  # classes of the SSD-like heads
A = 3  # anchors per location


def anchors_last(y: torch.Tensor, k: int) -> torch.Tensor:
    """torchvision's SSD head (``_v`` of SSDScoringHead): (N, A*K, H, W) -> (N, H*W*A, K)."""
    n, _, h, w = y.shape
    return y.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


class SSDLike(nn.Module):
    """A feature pyramid of ``levels`` maps (16x16 down to 1x1, stride-2 convs), a 3x3 head conv per map with A*K
    outputs, each read as (N, H*W*A, K) and joined along the anchors; ``softmax``: over the class axis (or ``dim``)."""

    def __init__(self, levels: int = 2, softmax: int | None = None) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, 2, 1), nn.ReLU6())
        self.downs = nn.ModuleList(nn.Sequential(nn.Conv2d(C, C, 3, 2, 1), nn.ReLU6()) for _ in range(levels - 1))
        self.heads = nn.ModuleList(nn.Conv2d(C, A * K, 3, padding=1) for _ in range(levels))
        self.softmax = softmax

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [self.stem(x)]
        for down in self.downs:
            maps.append(down(maps[-1]))
        y = torch.cat([anchors_last(head(m), K) for head, m in zip(self.heads, maps, strict=True)], dim=1)
        return y if self.softmax is None else y.softmax(self.softmax)


class Tokens(nn.Module):
    """Two maps (16x16 and its stride-2 conv) as tokens (N, H*W, C), joined along the tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, 2, 1), nn.ReLU6())
        self.down = nn.Conv2d(C, C, 3, 2, 1)
        self.mix = nn.Conv2d(C, 12, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return torch.cat([self.mix(y).flatten(2).transpose(1, 2), self.mix(self.down(y)).flatten(2).transpose(1, 2)],
                         dim=1)


class Pooled(nn.Module):
    """Two strided convs' maps flattened to (N, features) and joined along the features (rank 2), then a linear
    layer (spatial means would do, but the eval photos' means leave the calibrated range of 32 photos)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, 2, 1), nn.ReLU6())
        self.fine, self.coarse = nn.Conv2d(C, 4, 4, stride=4), nn.Sequential(nn.Conv2d(C, 2, 8, stride=8), nn.ReLU())
        self.fc = nn.Linear(4 * 4 * 4 + 2 * 2 * 2, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.fc(torch.cat([torch.flatten(self.fine(y), 1), torch.flatten(self.coarse(y), 1)], dim=-1))


class Pyramid(nn.Module):
    """A map and its (1x1-conv'd) copy joined along H (dim 2) or W (dim -1) of an (N, C, H, W) map."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.side = nn.Conv2d(C, C, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.side(x)], dim=self.dim)


class LRASPPScale(nn.Module):
    """torchvision's LR-ASPP head in small: a 1x1 conv + BN + ReLU gated by sigmoid(conv(global mean)), upsampled
    bilinearly (its fp32 TFLite global mean is two MEANs, over W then H: see the layout test)."""

    def __init__(self) -> None:
        super().__init__()
        self.cbr = nn.Sequential(nn.Conv2d(C, C, 1, bias=False), bn(C), nn.ReLU())
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(C, C, 1, bias=False), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.cbr(x) * self.scale(x), scale_factor=2, mode="bilinear", align_corners=False)


# name -> (model, the IR ops it must produce)
MODELS: dict[str, tuple[Callable[[], nn.Module], set[Op]]] = {
    "ssd_two_levels_cat_anchors": (lambda: SSDLike(2), {Op.CONCAT, Op.RESHAPE, Op.TRANSPOSE}),
    "ssd_six_levels_cat_anchors": (lambda: SSDLike(6), {Op.CONCAT, Op.RESHAPE, Op.TRANSPOSE}),
    "tokens_cat_dim1": (Tokens, {Op.CONCAT, Op.RESHAPE, Op.TRANSPOSE}),
    "pooled_cat_features": (Pooled, {Op.CONCAT, Op.LINEAR}),
    "map_cat_height": (lambda: Around(Pyramid(2)), {Op.CONCAT}),
    "map_cat_width": (lambda: Around(Pyramid(-1)), {Op.CONCAT}),
    "softmax_map_channels": (lambda: Around(lambda x: x.softmax(1), out=C), {Op.SOFTMAX}),
    "softmax_map_height": (lambda: Around(lambda x: torch.softmax(x, dim=2), out=C), {Op.SOFTMAX}),
    "ssd_softmax_classes": (lambda: SSDLike(2, softmax=-1), {Op.CONCAT, Op.SOFTMAX}),
    "lraspp_scale_gate": (lambda: Around(LRASPPScale()), {Op.GLOBAL_AVG_POOL, Op.SIGMOID, Op.MUL, Op.RESIZE}),
    "ssd_softmax_classes_dim1": (lambda: nn.Sequential(SSDLike(2), Fn(lambda y: y.transpose(1, 2).softmax(1))),
                                 {Op.CONCAT, Op.SOFTMAX}),
}

@pytest.fixture(scope="module")
def images(calib_dir: Path, demo_assets) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """(calibration photos, other photos to check on), preprocessed at SIZE."""
    return photo_sets(calib_dir, demo_assets.eval_dir, SIZE)


def _build(name: str, x: np.ndarray) -> tuple[nn.Module, Graph]:
    return build_and_trace(MODELS[name][0], SIZE, materialise=x)  # materialises the lazy head


def _outside_xnnpack(path: Path) -> tuple[list[str], int]:
    report = xnnpack_partitions(path.read_bytes())
    return sorted(op.split(" ")[0] for op in report["ops_outside"]), report["partitions"]


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_everywhere(name: str, images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    calibration, x = images
    model, graph = _build(name, calibration)
    assert MODELS[name][1] <= {n.op for n in graph.nodes}
    assert_fp32_everywhere(model, graph, x, tmp_path, limit=1e-5)  # float32 reordering only
    assert _outside_xnnpack(tmp_path / "m.fp32.tflite") == ([], 1)


# int8 SNR against PyTorch on photos the calibration did not see: the heads' conv outputs are requantised to the
# concat's grid (a reshape shares its input's grid, so it cannot take the concat's), one rounding more than a
# channel concat. 25 dB fails a wrong axis or a wrong grid (a softmax over the wrong axis, or joined along the wrong
# axis, is far below); each runtime must reproduce the simulation to 30 dB. XNNPACK (LiteRT 2.3) runs every model
# here in one partition, fp32 and int8: it has no int8 SOFTMAX, so the int8 graph computes each softmax in float
# between a DEQUANTIZE and a QUANTIZE to the quantiser's grid.
INT8_SNR_DB = 25.0


@pytest.mark.parametrize("name", list(MODELS))
def test_int8_everywhere(name: str, images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    calibration, x = images
    model, graph = _build(name, calibration)
    quantized = quantize(graph, calibration, QuantRecipe.default())  # equalisation and GPTQ, as the pipeline
    assert_int8_everywhere(model, quantized.graph, quantized, x, tmp_path, min_snr_db=INT8_SNR_DB,
                           min_snr_vs_simulation_db=30.0)
    path = tmp_path / "m.int8.tflite"
    assert _outside_xnnpack(path) == ([], 1)
    report = REGISTRY[Target.tflite].inspect(path)["graph"]
    assert report["float_ops_inside"] == [], report
    assert len(report["float_softmaxes"]) == sum(n.op is Op.SOFTMAX for n in graph.nodes), report


def test_axes_in_the_ir_and_the_tflite_layout(images: tuple[np.ndarray, np.ndarray], tmp_path: Path) -> None:
    """The tracer writes an axis only where it is not the op's default (channel concat, last-axis softmax keep
    ``attrs`` None, so their artifacts are unchanged); in TFLite SSD's heads join along the stored anchors with no
    TRANSPOSE (each level a RESHAPE of its NHWC map), six levels as CONCATENATIONs of at most four inputs, and a
    softmax over a map's channels reads NHWC as it is."""
    calibration, _ = images
    axes = {"ssd_two_levels_cat_anchors": [None], "map_cat_height": [AxisAttrs(2)],
            "map_cat_width": [AxisAttrs(3)], "pooled_cat_features": [None], "softmax_map_channels": [AxisAttrs(1)],
            "ssd_softmax_classes": [None, None], "ssd_softmax_classes_dim1": [None, AxisAttrs(1)]}
    for name, expected in axes.items():
        _, graph = _build(name, calibration)
        got = [n.attrs for n in graph.nodes if n.op in (Op.CONCAT, Op.SOFTMAX)]
        assert got == expected, name
    for name, joins in (("ssd_six_levels_cat_anchors", [4, 3]), ("softmax_map_channels", [])):
        _, graph = _build(name, calibration)
        path = tmp_path / f"{name}.tflite"
        REGISTRY[Target.tflite].export(graph, None, path, INFO)
        ops = REGISTRY[Target.tflite].inspect(path)["ops"]
        assert "TRANSPOSE" not in ops, ops
        assert ops.get("CONCATENATION", 0) == len(joins), ops
    _, graph = _build("lraspp_scale_gate", calibration)  # fp32: the global mean over W, then H; int8: one MEAN
    for quantized, means in ((None, 2), (quantize(graph, calibration, QuantRecipe.stock_minmax()), 1)):
        path = tmp_path / f"gate{means}.tflite"
        REGISTRY[Target.tflite].export(graph if quantized is None else quantized.graph, quantized, path, INFO)
        assert REGISTRY[Target.tflite].inspect(path)["ops"]["MEAN"] == means


def test_saved_as_pt2_and_torchscript_trace_the_same(tmp_path: Path) -> None:
    """``torch.export`` + ``torch.export.save`` and ``torch.jit.trace`` + ``torch.jit.save``: the same IR."""
    torch.manual_seed(0)
    model = SSDLike(3, softmax=-1).eval()
    example = torch.randn(1, 3, SIZE, SIZE)
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    expected = reference(model, x)
    histograms = []
    for kind, (save, suffix) in SAVERS.items():
        path = tmp_path / f"model{suffix}"
        save(model, example, path)
        graph = graph_from_torch(load_model(path).module, (1, 3, SIZE, SIZE))
        assert np.abs(GraphRunner(graph)(x).numpy().reshape(len(x), -1) - expected).max() <= 1e-5, kind
        histograms.append(graph.op_histogram())
    assert histograms[0] == histograms[1]
    assert histograms[0]["concat"] == 1 and histograms[0]["softmax"] == 1


@pytest.mark.parametrize(("fn", "message"), [
    (lambda x: torch.cat([x, x], dim=0), r"torch.cat along the batch axis \(dim 0\) at op \(Fn\)"),
    (lambda x: torch.softmax(x, dim=0), r"softmax over the batch axis \(dim 0\) at op \(Fn\)"),
])
def test_the_batch_axis_is_one_clear_line(fn: Callable[[torch.Tensor], torch.Tensor], message: str) -> None:
    model = Around(fn).eval()
    with torch.no_grad():
        model(torch.zeros(1, 3, SIZE, SIZE))
    with pytest.raises(UnsupportedOpError, match=message) as raised:
        graph_from_torch(model, (1, 3, SIZE, SIZE))
    assert "\n" not in str(raised.value)
