"""Trained networks have dead or near-zero channels (a BatchNorm gamma near 0 folded into the conv) whose bias stays
large: a weight scale from the channel's near-zero weights would make its int32 bias code overflow (issue 14: a
Keras-trained MobileNetV2 stopped with "the int32 bias ... overflows"). The quantiser raises such channels' weight
scale, as TFLite's converter does, so that every |bias code| <= 2^30, records them in the manifest's recipe
(``bias_limited_channels``), and the artifacts run on ONNX Runtime and LiteRT and agree with PyTorch and each other."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.converters import REGISTRY
from mdeploy.metrics import compare
from mdeploy.quantize.rounding import BIAS_CODE_LIMIT
from mdeploy.types import Target
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_graph import randomize_batch_norm

runner = CliRunner()
SIZE = 64
# (BatchNorm, channels, gammas, beta): exactly dead (gamma 0: all-zero weights) and near-zero channels with a large
# bias, after a ReLU6, in a depthwise conv, and in a projection without activation.
DEAD = [
    ("features.1.conv.0.1", [0, 1], [0.0, 1e-30], 3.0),  # depthwise
    ("features.2.conv.0.1", [2, 3, 4], [1e-12, 0.0, 1e-9], 2.0),  # expansion, ReLU6
    ("features.3.conv.3", [5, 6], [1e-15, 1e-20], -4.0),  # projection, no activation
    ("features.18.1", [7], [1e-25], 5.0),  # last 1x1 conv
]
# A classifier row with near-zero weights and a large bias (a class the training never predicted from features).
DEAD_CLASS, DEAD_CLASS_BIAS = 3, 8.0


def kill_channels(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for path, channels, gammas, beta in DEAD:
            bn = model.get_submodule(path)
            for channel, gamma in zip(channels, gammas, strict=True):
                bn.weight[channel], bn.bias[channel] = gamma, beta
        fc = model.get_submodule("classifier.1")
        fc.weight[DEAD_CLASS] *= 1e-12
        fc.bias[DEAD_CLASS] = DEAD_CLASS_BIAS
    return model.eval()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, calib_dir: Path, eval_dir: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model = kill_channels(randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2))))
    root = tmp_path_factory.mktemp("dead")
    torch.save(model.state_dict(), root / "dead.pt")
    result = runner.invoke(app, ["convert", str(root / "dead.pt"), "--arch", "mobilenet_v2", "--to", "onnx,tflite",
                                 "--int8", "--calib", str(calib_dir), "--calib-size", "48", "--eval", str(eval_dir),
                                 "--eval-size", "48", "--input-size", str(SIZE), "--out", str(root / "out")])
    assert result.exit_code == 0, result.output
    return {"model": root / "dead.pt", "out": root / "out"}


def test_manifest_lists_the_limited_channels(converted: dict[str, Path]) -> None:
    manifest = json.loads((converted["out"] / "manifest.json").read_text())
    limited = {entry["source"].split(" ")[0]: entry["channels"]
               for entry in manifest["quantization"]["recipe"]["bias_limited_channels"]}
    # near-zero channels are limited (their conv is the module before each BatchNorm); exactly dead ones keep
    # the unit scale of an all-zero row, which needs no limit
    assert set(limited["features.1.conv.0.0"]) == {1}
    assert {3}.isdisjoint(limited["features.2.conv.0.0"]) and {2}.issubset(limited["features.2.conv.0.0"])
    assert set(limited["features.3.conv.2"]) == {5, 6}
    assert set(limited["features.18.0"]) == {7}
    assert set(limited["classifier.1"]) == {DEAD_CLASS}
    assert manifest["parity_passed"], [a["parity"]["failures"] for a in manifest["artifacts"]]


def test_every_int32_bias_code_is_representable(converted: dict[str, Path]) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(converted["out"] / "mobilenet_v2.int8.onnx"))
    codes = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("/bias_q")}
    assert codes and all(np.abs(c.astype(np.int64)).max() <= BIAS_CODE_LIMIT for c in codes.values())
    assert max(np.abs(c.astype(np.int64)).max() for c in codes.values()) > BIAS_CODE_LIMIT / 4  # limits were hit


def test_int8_artifacts_run_and_match_pytorch_and_each_other(converted: dict[str, Path]) -> None:
    out = converted["out"]
    manifest = json.loads((out / "manifest.json").read_text())
    inputs = np.load(out / "golden" / "inputs.npy")
    reference = np.load(out / "golden" / "pytorch.npy")
    outputs = {}
    for target, suffix in ((Target.onnx, "onnx"), (Target.tflite, "tflite")):
        outputs[target] = REGISTRY[target].runner(out / f"mobilenet_v2.int8.{suffix}")(inputs)
        # the dead class outputs its bias, as in PyTorch
        np.testing.assert_allclose(outputs[target][:, DEAD_CLASS], reference[:, DEAD_CLASS], atol=0.1)
    step = next(a for a in manifest["artifacts"] if a["file"] == "mobilenet_v2.int8.tflite")["io"]["outputs"][0]
    assert np.abs(outputs[Target.onnx] - outputs[Target.tflite]).max() <= 1.01 * step.get("scale", 0.05)
    for artifact in manifest["artifacts"]:
        assert artifact["parity"]["passed"] and artifact["parity"]["metrics"]["snr_db"] > 20, artifact["parity"]
    assert compare(reference, outputs[Target.tflite]).snr_db > 20


@pytest.mark.slow
def test_real_mobilenet_v2_with_dead_channels_quantises(real_v2_weights: Path, calib_dir: Path, eval_dir: Path,
                                                        tmp_path: Path) -> None:
    """The real ImageNet MobileNetV2 at 160 px (the size of the Keras-trained model of issue 14) with near-zero
    BatchNorm gammas in four layers: converts to int8 ONNX and TFLite at the default limits, on real photos."""
    model = build_model(ModelConfig(Arch.mobilenet_v2, 1.0, 1000, 0.2))
    model.load_state_dict(torch.load(real_v2_weights, weights_only=True))
    with torch.no_grad():
        for path, channels, gammas, beta in DEAD:
            bn = model.get_submodule(path)
            for channel, gamma in zip(channels, gammas, strict=True):
                bn.weight[channel], bn.bias[channel] = gamma, beta
    torch.save(model.state_dict(), tmp_path / "trained.pt")
    out = tmp_path / "out"
    result = runner.invoke(app, ["convert", str(tmp_path / "trained.pt"), "--arch", "mobilenet_v2", "--to",
                                 "onnx,tflite", "--int8", "--calib", str(calib_dir), "--calib-size", "64", "--eval",
                                 str(eval_dir), "--eval-size", "64", "--input-size", "160", "--out", str(out)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    limited = manifest["quantization"]["recipe"]["bias_limited_channels"]
    assert {entry["source"].split(" ")[0] for entry in limited} >= {"features.2.conv.0.0", "features.3.conv.2",
                                                                   "features.18.0"}
    int8 = [a for a in manifest["artifacts"] if a["precision"] == "int8"]
    assert len(int8) == 2 and all(a["parity"]["passed"] for a in int8)
