"""The TFLite target: clean int8 graphs (no TRANSPOSE, no float op, one XNNPACK partition), parity with the
fake-quant simulation and with PyTorch, I/O types, metadata, and the odd user model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mdeploy.converters.base import ArtifactInfo, missing_modules
from mdeploy.converters.tflite import HardSwishMode, IOType, Kernels, TfliteConverter
from mdeploy.converters.tflite_flatbuffer import read_model
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph, Op
from mdeploy.parity import torch_runner
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.quantize.simulate import simulate
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_converters import nearest_int8
from tests.test_graph import TfStylePadding, randomize_batch_norm

pytestmark = pytest.mark.skipif(bool(missing_modules(TfliteConverter())), reason="ai-edge-litert not installed")

INFO = ArtifactInfo("model", {"crop": 224, "mean": [0.485, 0.456, 0.406]}, ("cat", "dog"), "test",
                    {"mdeploy.recipe": "{}"})
V3 = (Arch.mobilenet_v3_small, Arch.mobilenet_v3_large)


def quantized_model(arch: Arch, width: float, size: int, classes: int = 1000
                    ) -> tuple[nn.Module, Graph, QuantizedGraph, np.ndarray]:
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(arch, width, classes, 0.2)))
    graph = graph_from_torch(model, (1, 3, size, size))
    x = np.random.default_rng(1).standard_normal((6, 3, size, size)).astype(np.float32)
    return model, graph, nearest_int8(graph, x[:4]), x


def lsb_errors(output: np.ndarray, quantized: QuantizedGraph, x: np.ndarray) -> np.ndarray:
    """|artifact - simulation| in units of the output's int8 step (both sit on that grid: whole numbers)."""
    errors = np.abs(output - simulate(quantized, x)) / quantized.activations[quantized.graph.outputs[0]].scale
    return np.round(errors, 2)


@pytest.mark.parametrize("arch", list(Arch))
@pytest.mark.parametrize("width", [0.5, 1.0])
@pytest.mark.parametrize("size", [160, 224])
def test_int8_graph_is_one_clean_xnnpack_partition(arch: Arch, width: float, size: int, tmp_path: Path) -> None:
    _, graph, quantized, x = quantized_model(arch, width, size)
    converter = TfliteConverter()
    path = tmp_path / "model.int8.tflite"
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)
    graph_report = report["graph"]
    assert graph_report["transposes"] == 0
    assert graph_report["float_ops_inside"] == []
    assert graph_report["xnnpack"]["partitions"] == 1
    assert graph_report["xnnpack"]["ops_outside"] == []
    assert "HARD_SWISH" not in report["ops"] and "QUANTIZE" not in report["ops"]
    assert report["inputs"][0]["dtype"] == report["outputs"][0]["dtype"] == "int8"
    assert report["inputs"][0]["shape"] == [1, size, size, 3]
    assert report["int8_weight_tensors"] == len(graph.weighted_nodes)

    errors = lsb_errors(converter.runner(path)(x), quantized, x)
    # Integer kernels round requantisations in fixed point where the simulation rounds in float: a few 1-LSB
    # flips per layer, which V3's 50-odd layers (and the int8 hardswish gate) accumulate to a few LSB.
    if arch in V3:
        assert errors.max() <= 4 and errors.mean() <= 0.75 and (errors > 1.5).mean() <= 0.06
    else:
        assert errors.max() <= 2 and errors.mean() <= 0.25


@pytest.mark.parametrize("arch", V3)
def test_int8_v3_multiplies_by_a_sixth_only_where_no_layer_absorbs_it(arch: Arch, tmp_path: Path) -> None:
    """hardswish(x) = x * relu6(x + 3) / 6 and hardsigmoid(x) = relu6(x + 3) / 6: the 1/6 is a factor on the stored
    grid (the same codes) that the convs and linears reading the tensor take into their weight scales, also through
    squeeze-and-excitation's pool and product, so no MUL is written for it. torchvision's V3 keeps it where another
    op reads the hardswish: the last conv's (FLATTEN, after the pool; the classifier's, between two linears, is
    absorbed) and, in V3-Large, the stem's (the first block's residual ADD). (Values: the partition test above, against the simulation.) A tensor stored times 6 is
    not named after its IR tensor: the per-layer taps never read it."""
    _, graph, quantized, _ = quantized_model(arch, 0.5, 96)
    path = tmp_path / "model.int8.tflite"
    TfliteConverter().export(graph, quantized, path, INFO)
    ops = TfliteConverter().inspect(path)["ops"]
    hardswishes = [n for n in graph.nodes if n.op is Op.HARDSWISH]
    products = sum(n.op is Op.MUL for n in graph.nodes)  # squeeze-and-excitation's x * gate
    assert products > 0 and any(n.op is Op.HARDSIGMOID for n in graph.nodes)
    tensors = {t.name.decode() for t in read_model(path.read_bytes()).subgraphs[0].tensors}
    kept = [n.output for n in hardswishes if n.output in tensors]
    last_conv = hardswishes[-2]  # the last is the classifier's, between its two linears
    assert graph.consumers(graph.consumers(last_conv.output)[0].output)[0].op is Op.FLATTEN
    if arch is Arch.mobilenet_v3_large:
        assert kept == [hardswishes[0].output, last_conv.output]
        assert Op.ADD in {n.op for n in graph.consumers(kept[0])}
    else:
        assert kept == [last_conv.output]
    assert sum(name.endswith("/sixth") for name in tensors) == len(kept)
    assert ops["MUL"] == len(hardswishes) + products + len(kept), ops  # x * relu6(x + 3), x * gate, the 1/6s


