"""The PyTorch port of PaddleOCR's text-direction classifier against the original ONNX file under ONNX Runtime.

The ONNX file is RapidOCR 1.2.13's ``ch_ppocr_mobile_v2.0_cls_infer.onnx`` (cached next to the detector). Inputs
are real: 48-row strips of calibration photos resized to 192x192, and single-word crops of seeded text renders
(upright and turned 180 degrees) resized to height 48 and zero-padded on the right to 192, as RapidOCR feeds the
classifier.

Tolerances. The output is a 2-way softmax. Measured on these inputs (seed 0) and on two other draws (seeds 1, 2:
other photos, other renders): max |torch fp32 - ORT| on the probabilities is 3.1e-6 (median of the nine per-set
maxima 8e-7), the fp64 port is at most 2.1e-6 from ORT, i.e. the remaining difference is ORT's own float32
rounding; the bound is 1e-5 for both, and the arg-max must agree everywhere.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mdeploy.calibration.config import QuantRecipe
from mdeploy.converters import REGISTRY, Target
from mdeploy.converters.base import ArtifactInfo
from mdeploy.demo_assets import DemoAssets
from mdeploy.errors import BadInputError
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.metrics import compare
from mdeploy.parity import torch_runner
from mdeploy.quantize.ptq import quantize
from mdeploy.zoo.ppocr_cls import (
    CLS_INPUT_SHAPE, PPOCRMobileV2Cls, cls_input, load_cls_weights, load_ppocr_cls, ppocr_cls_onnx, word_line_inputs,
)
from mdeploy.zoo.ppocr_weights import OnnxWeightsError
from mdeploy.zoo.text_images import render_text_images

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

torch.set_num_threads(1)

MAX_DIFF = 1e-5
PARAMETERS = 129_356  # weights and biases; BatchNorm running statistics are buffers
PHOTOS = 6  # calibration photos, 4 strips each
RENDERS = 8  # renders of seed 0, every word cropped


@pytest.fixture(scope="module")
def onnx_path(demo_assets: DemoAssets) -> Path:
    return ppocr_cls_onnx(demo_assets.photos_dir.parent)


@pytest.fixture(scope="module")
def model(onnx_path: Path) -> PPOCRMobileV2Cls:
    return load_ppocr_cls(onnx_path)


@pytest.fixture(scope="module")
def session(onnx_path: Path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def photo_strips(calib_dir: Path) -> np.ndarray:
    strips = []
    for path in sorted(calib_dir.glob("*.jpg"))[::40][:PHOTOS]:
        square = np.asarray(Image.open(path).convert("RGB").resize((192, 192), Image.Resampling.BILINEAR))
        strips += [cls_input(square[row:row + 48, :, ::-1]) for row in range(0, 192, 48)]
    return np.stack(strips)


@pytest.fixture(scope="module")
def word_crops(demo_assets: DemoAssets) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(upright, turned 180 degrees, backgrounds): one row per rendered word."""
    photos = [demo_assets.photos_dir / name for name in demo_assets.photos_eval]
    items = render_text_images(RENDERS, (320, 320), seed=0, photos=photos)
    upright, turned = word_line_inputs(items)
    return upright, turned, [item.background for item in items for _ in item.boxes]


def test_architecture(model: PPOCRMobileV2Cls) -> None:
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["backbone.conv1.conv.weight"] == (8, 3, 3, 3)
    assert shapes["backbone.blocks.0.mid_se.conv1.weight"] == (2, 8, 1, 1)
    assert shapes["backbone.blocks.10.bottleneck_conv.conv.weight"] == (200, 1, 5, 5)
    assert shapes["backbone.conv2.conv.weight"] == (200, 32, 1, 1)
    assert shapes["head.fc.weight"] == (2, 200)
    assert [b.bottleneck_conv.conv.stride for b in model.backbone.blocks] == [
        (2, 1), (2, 1), (1, 1), (2, 1), (1, 1), (1, 1), (1, 1), (1, 1), (2, 1), (1, 1), (1, 1)]
    with torch.no_grad():
        assert model.backbone(torch.zeros(1, *CLS_INPUT_SHAPE)).shape == (1, 200, 1, 48)


