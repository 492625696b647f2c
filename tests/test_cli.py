"""Every CLI command through typer's CliRunner: success paths, the parity gate, and one-line errors with exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.errors import ExitCode
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_graph import randomize_batch_norm

SIZE = 96
runner = CliRunner()
# The int8 limits of the conversions and checks below: real ones. The model has random weights and the inputs are
# noise, yet int8 keeps its function on them: every int8 artifact here (ONNX, TFLite, CoreML) measures 44.6 to 45.2 dB
# SNR and 100% top-1 agreement. 35 dB is well above the default 15 dB and fails on a real defect: a classifier whose
# int8 weight scale is 5% off measures 28.8 dB (and 100% top-1). Top-1 keeps the default limit (85%).
MIN_SNR = 35.0
INT8_LIMITS = ["--min-snr", str(MIN_SNR)]
INT8_THRESHOLDS = {"min_snr_db": MIN_SNR, "min_top1": 0.85}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2)))
    path = tmp_path_factory.mktemp("model") / "small_v2.pt"
    torch.save(model.state_dict(), path)
    return path


def tensor_folder(root: Path, name: str, count: int, seed: int) -> Path:
    folder = root / name
    folder.mkdir()
    rng = np.random.default_rng(seed)
    np.save(folder / "batch.npy", rng.standard_normal((count, 3, SIZE, SIZE)).astype(np.float32))
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("data")
    return tensor_folder(root, "calib", 32, 0), tensor_folder(root, "eval", 24, 1)


@pytest.fixture(scope="module")
def converted(small_model: Path, data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "out"
    calib, evaluation = data
    result = runner.invoke(app, [
        "convert", str(small_model), "--arch", "mobilenet_v2", "--to", "onnx", "--int8", "--calib", str(calib),
        "--eval", str(evaluation), "--input-size", str(SIZE), "--out", str(out), *INT8_LIMITS,
    ])
    assert result.exit_code == 0, result.output
    return out


def test_convert_writes_artifacts_and_manifest(converted: Path) -> None:
    assert {p.name for p in converted.iterdir()} >= {"mobilenet_v2.fp32.onnx", "mobilenet_v2.int8.onnx", "manifest.json",
                                                     "SUMMARY.md"}
    manifest = json.loads((converted / "manifest.json").read_text())
    assert manifest["model"]["arch"] == "mobilenet_v2" and manifest["model"]["width_mult"] == 0.5
    assert manifest["model"]["num_classes"] == 10
    assert manifest["input"]["shape"] == [1, 3, SIZE, SIZE]
    assert manifest["quantization"]["calibration_set"]["samples"] == 32
    assert len(manifest["quantization"]["calibration_set"]["sha256"]) == 64
    assert manifest["preprocess"]["crop"] == SIZE
    fp32, int8 = manifest["artifacts"]
    assert fp32["precision"] == "fp32" and fp32["parity"]["metrics"]["max_abs_error"] <= 1e-4
    assert int8["precision"] == "int8" and int8["parity"]["passed"]
    assert int8["parity"]["thresholds"] == INT8_THRESHOLDS and int8["parity"]["metrics"]["snr_db"] >= MIN_SNR
    assert "onnxruntime" in manifest["tool_versions"]


def test_convert_json_output(small_model: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["convert", str(small_model), "--arch", "mobilenet_v2", "--eval", str(data[1]),
                                 "--input-size", str(SIZE), "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["parity_passed"] is True


def test_failed_parity_exits_1_and_says_why(small_model: Path, data: tuple[Path, Path], tmp_path: Path) -> None:
    calib, evaluation = data
    result = runner.invoke(app, [
        "convert", str(small_model), "--arch", "mobilenet_v2", "--int8", "--calib", str(calib), "--eval",
        str(evaluation), "--input-size", str(SIZE), "--out", str(tmp_path / "o"), "--min-snr", "200",
    ])
    assert result.exit_code == ExitCode.PARITY_FAILED
    assert "FAIL" in result.stdout and "SNR" in result.stdout
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["parity_passed"] is False


def test_check_passes_on_the_output_folder(converted: Path, small_model: Path, data: tuple[Path, Path]) -> None:
    result = runner.invoke(app, ["check", str(converted), "--model", str(small_model), "--arch", "mobilenet_v2",
                                 "--eval", str(data[1]), *INT8_LIMITS, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["passed"] and len(report["artifacts"]) == 2
    int8 = report["artifacts"][1]["parity"]
    assert int8["thresholds"] == INT8_THRESHOLDS and int8["metrics"]["snr_db"] >= MIN_SNR
    assert int8["metrics"]["top1_agreement"] >= 0.85


def corrupt_one_layer(source: Path, target: Path) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(source))
    for init in model.graph.initializer:
        if init.name == "linear/weight":  # the classifier's weights negated
            init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init), init.name))
    onnx.save(model, str(target))


def test_check_fails_on_a_corrupted_artifact(converted: Path, small_model: Path, data: tuple[Path, Path],
                                             tmp_path: Path) -> None:
    broken = tmp_path / "mobilenet_v2.fp32.onnx"
    corrupt_one_layer(converted / "mobilenet_v2.fp32.onnx", broken)
    # A lone artifact (no manifest beside it): the preprocessing comes from its own metadata.
    result = runner.invoke(app, ["check", str(broken), "--model", str(small_model), "--arch", "mobilenet_v2",
                                 "--eval", str(data[1])])
    assert result.exit_code == ExitCode.PARITY_FAILED
    assert "FAIL" in result.stdout


def test_inspect_shows_int8_parameters(converted: Path) -> None:
    result = runner.invoke(app, ["inspect", str(converted / "mobilenet_v2.int8.onnx"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["int8_weight_tensors"] == 53  # every conv and the classifier
    assert report["ops"]["QuantizeLinear"] > 50
    assert report["activation_quantization"][0]["tensor"] == "input"
    human = runner.invoke(app, ["inspect", str(converted / "mobilenet_v2.int8.onnx")])
    assert human.exit_code == 0 and "int8 activations" in human.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "missing.pt", "--arch", "mobilenet_v2", "--out", "{tmp}/o"], "does not exist"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--to", "tflitee", "--out", "{tmp}/o"], "unknown target"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--int8", "--out", "{tmp}/o"], "--calib"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--out", "{tmp}/existing"], "--overwrite"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--mean", "1,2", "--out", "{tmp}/o"], "--mean"),
        (["convert", "{model}", "--arch", "mobilenet_v3_small", "--out", "{tmp}/o"], "mobilenet_v2"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--input-size", "5", "--out", "{tmp}/o"], "--input-size"),
        (["check", "{tmp}/nothing", "--model", "{model}", "--arch", "mobilenet_v2", "--eval", "{tmp}"], "does not exist"),
        (["inspect", "{tmp}/model.txt"], "does not exist"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--to", "coreml", "--int8", "--calib", "{tmp}",
          "--coreml-target", "iOS16", "--out", "{tmp}/o"], "iOS17"),
        (["convert", "{model}", "--arch", "mobilenet_v2", "--tflite-io", "int16", "--out", "{tmp}/o"], "int16"),
    ],
)
def test_bad_input_is_one_line_exit_2(args: list[str], message: str, small_model: Path, tmp_path: Path) -> None:
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("keep")
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(small_model)) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "o").exists()
    assert (tmp_path / "existing" / "keep.txt").read_text() == "keep"


def test_without_eval_int8_parity_runs_on_calibration_samples(small_model: Path, data: tuple[Path, Path],
                                                                tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(app, ["convert", str(small_model), "--arch", "mobilenet_v2", "--to", "onnx", "--int8",
                                 "--calib", str(data[0]), "--input-size", str(SIZE), "--out", str(out),
                                 *INT8_LIMITS])
    assert result.exit_code == 0, result.output
    parity = json.loads((out / "manifest.json").read_text())["artifacts"][1]["parity"]
    assert parity["inputs"].startswith("32 calibration samples") and "not held out" in parity["inputs"]
    assert parity["thresholds"] == INT8_THRESHOLDS and parity["metrics"]["snr_db"] >= MIN_SNR



def test_fp32_without_data_judges_numeric_error_on_random_inputs(small_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(app, ["convert", str(small_model), "--arch", "mobilenet_v2", "--input-size", str(SIZE),
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    parity = json.loads((out / "manifest.json").read_text())["artifacts"][0]["parity"]
    assert "random inputs" in parity["inputs"] and parity["thresholds"] == {"max_abs_error": 1e-4}


def test_target_options_reach_the_artifacts_and_manifest(small_model: Path, data: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    out = tmp_path / "o"
    result = runner.invoke(app, [
        "convert", str(small_model), "--arch", "mobilenet_v2", "--to", "tflite,coreml", "--int8", "--calib",
        str(data[0]), "--eval-size", "4", "--input-size", str(SIZE), "--out", str(out), *INT8_LIMITS,
        "--tflite-io", "uint8", "--coreml-input", "image", "--coreml-precision", "fp32",
        "--coreml-target", "iOS18", "--author", "Vision team", "--license", "Apache-2.0", "--model-version", "3.1",
    ])
    assert result.exit_code == 0, result.output
    artifacts = {a["file"]: a for a in json.loads((out / "manifest.json").read_text())["artifacts"]}
    for name in ("mobilenet_v2.int8.tflite", "mobilenet_v2.int8.mlpackage"):  # uint8 I/O and W8A8 keep the function
        parity = artifacts[name]["parity"]
        assert parity["thresholds"] == INT8_THRESHOLDS and parity["metrics"]["snr_db"] >= MIN_SNR, name
    tflite = artifacts["mobilenet_v2.int8.tflite"]
    assert tflite["settings"]["io"] == "uint8"
    (tensor,) = tflite["io"]["inputs"]
    assert tensor["dtype"] == "uint8" and tensor["scale"] > 0 and 0 <= tensor["zero_point"] <= 255
    coreml = artifacts["mobilenet_v2.int8.mlpackage"]
    assert coreml["settings"] == {"compute_precision": "fp32", "minimum_deployment_target": "iOS18",
                                  "input": "image", "classifier": "when labels match the classes", "int8": "W8A8"}
    report = runner.invoke(app, ["inspect", str(out / "mobilenet_v2.int8.mlpackage"), "--json"])
    inspected = json.loads(report.stdout)
    assert inspected["minimum_deployment_target"] == "iOS18"
    assert inspected["inputs"][0]["kind"] == "image"
    assert (inspected["author"], inspected["license"], inspected["version"]) == ("Vision team", "Apache-2.0", "3.1")
    tflite_metadata = json.loads(runner.invoke(app, ["inspect", str(out / "mobilenet_v2.int8.tflite"), "--json"]
                                               ).stdout)["metadata"]
    assert tflite_metadata["author"] == "Vision team" and tflite_metadata["version"] == "3.1"