def test_fp32_graph_is_one_xnnpack_partition_with_hard_swish(tmp_path: Path) -> None:
    model, graph, _, x = quantized_model(Arch.mobilenet_v3_small, 0.5, 96)
    converter = TfliteConverter()
    path = tmp_path / "model.fp32.tflite"
    converter.export(graph, None, path, INFO)
    report = converter.inspect(path)
    assert report["graph"]["xnnpack"]["partitions"] == 1 and report["graph"]["transposes"] == 0
    assert report["ops"]["HARD_SWISH"] == sum(n.op is Op.HARDSWISH for n in graph.nodes)
    assert report["int8_weight_tensors"] == 0 and not report["graph"]["int8"]
    reference = torch_runner(model)(x)
    for kernels in Kernels:
        assert np.abs(converter.runner(path, kernels=kernels)(x) - reference).max() <= 1e-4


def test_int8_hard_swish_op_splits_xnnpack(tmp_path: Path) -> None:
    """Pins the runtime limit the decomposition works around: if LiteRT's XNNPACK ever takes int8 HARD_SWISH,
    this fails, and the single op should come back."""
    _, graph, quantized, x = quantized_model(Arch.mobilenet_v3_small, 0.5, 96)
    converter = TfliteConverter(hardswish=HardSwishMode.builtin)
    path = tmp_path / "model.int8.tflite"
    converter.export(graph, quantized, path, INFO)
    xnnpack = converter.inspect(path)["graph"]["xnnpack"]
    hardswishes = sum(n.op is Op.HARDSWISH for n in graph.nodes)
    assert xnnpack["partitions"] > 1
    assert sum(op.startswith("HARD_SWISH") for op in xnnpack["ops_outside"]) == hardswishes
    assert lsb_errors(converter.runner(path)(x), quantized, x).mean() <= 0.75


@pytest.mark.parametrize("io", list(IOType))
def test_io_types_carry_their_quantisation(io: IOType, tmp_path: Path) -> None:
    _, graph, quantized, x = quantized_model(Arch.mobilenet_v3_small, 0.5, 96)
    path = tmp_path / f"model.{io.value}.tflite"
    converter = TfliteConverter(io=io)
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)
    described = json.loads(report["metadata"]["mdeploy.io"])
    expected_type = {"int8": "int8", "uint8": "uint8", "float": "float32"}[io.value]
    for side, tensor in (("input", report["inputs"][0]), ("output", report["outputs"][0])):
        assert tensor["dtype"] == described[side]["dtype"] == expected_type
        assert (tensor["name"], tensor.get("scale"), tensor.get("zero_point")) == (
            described[side]["name"], described[side].get("scale"), described[side].get("zero_point"))
    q_in = quantized.activations[graph.input_name]
    if io is not IOType.float:
        assert described["input"]["scale"] == pytest.approx(q_in.scale)
        assert described["input"]["zero_point"] == q_in.zero_point + (128 if io is IOType.uint8 else 0)
    graph_report = report["graph"]
    assert graph_report["float_ops_inside"] == [] and graph_report["xnnpack"]["partitions"] == 1
    outside = graph_report["xnnpack"]["ops_outside"]
    assert [op.split(" ")[0] for op in outside] == (["QUANTIZE", "QUANTIZE"] if io is IOType.uint8 else [])
    output = converter.runner(path)(x)
    assert lsb_errors(output, quantized, x).mean() <= 0.75
    TfliteConverter(io=IOType.int8).export(graph, quantized, tmp_path / "int8_io.tflite", INFO)
    same_graph_int8_io = TfliteConverter().runner(tmp_path / "int8_io.tflite")(x)
    lsb = quantized.activations[graph.outputs[0]].scale
    assert np.abs(output - same_graph_int8_io).max() <= 1.01 * lsb


