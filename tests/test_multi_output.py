"""Models with several outputs (issue 13, ready for detection heads): the IR carries them by name and in order,
every backend writes and runs all of them, any rank, fp32 and int8; a stage that still needs one output says so
in one line (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mdeploy.converters import REGISTRY, Target
from mdeploy.converters.base import ArtifactInfo
from mdeploy.errors import BadInputError, ExitCode, UnsupportedOpError
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.parity import torch_outputs
from mdeploy.pipeline import class_count
from mdeploy.calibration.config import QuantRecipe
from mdeploy.quantize.ptq import quantize
from mdeploy.quantize.simulate import simulate_outputs
from mdeploy.types import output_names
from tests.test_converters import INT8_LSB_FROM_SIMULATION
from tests.test_graph import randomize_batch_norm

SHAPE = (1, 3, 32, 32)
INFO = ArtifactInfo("heads", {"crop": 32}, (), "test")
REPO = Path(__file__).resolve().parent.parent


class Heads(nn.Module):
    """A conv backbone with a classifier head (rank 2) and dense heads (rank 4), as a detector has."""

    def __init__(self, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU6(),
                                  nn.Conv2d(8, 16, 3, 2, 1, groups=8), nn.BatchNorm2d(16), nn.Hardswish())
        self.classifier = nn.Linear(16, 5)
        self.boxes = nn.Conv2d(16, 4, 1)
        self.scores = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | list[torch.Tensor]:
        features = self.stem(x)
        logits = self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(features, 1), 1))
        if self.heads == 2:
            return logits, self.boxes(features)
        return [torch.sigmoid(self.scores(features)), logits, self.boxes(features)]  # a list, a rank-4 head first


def heads_model(count: int) -> nn.Module:
    torch.manual_seed(count)
    return randomize_batch_norm(Heads(count)).eval()


def inputs(count: int = 4) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((count, *SHAPE[1:])).astype(np.float32)


@pytest.mark.parametrize("heads", [2, 3])
def test_the_ir_and_executor_carry_every_output_in_order(heads: int) -> None:
    model = heads_model(heads)
    graph = graph_from_torch(model, SHAPE)
    assert len(graph.outputs) == heads and list(graph.artifact_names.values()) == list(output_names(heads))
    x = inputs()
    expected = torch_outputs(model)(x)
    actual = GraphRunner(graph).outputs(x)
    assert [a.shape for a in actual] == [e.shape for e in expected]
    for want, got in zip(expected, actual, strict=True):
        assert np.abs(want - got.numpy()).max() <= 1e-5


@pytest.mark.parametrize("heads", [2, 3])
@pytest.mark.parametrize("target", [Target.onnx, Target.tflite, Target.coreml])
@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_every_backend_writes_and_runs_every_output(heads: int, target: Target, int8: bool, tmp_path: Path) -> None:
    model = heads_model(heads)
    graph = graph_from_torch(model, SHAPE)
    x = inputs(8)
    quantized = quantize(graph, x, QuantRecipe.stock_minmax()) if int8 else None
    converter = REGISTRY[target]
    path = tmp_path / f"heads.{'int8' if int8 else 'fp32'}{converter.suffix}"
    converter.export(graph, quantized, path, INFO)
    outputs = converter.outputs_runner(path)(x)
    assert list(outputs) == list(output_names(heads))  # the artifact's names, in the model's order
    expected = simulate_outputs(quantized, x) if quantized else torch_outputs(model)(x)
    for tensor, want, (name, got) in zip(graph.outputs, expected, outputs.items(), strict=True):
        assert got.shape == want.shape, name
        if quantized is None:
            assert np.abs(got - want).max() <= 1e-4, name
        else:  # an integer runtime rounds each tensor its own way: within the bound measured in test_converters
            lsb = quantized.activations[tensor].scale
            assert np.abs(got - want).max() <= INT8_LSB_FROM_SIMULATION[target] * lsb, name
    described = converter.inspect(path)["outputs"]
    assert [d["name"] for d in described] == list(output_names(heads))


def test_onnx_declares_every_output_with_its_shape(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    graph = graph_from_torch(heads_model(3), SHAPE)
    path = tmp_path / "heads.onnx"
    REGISTRY[Target.onnx].export(graph, None, path, INFO)
    declared = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]
                for o in onnx.load(str(path)).graph.output}
    assert declared == {"output_0": ["batch", 3, 8, 8], "output_1": ["batch", 5], "output_2": ["batch", 4, 8, 8]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["output_0", "output_1", "output_2"]


@pytest.mark.parametrize("target", [Target.onnx, Target.tflite, Target.coreml])
def test_a_one_output_runner_names_the_file_and_the_issue(target: Target, tmp_path: Path) -> None:
    graph = graph_from_torch(heads_model(2), SHAPE)
    converter = REGISTRY[target]
    path = tmp_path / f"heads.fp32{converter.suffix}"
    converter.export(graph, None, path, INFO)
    with pytest.raises(BadInputError, match=r"heads\.fp32\.\w+ has 2 outputs; .* \(multi-output models: issue 15\)"):
        converter.runner(path)


def test_single_output_is_one_line_naming_the_stage() -> None:
    graph = graph_from_torch(heads_model(3), SHAPE)
    with pytest.raises(BadInputError) as caught:
        graph.single_output("the labels", "model.pt2")
    assert str(caught.value) == ("model.pt2 has 3 outputs; the labels handles one output so far "
                                 "(multi-output models: issue 15)")


class SameTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y


def test_the_same_tensor_twice_is_refused() -> None:
    with pytest.raises(UnsupportedOpError, match="same tensor more than once"):
        graph_from_torch(SameTwice(), SHAPE)


def test_convert_checks_and_ships_every_output(tmp_path: Path, calib_dir: Path, eval_dir: Path) -> None:
    """A detector-like model converts end to end: parity per output (each with its own limits), the manifest's
    outputs, golden arrays per output that the bundle's verifier reproduces, --labels refused without one class-score
    output."""
    model_file = tmp_path / "heads.pt2"
    torch.export.save(torch.export.export(heads_model(3), (torch.zeros(SHAPE),)), model_file)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "mdeploy.cli", "convert", str(model_file), "--out", str(out), "--input-size",
               "32", "--to", "onnx,tflite,coreml", "--int8", "--calib", str(calib_dir), "--eval", str(eval_dir),
               "--calib-size", "32", "--eval-size", "24", "--min-snr", "10"]  # a random model's tiny logits: 13 dB
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["output_0", "output_1", "output_2"]
    assert [o["shape"] for o in manifest["outputs"]] == [[1, 3, 8, 8], [1, 5], [1, 4, 8, 8]]
    assert manifest["output"] == manifest["outputs"][0]
    for artifact in manifest["artifacts"]:
        parity = artifact["parity"]
        assert [o["output"] for o in parity["outputs"]] == ["output_0", "output_1", "output_2"], artifact["file"]
        assert all(o["passed"] for o in parity["outputs"]) and parity["passed"], artifact["file"]
        scores, dense = parity["outputs"][1]["metrics"], parity["outputs"][0]["metrics"]
        assert "top1_agreement" in scores and "top1_agreement" not in dense and "pixel_agreement" in dense
        if artifact["precision"] == "fp32":  # each output's limit is relative to its own peak
            limits = [o["thresholds"]["max_abs_error"] for o in parity["outputs"]]
            assert all(o["metrics"]["max_abs_error"] <= limit for o, limit in zip(parity["outputs"], limits))
        else:
            assert all(o["metrics"]["snr_db"] >= 10 for o in parity["outputs"]), artifact["file"]
            assert all(o["thresholds"]["min_snr_db"] == 10 for o in parity["outputs"])
    golden = manifest["golden"]
    assert set(golden["pytorch_by_output"]) == {"output_0", "output_1", "output_2"}
    assert len(golden["artifacts"]) == 3 * 6 and golden["artifacts"]["heads.int8.tflite:output_2"]["shape"] == [4, 4, 8, 8]
    verified = subprocess.run([sys.executable, str(out / "verify_bundle.py")], capture_output=True, text=True)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert verified.stdout.count("ok      heads.int8.tflite output_") == 3, verified.stdout

    # mdeploy check judges every output of every artifact again, and diagnoses each artifact per layer on request
    report = tmp_path / "report"
    checked = subprocess.run([sys.executable, "-m", "mdeploy.cli", "check", str(out), "--model", str(model_file),
                              "--eval", str(eval_dir), "--eval-size", "24", "--min-snr", "10", "--explain",
                              "--report", str(report)], capture_output=True, text=True, cwd=REPO)
    assert checked.returncode == 0, checked.stderr
    result = json.loads((report / "report.json").read_text())
    assert len(result["artifacts"]) == 6 and result["passed"]
    for artifact in result["artifacts"]:
        assert [o["output"] for o in artifact["parity"]["outputs"]] == ["output_0", "output_1", "output_2"]
        assert artifact["diagnosis"] is not None, artifact["file"]
    assert len(result["agreement"]["artifacts"]) == 6


class TwoMaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def test_labels_name_the_one_class_score_output(tmp_path: Path) -> None:
    assert class_count(graph_from_torch(heads_model(3), SHAPE), tmp_path / "labels.txt", "heads.pt2") == 5
    with pytest.raises(BadInputError) as caught:
        class_count(graph_from_torch(TwoMaps(), SHAPE), tmp_path / "labels.txt", "maps.pt2")
    assert str(caught.value) == ("--labels labels.txt names the classes of one class-score output (N, K), but "
                                 "maps.pt2 has 0 among its 2 outputs: leave out --labels")
    assert class_count(graph_from_torch(TwoMaps(), SHAPE), None, "maps.pt2") == 0


class DictHeads(nn.Module):
    """A forward() returning a dict, as torchvision's segmenters ({"out", "aux"}) and SSD heads do."""

    def __init__(self, keys: tuple[str, str]) -> None:
        super().__init__()
        self.keys = keys
        self.heads = Heads(2)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, boxes = self.heads(x)
        return {self.keys[0]: boxes, self.keys[1]: logits}  # not the alphabetical order


