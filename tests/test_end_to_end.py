"""The real thing: torchvision's ImageNet MobileNetV2 and real photos, through the CLI, every registered target.

Slow (a few minutes): run in CI, skipped with ``-m "not slow"``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from converters import REGISTRY, Target
from mdeploy.cli import app
from mdeploy.errors import ExitCode

pytestmark = pytest.mark.slow
runner = CliRunner()
LABELS = Path(__file__).resolve().parent.parent / "mdeploy" / "data" / "imagenet_labels.txt"


@pytest.fixture(scope="module")
def converted(real_v2_weights: Path, calib_dir: Path, eval_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("real") / "mobilenet_v2"
    targets = ",".join(target.value for target in REGISTRY)
    result = runner.invoke(app, [
        "convert", str(real_v2_weights), "--arch", "mobilenet_v2", "--to", targets, "--int8", "--calib",
        str(calib_dir), "--calib-size", "200", "--eval", str(eval_dir), "--labels", str(LABELS), "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    return out, json.loads((out / "manifest.json").read_text())


def artifact(manifest: dict, target: str, precision: str) -> dict:
    return next(a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == precision)


@pytest.mark.parametrize("target", [t.value for t in REGISTRY])
def test_fp32_matches_pytorch_on_real_photos(converted: tuple[Path, dict], target: str) -> None:
    metrics = artifact(converted[1], target, "fp32")["parity"]["metrics"]
    assert metrics["max_abs_error"] <= 1e-4
    assert metrics["samples"] == 320


def test_int8_onnx_reaches_the_bar(converted: tuple[Path, dict]) -> None:
    """Acceptance: >= 85% top-1 agreement and >= 15 dB logit SNR vs fp32 PyTorch on held-out photo crops."""
    metrics = artifact(converted[1], "onnx", "int8")["parity"]["metrics"]
    assert metrics["top1_agreement"] >= 0.85
    assert metrics["snr_db"] >= 15.0


@pytest.mark.parametrize("target", [t.value for t in REGISTRY if t is not Target.onnx])
def test_other_int8_targets_match_onnx(converted: tuple[Path, dict], target: str) -> None:
    """Issues 3 and 4: TFLite and Core ML int8 are no worse than int8 ONNX minus 1 point / 1 dB."""
    onnx = artifact(converted[1], "onnx", "int8")["parity"]["metrics"]
    other = artifact(converted[1], target, "int8")["parity"]["metrics"]
    assert other["top1_agreement"] >= onnx["top1_agreement"] - 0.01
    assert other["snr_db"] >= onnx["snr_db"] - 1.0


def test_manifest_records_the_recipe_and_data(converted: tuple[Path, dict]) -> None:
    manifest = converted[1]
    assert manifest["model"]["source_sha256"].startswith("b03531047ffacf1e")
    calibration = manifest["quantization"]["calibration_set"]
    assert calibration["samples"] == 200 and len(calibration["sha256"]) == 64
    assert manifest["quantization"]["recipe"]["name"] == "default"
    assert (converted[0] / "labels.txt").read_text().splitlines()[281] == "tabby"


def test_check_passes_then_fails_on_a_corrupted_layer(converted: tuple[Path, dict], real_v2_weights: Path,
                                                      eval_dir: Path, tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    out, _ = converted
    args = ["--model", str(real_v2_weights), "--arch", "mobilenet_v2", "--eval", str(eval_dir), "--eval-size", "64"]
    assert runner.invoke(app, ["check", str(out), *args]).exit_code == 0
    model = onnx.load(str(out / "mobilenet_v2.int8.onnx"))
    weights = [i for i in model.graph.initializer if i.name.endswith("/weight_q")]
    victim = weights[len(weights) // 2]  # a layer in the middle of the network
    codes = numpy_helper.to_array(victim)
    shuffled = np.random.default_rng(0).permutation(codes.reshape(-1)).reshape(codes.shape)
    victim.CopyFrom(numpy_helper.from_array(shuffled.astype(np.int8), victim.name))
    broken = tmp_path / "mobilenet_v2.int8.onnx"
    onnx.save(model, str(broken))
    result = runner.invoke(app, ["check", str(broken), *args])
    assert result.exit_code == ExitCode.PARITY_FAILED, result.output


def test_real_model_predicts_real_photos(converted: tuple[Path, dict], eval_dir: Path) -> None:
    """The weights really loaded: espresso crops are mostly called espresso by the int8 ONNX model."""
    from calibration.dataset import SampleSet
    from calibration.preprocess import Preprocess

    out, _ = converted
    samples = SampleSet.from_folder(eval_dir, Preprocess.imagenet(224))
    coffee = np.stack([samples[i] for i, p in enumerate(samples.paths) if p.name.startswith("coffee_")])
    logits = REGISTRY[Target.onnx].runner(out / "mobilenet_v2.int8.onnx")(coffee)
    labels = LABELS.read_text().splitlines()
    names = [labels[i] for i in logits.argmax(axis=1)]
    assert names.count("espresso") >= len(names) // 2, names