def test_reference_kernels_agree_with_xnnpack(tmp_path: Path) -> None:
    _, graph, quantized, x = quantized_model(Arch.mobilenet_v2, 0.5, 96)
    converter = TfliteConverter()
    path = tmp_path / "model.int8.tflite"
    converter.export(graph, quantized, path, INFO)
    lsb = quantized.activations[graph.outputs[0]].scale
    xnnpack = converter.runner(path, threads=2)(x)
    reference = converter.runner(path, kernels=Kernels.reference)(x)
    assert np.abs(xnnpack - reference).max() <= 3 * lsb


def test_metadata_is_readable_by_litert_flatbuffer_tooling(tmp_path: Path) -> None:
    from ai_edge_litert.tools import flatbuffer_utils

    _, graph, quantized, _ = quantized_model(Arch.mobilenet_v2, 0.5, 64, classes=2)
    path = tmp_path / "model.int8.tflite"
    TfliteConverter().export(graph, quantized, path, INFO)
    model = flatbuffer_utils.read_model(str(path))
    entries = {}
    for entry in model.metadata:
        name = entry.name.decode() if isinstance(entry.name, bytes) else entry.name
        entries[name] = bytes(model.buffers[entry.buffer].data).decode()
    assert json.loads(entries["mdeploy.preprocess"]) == INFO.preprocess
    assert json.loads(entries["mdeploy.labels"]) == ["cat", "dog"]
    assert entries["mdeploy.precision"] == "int8" and entries["mdeploy.recipe"] == "{}"
    assert json.loads(entries["mdeploy.io"])["input"]["dtype"] == "int8"
    signature = model.signatureDefs[0]
    assert [t.name.decode() if isinstance(t.name, bytes) else t.name for t in signature.inputs] == ["input"]


class FlattenHead(nn.Module):
    """What user models bring: dilation, a depth multiplier, standalone ReLU/ReLU6 and clamps, a standalone
    BatchNorm, a sigmoid gate, an explicit asymmetric pad, and a flatten of a 3x3 map in PyTorch's (C, H, W) order,
    into a linear layer or straight out."""

    def __init__(self, into_linear: bool) -> None:
        super().__init__()
        self.into_linear = into_linear
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.multiplier = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.down = nn.Conv2d(16, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.dilated(x))
        y = self.multiplier(x)
        x = torch.clamp(y, -1.0, 1.0) + F.relu6(y) + torch.clamp(y, -0.5, 2.0)
        x = self.bn(x) * torch.sigmoid(x)
        x = self.down(F.pad(x, (0, 1, 0, 1)))
        x = torch.flatten(x, 1)
        return self.fc(x) if self.into_linear else x


@pytest.mark.parametrize("into_linear", [True, False])
def test_flatten_keeps_pytorch_order_and_odd_ops_match(into_linear: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = randomize_batch_norm(FlattenHead(into_linear))
    graph = graph_from_torch(model, (1, 3, 12, 12))
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    converter = TfliteConverter()
    path = tmp_path / "model.fp32.tflite"
    converter.export(graph, None, path, INFO)
    assert np.abs(converter.runner(path)(x) - torch_runner(model)(x)).max() <= 1e-4
    report = converter.inspect(path)
    assert report["graph"]["transposes"] == (0 if into_linear else 1)  # a LINEAR reads the NHWC flatten directly
    # PyTorch's symmetric pad 1 of a stride-2 conv on an even size is not TFLite's SAME: an explicit PAD; the
    # asymmetric pad before self.down is exactly SAME there. Depthwise: the multiplier-2 conv and the BatchNorm.
    assert report["ops"]["PAD"] == 1 and report["ops"]["DEPTHWISE_CONV_2D"] == 2

    quantized = nearest_int8(graph, x)
    path = tmp_path / "model.int8.tflite"
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)["graph"]
    assert report["float_ops_inside"] == []
    # int8 MAXIMUM/MINIMUM (the general clamp) are the only ops XNNPACK leaves out
    assert {op.split(" ")[0] for op in report["xnnpack"]["ops_outside"]} == {"MAXIMUM", "MINIMUM"}
    # Per op the kernels match the simulation to 1 LSB; LOGISTIC's fixed 1/256 output grid requantised to the
    # sigmoid's own grid rounds twice (about 20% of its codes off by one), which the 4 layers after it carry.
    errors = lsb_errors(converter.runner(path)(x), quantized, x)
    assert errors.max() <= 3 and errors.mean() <= 1