@pytest.mark.parametrize(("keys", "names"), [(("out", "aux"), ("out", "aux")),
                                             (("boxes 1", "scores"), ("output_0", "output_1")),
                                             (("input", "scores"), ("output_0", "output_1"))],
                         ids=["identifiers", "not-an-identifier", "the-input-name"])
@pytest.mark.parametrize("saved", ["module", "torchscript"])
def test_a_dict_of_outputs_keeps_its_order_and_names(keys: tuple[str, str], names: tuple[str, str], saved: str,
                                                    tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DictHeads(keys).eval()
    randomize_batch_norm(model.heads)
    if saved == "torchscript":
        model = torch.jit.trace(model, torch.zeros(SHAPE), strict=False)
    graph = graph_from_torch(model, SHAPE)
    assert tuple(graph.artifact_names.values()) == names
    x = inputs()
    expected = torch_outputs(model)(x)
    assert [e.shape for e in expected] == [(4, 4, 8, 8), (4, 5)]  # the dict's order
    path = tmp_path / "dict.fp32.onnx"
    REGISTRY[Target.onnx].export(graph, None, path, INFO)
    outputs = REGISTRY[Target.onnx].outputs_runner(path)(x)
    assert tuple(outputs) == names
    for want, got in zip(expected, outputs.values(), strict=True):
        assert np.abs(want - got).max() <= 1e-4