def test_graph_contract(onnx_path: Path) -> None:
    """The ONNX ops the port reproduces: Paddle's hardsigmoid, 2x2 max pool, MatMul + Add, softmax on axis 1."""
    graph = onnx.load(str(onnx_path)).graph
    attrs = {node.name: {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in graph.node}
    ops = [node.op_type for node in graph.node]
    assert ops.count("Conv") == 53 and ops.count("BatchNormalization") == 35 and ops.count("MatMul") == 1
    hardsigmoids = [attrs[n.name] for n in graph.node if n.op_type == "HardSigmoid"]
    assert len(hardsigmoids) == 9
    assert all(np.float32(a["alpha"]) == np.float32(0.2) and a["beta"] == 0.5 for a in hardsigmoids)
    (maxpool,) = [attrs[n.name] for n in graph.node if n.op_type == "MaxPool"]
    assert maxpool["kernel_shape"] == [2, 2] and maxpool["strides"] == [2, 2] and not any(maxpool["pads"])
    (softmax,) = [attrs[n.name] for n in graph.node if n.op_type == "Softmax"]
    assert softmax["axis"] == 1
    bn_eps = {np.float32(attrs[n.name]["epsilon"]) for n in graph.node if n.op_type == "BatchNormalization"}
    assert bn_eps == {np.float32(1e-5)}


def test_matches_onnxruntime(model: PPOCRMobileV2Cls, session, photo_strips: np.ndarray, word_crops) -> None:
    upright, turned, _ = word_crops
    model64 = copy.deepcopy(model).double()
    for name, x in {"photo strips": photo_strips, "words": upright, "words turned": turned}.items():
        assert x.shape[1:] == CLS_INPUT_SHAPE and x.dtype == np.float32
        expected = session.run(None, {"x": x})[0]
        with torch.no_grad():
            actual = model(torch.from_numpy(x)).numpy()
            exact = model64(torch.from_numpy(x).double()).numpy()
        assert actual.shape == expected.shape == (len(x), 2)
        worst = float(np.abs(actual - expected).max())
        print(f"\n{name} ({len(x)}): max |torch - ORT| {worst:.1e}, "
              f"max |torch fp64 - ORT| {np.abs(exact - expected).max():.1e}")
        assert worst <= MAX_DIFF
        assert np.abs(exact - expected).max() <= MAX_DIFF
        np.testing.assert_array_equal(actual.argmax(1), expected.argmax(1))


def test_reads_the_text_direction(model: PPOCRMobileV2Cls, word_crops) -> None:
    """Measured on seeds 0 and 1: every upright word on a plain background is "0" (37 of 37), 36 of 37 turned ones
    are "180"; words on photos are right 86-100% of the time."""
    upright, turned, backgrounds = word_crops
    plain = np.array([b == "plain" for b in backgrounds])
    with torch.no_grad():
        p_up = model(torch.from_numpy(upright)).numpy()
        p_turned = model(torch.from_numpy(turned)).numpy()
    assert plain.sum() >= 10
    assert (p_up[plain, 0] > 0.5).mean() >= 0.9
    assert (p_turned[plain, 1] > 0.5).mean() >= 0.9
    assert (p_up[:, 0] > 0.5).mean() >= 0.75 and (p_turned[:, 1] > 0.5).mean() >= 0.75


def test_loader_rejects_another_architecture(onnx_path: Path) -> None:
    wider = PPOCRMobileV2Cls(scale=0.5)  # every layer a different width
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(OnnxWeightsError, match="shape"):
        load_cls_weights(wider, onnx_path)
    assert all(torch.equal(before[k], v) for k, v in wider.state_dict().items())  # nothing half-loaded

    one_layer = PPOCRMobileV2Cls()
    one_layer.backbone.conv2.conv = torch.nn.Conv2d(32, 200, 3, padding=1, bias=False)  # 1x1 in the file
    before = {k: v.clone() for k, v in one_layer.state_dict().items()}
    with pytest.raises(OnnxWeightsError, match=r"backbone\.conv2\.conv .*weight shape"):
        load_cls_weights(one_layer, onnx_path)
    assert all(torch.equal(before[k], v) for k, v in one_layer.state_dict().items())

    with pytest.raises(OnnxWeightsError, match="weighted nodes"):
        load_cls_weights(PPOCRMobileV2Cls(disable_se=True), onnx_path)  # the file's SE convs have no home
    with pytest.raises(OnnxWeightsError, match="weight shape"):
        load_cls_weights(PPOCRMobileV2Cls(class_dim=3), onnx_path)  # the fc is 200 -> 2


def test_preprocessing_contract() -> None:
    red = np.zeros((48, 192, 3), dtype=np.uint8)
    red[..., 2] = 255  # BGR
    x = cls_input(red)
    assert x.shape == CLS_INPUT_SHAPE and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0, 0], [-1.0, -1.0, 1.0])
    with pytest.raises(BadInputError, match="48, 192"):
        cls_input(np.zeros((32, 100, 3), dtype=np.uint8))


def test_int8_tflite_is_one_xnnpack_partition_and_reads_the_direction(model: PPOCRMobileV2Cls, demo_assets: DemoAssets,
                                                                      word_crops, tmp_path: Path) -> None:
    """Trained MobileNetV3 (squeeze-excitation, hard-swish, PaddlePaddle's hard-sigmoid, a softmax head) as int8
    TFLite with mdeploy's default recipe, calibrated on words rendered on the calibration photos (both ways up):
    XNNPACK runs the whole graph (the softmax in float between int8 tensors), no other float op. Measured on the
    held-out words (seed 0, 78 crops): 98.7% agreement, 28.7 dB; bench/ptq_compare.py compares it with ONNX
    Runtime's and NNCF's quantisers on a larger split."""
    photos = [demo_assets.photos_dir / name for name in demo_assets.photos_calib]
    calibration = np.concatenate(word_line_inputs(render_text_images(RENDERS, (320, 320), seed=5, photos=photos)))
    graph = graph_from_torch(model, (1, *CLS_INPUT_SHAPE))
    quantized = quantize(graph, calibration, QuantRecipe.default())
    converter = REGISTRY[Target.tflite]
    path = tmp_path / "cls.int8.tflite"
    converter.export(quantized.graph, quantized, path, ArtifactInfo("cls", {}, ("0", "180")))
    report = converter.inspect(path)["graph"]
    assert report["xnnpack"]["partitions"] == 1 and report["xnnpack"]["ops_outside"] == [], report
    assert report["float_ops_inside"] == [] and len(report["float_softmaxes"]) == 1, report
    x = np.concatenate(word_crops[:2])
    metrics = compare(torch_runner(model)(x), converter.runner(path)(x))
    print(f"\nint8 TFLite on {len(x)} held-out words: {metrics.top1_agreement:.1%}, {metrics.snr_db:.1f} dB")
    assert metrics.top1_agreement >= 0.97 and metrics.snr_db >= 25.0