def test_explicit_asymmetric_padding_and_sigmoid(tmp_path: Path) -> None:
    model = randomize_batch_norm(TfStylePadding())
    graph = graph_from_torch(model, (1, 3, 33, 33))
    x = np.random.default_rng(0).standard_normal((4, 3, 33, 33)).astype(np.float32)
    converter = TfliteConverter()
    path = tmp_path / "model.int8.tflite"
    quantized = nearest_int8(graph, x)
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)
    assert report["ops"]["PAD"] == 1 and report["ops"]["LOGISTIC"] == 1
    assert report["graph"]["xnnpack"]["partitions"] == 1 and report["graph"]["xnnpack"]["ops_outside"] == []
    assert lsb_errors(converter.runner(path)(x), quantized, x).max() <= 1


def test_softmax_head_is_a_float_softmax_inside_the_one_xnnpack_partition(tmp_path: Path) -> None:
    """XNNPACK has no int8 SOFTMAX: the int8 graph dequantises the logits, takes the softmax in float and quantises
    the probabilities to the quantiser's grid, all delegated; one rounding, as the simulation has."""
    torch.manual_seed(0)
    model = nn.Sequential(randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2))),
                          nn.Softmax(dim=-1)).eval()
    graph = graph_from_torch(model, (1, 3, 64, 64))
    x = np.random.default_rng(0).standard_normal((4, 3, 64, 64)).astype(np.float32)
    quantized = nearest_int8(graph, x)
    converter = TfliteConverter()
    path = tmp_path / "model.int8.tflite"
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)["graph"]
    assert report["float_ops_inside"] == [] and len(report["float_softmaxes"]) == 1, report
    assert report["xnnpack"]["partitions"] == 1 and report["xnnpack"]["ops_outside"] == [], report
    step = quantized.activations[graph.outputs[0]].scale
    for kernels in Kernels:
        assert np.abs(converter.runner(path, kernels=kernels)(x) - simulate(quantized, x)).max() <= 1.01 * step


def test_mixed_precision_float_nodes(tmp_path: Path) -> None:
    _, graph, quantized, x = quantized_model(Arch.mobilenet_v2, 0.5, 64, classes=10)
    keep_float = graph.weighted_nodes[-1].name  # the classifier
    mixed = QuantizedGraph(quantized.graph, quantized.activations, quantized.weights, frozenset({keep_float}))
    converter = TfliteConverter()
    path = tmp_path / "model.mixed.tflite"
    converter.export(graph, mixed, path, INFO)
    report = converter.inspect(path)
    assert report["int8_weight_tensors"] == len(graph.weighted_nodes) - 1
    assert [op.split(" ")[0] for op in report["graph"]["float_ops_inside"]] == ["DEQUANTIZE", "FULLY_CONNECTED",
                                                                             "QUANTIZE"]
    errors = lsb_errors(converter.runner(path)(x), mixed, x)
    assert errors.max() <= 2 and errors.mean() <= 0.5


def test_export_is_fast(tmp_path: Path) -> None:
    import time

    _, graph, quantized, _ = quantized_model(Arch.mobilenet_v2, 1.0, 224)
    start = time.perf_counter()
    TfliteConverter().export(graph, None, tmp_path / "a.tflite", INFO)
    TfliteConverter().export(graph, quantized, tmp_path / "b.tflite", INFO)
    assert time.perf_counter() - start < 5.0


class PaddleHardSigmoid(nn.Module):
    """PaddleOCR's hard-sigmoid, ``clamp(0.2 x + 0.5, 0, 1)``, gating a conv's output (PP-OCRv3's SE blocks)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * torch.clamp(0.2 * y + 0.5, 0.0, 1.0) + torch.clamp(0.05 * y, 0.0, 1.0)  # the second's grid < 1


def test_int8_clip_from_zero_is_an_add_with_relu_in_one_partition(tmp_path: Path) -> None:
    """clip(0, high) whose int8 output grid ends at or below ``high``: RELU clamps the bottom and int8 saturation the
    top, so no MAXIMUM/MINIMUM (which XNNPACK leaves outside) is needed."""
    torch.manual_seed(0)
    graph = graph_from_torch(PaddleHardSigmoid().eval(), (1, 3, 16, 16))
    assert Op.CLIP in {n.op for n in graph.nodes}
    x = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32) * 4
    quantized = nearest_int8(graph, x)
    converter = TfliteConverter()
    path = tmp_path / "model.int8.tflite"
    converter.export(graph, quantized, path, INFO)
    report = converter.inspect(path)["graph"]
    assert report["xnnpack"]["partitions"] == 1 and report["xnnpack"]["ops_outside"] == [], report["xnnpack"]
    assert "MAXIMUM" not in json.dumps(report) and "MINIMUM" not in json.dumps(report)
    assert lsb_errors(converter.runner(path)(x), quantized, x).max() <= 2
