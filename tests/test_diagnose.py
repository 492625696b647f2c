"""Per-layer diagnosis: an artifact with one deliberately broken layer is diagnosed at that layer, on every target
with taps (ONNX, TFLite) and in both precisions; clean artifacts are not."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from mdeploy.calibration.config import QuantRecipe
from mdeploy.converters import REGISTRY, Precision, Target
from mdeploy.converters.base import ConverterBase
from mdeploy.diagnose import JUMP_DB, Diagnosis, diagnose
from mdeploy.errors import BadInputError
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.quantize.ptq import quantize
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_converters import INFO, nearest_int8
from tests.test_graph import randomize_batch_norm

TAPPED = [Target.onnx, Target.tflite]


class Setup(NamedTuple):
    graph: Graph
    quantized: QuantizedGraph
    inputs: np.ndarray  # held out from calibration
    broken: str  # the mid-network conv the corrupted artifacts get wrong


@pytest.fixture(scope="module")
def setup() -> Setup:
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2)))
    graph = graph_from_torch(model, (1, 3, 64, 64))
    rng = np.random.default_rng(1)
    calibration = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    inputs = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    weighted = graph.weighted_nodes
    return Setup(graph, nearest_int8(graph, calibration), inputs, weighted[len(weighted) // 2].name)


def corrupted(graph: Graph, quantized: QuantizedGraph | None, name: str) -> tuple[Graph, QuantizedGraph | None]:
    """Copies with ``name``'s weights negated: the float ones, or the int8 codes the exporters write."""
    if quantized is None:
        graph = copy.deepcopy(graph)
        graph.node(name).params["weight"] = -graph.node(name).params["weight"]
        return graph, None
    quantized = copy.deepcopy(quantized)
    quantized.weights[name].values = -quantized.weights[name].values
    return quantized.graph, quantized


def export(target: Target, graph: Graph, quantized: QuantizedGraph | None, path: Path) -> Path:
    converter = REGISTRY[target]
    path = path.with_suffix(converter.suffix)
    converter.export(quantized.graph if quantized else graph, quantized, path, INFO)
    return path


def names(layers: tuple) -> list[str]:  # type: ignore[type-arg]
    return [layer.name for layer in layers]


@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("target", TAPPED)
def test_a_corrupted_layer_is_the_first_jump_and_among_the_worst(
    setup: Setup, target: Target, precision: Precision, tmp_path: Path
) -> None:
    graph, broken = setup.graph, setup.broken
    quantized = setup.quantized if precision is Precision.int8 else None
    artifact_graph = quantized.graph if quantized else None
    clean = diagnose(graph, export(target, graph, quantized, tmp_path / "clean"), target, setup.inputs,
                     artifact_graph=artifact_graph)
    bad_graph, bad_quantized = corrupted(graph, quantized, broken)
    bad = diagnose(graph, export(target, bad_graph, bad_quantized, tmp_path / "bad"), target, setup.inputs,
                   artifact_graph=artifact_graph)

    for diagnosis in (clean, bad):  # every IR tensor is tapped, in the IR's layout
        assert names(diagnosis.layers) == [n.name for n in graph.nodes] and diagnosis.unavailable == ()
        assert diagnosis.samples == len(setup.inputs)
    assert bad.first_jump is not None and bad.first_jump.name == broken
    assert broken in names(bad.worst) and bad.worst[0].name == broken
    assert bad.first_jump.local_snr_db < 10 and bad.first_jump.excess_db > 25
    assert graph.node(broken).source in bad.summary()
    before = names(bad.layers).index(broken)
    assert [a.snr_db for a in bad.layers[:before]] == pytest.approx([a.snr_db for a in clean.layers[:before]])
    clean_broken = clean.layers[names(clean.layers).index(broken)]
    assert clean_broken.excess_db < JUMP_DB
    if precision is Precision.fp32:
        assert clean.first_jump is None
        assert all(layer.snr_db > 60 for layer in clean.layers)
    else:  # int8 codes dequantised with their own scale and zero point: close to PyTorch, yet really int8
        assert all(25 < layer.snr_db < 60 for layer in clean.layers)


def test_equalised_int8_is_compared_in_its_own_channel_units(setup: Setup, tmp_path: Path) -> None:
    """Activation equalisation divides intermediate channels by per-channel scales: without ``artifact_graph``
    every layer looks broken; with it, the corrupted layer stands out."""
    graph, broken = setup.graph, setup.broken
    calibration = np.random.default_rng(2).standard_normal((8, 3, 64, 64)).astype(np.float32)
    equalised = quantize(graph, calibration, dataclasses.replace(QuantRecipe.stock_minmax(), equalize=True))
    clean_path = export(Target.onnx, graph, equalised, tmp_path / "clean")
    bad_path = export(Target.onnx, *corrupted(graph, equalised, broken), tmp_path / "bad")
    rescaled = diagnose(graph, clean_path, Target.onnx, setup.inputs, artifact_graph=equalised.graph)
    naive = diagnose(graph, clean_path, Target.onnx, setup.inputs)
    assert rescaled.typical_local_snr_db > 30 and naive.typical_local_snr_db < rescaled.typical_local_snr_db - 20
    bad = diagnose(graph, bad_path, Target.onnx, setup.inputs, artifact_graph=equalised.graph)
    assert bad.worst[0].name == broken and bad.worst[0].excess_db > 25


def test_tflite_flatten_read_in_nhwc_order_is_mapped_back(tmp_path: Path) -> None:
    """The TFLite writer flattens a 4x4 map feeding a LINEAR in NHWC order (permuting the weights instead)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 5)).eval()
    graph = graph_from_torch(model, (1, 3, 8, 8))
    x = np.random.default_rng(0).standard_normal((3, 3, 8, 8)).astype(np.float32)
    diagnosis = diagnose(graph, export(Target.tflite, graph, None, tmp_path / "small"), Target.tflite, x)
    assert [layer.op for layer in diagnosis.layers] == ["conv", "flatten", "linear"]
    assert all(layer.snr_db > 60 for layer in diagnosis.layers) and diagnosis.first_jump is None


def test_to_dict_is_json(setup: Setup, tmp_path: Path) -> None:
    graph, broken = setup.graph, setup.broken
    path = export(Target.onnx, *corrupted(graph, None, broken), tmp_path / "bad")
    diagnosis = diagnose(graph, path, Target.onnx, setup.inputs[:2], runtime_name="ORT test")
    record = json.loads(json.dumps(diagnosis.to_dict(), allow_nan=False))
    assert record["runtime"] == "ORT test" and record["samples"] == 2
    assert record["first_jump"]["name"] == broken and record["worst"][0]["name"] == broken
    assert len(record["layers"]) == len(graph.nodes)
    flatten = next(layer for layer in record["layers"] if layer["op"] == "flatten")
    assert flatten["local_snr_db"] == "inf"  # exact, spelled out as mdeploy.parity does
    assert isinstance(diagnosis, Diagnosis) and len(diagnosis.summary().splitlines()) == 1


def test_targets_without_taps_and_bad_inputs_are_refused(setup: Setup, tmp_path: Path) -> None:
    path = export(Target.onnx, setup.graph, None, tmp_path / "clean")
    with pytest.raises(BadInputError, match="onnx and tflite"):
        diagnose(setup.graph, path, Target.coreml, setup.inputs)
    with pytest.raises(BadInputError, match="do not match"):
        diagnose(setup.graph, path, Target.onnx, setup.inputs[:, :, :32])
    with pytest.raises(BadInputError, match="no artifact"):
        diagnose(setup.graph, tmp_path / "missing.onnx", Target.onnx, setup.inputs)


@pytest.mark.parametrize("target", [t for t, c in REGISTRY.items() if c.taps_runtime is None], ids=str)
def test_a_target_without_taps_says_why(target: Target, setup: Setup, tmp_path: Path) -> None:
    converter = REGISTRY[target]
    assert converter.taps_unavailable != ConverterBase.taps_unavailable, f"state why {target} has no per-layer taps"
    path = tmp_path / f"model.int8{converter.suffix}"
    path.write_bytes(b"")  # refused before the file is read
    with pytest.raises(BadInputError) as refused:
        diagnose(setup.graph, path, target, setup.inputs)
    assert converter.taps_unavailable in str(refused.value) and "onnx and tflite" in str(refused.value)
