"""The hand-off bundle: what an app team receives works with nothing but the runtimes and the manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_graph import randomize_batch_norm

SIZE = 96
runner = CliRunner()
LABELS = [f"class {i}" for i in range(10)]
# Runs the bundle's verifier with every mdeploy package made unimportable: it must need none of them.
NO_MDEPLOY = ("import runpy, sys\n"
              "for name in ('mdeploy', 'converters', 'calibration'): sys.modules[name] = None\n"
              "sys.argv = ['verify_bundle.py', sys.argv[1]]\n"
              "runpy.run_path(sys.argv[1] + '/verify_bundle.py', run_name='__main__')\n")


def convert(root: Path, out: Path, *extra: str, targets: str = "onnx,tflite,coreml") -> Path:
    result = runner.invoke(app, [
        "convert", str(root / "model.pt"), "--arch", "mobilenet_v2", "--to", targets, "--int8",
        "--calib", str(root / "calib"), "--eval", str(root / "eval"), "--eval-size", "8", "--labels",
        str(root / "labels.txt"), "--input-size", str(SIZE), "--out", str(out), "--min-top1", "0", *extra,
    ])
    assert result.exit_code == 0, result.output
    return out


def write_project(root: Path, width: float, classes: int, calib: int, evaluation: int, size: int) -> None:
    """``root/model.pt`` (a MobileNetV2 state dict with realistic BatchNorm statistics) and ``calib/``, ``eval/``
    folders of random preprocessed tensors, all seeded."""
    torch.manual_seed(0)
    torch.save(randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, width, classes, 0.2))).state_dict(),
               root / "model.pt")
    for name, count, seed in (("calib", calib, 0), ("eval", evaluation, 1)):
        (root / name).mkdir()
        batch = np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)
        np.save(root / name / "batch.npy", batch)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bundle")
    write_project(root, 0.5, 10, calib=32, evaluation=8, size=SIZE)
    (root / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return root


@pytest.fixture(scope="module")
def bundle(root: Path) -> Path:
    return convert(root, root / "bundle")


def verify(bundle: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-I", "-c", NO_MDEPLOY, str(bundle)], capture_output=True, text=True,
                          timeout=300)


def test_manifest_follows_its_published_schema(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    schema = json.loads((bundle / "manifest.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(manifest, schema)
    assert manifest["$schema"] == "manifest.schema.json" and manifest["manifest_version"] == "1.5"
    assert schema["$id"].endswith(manifest["manifest_version"])


def test_bundle_holds_everything_an_app_team_needs(bundle: Path) -> None:
    names = {p.name for p in bundle.iterdir()}
    assert names >= {"labels.txt", "manifest.json", "manifest.schema.json", "SHA256SUMS", "README_android.md",
                     "README_ios.md", "verify_bundle.py", "golden", "mobilenet_v2.int8.tflite",
                     "mobilenet_v2.int8.onnx", "mobilenet_v2.int8.mlpackage"}
    manifest = json.loads((bundle / "manifest.json").read_text())
    golden = manifest["golden"]
    inputs = np.load(bundle / golden["inputs"]["npy"])
    raw = np.fromfile(bundle / golden["inputs"]["f32"], dtype="<f4").reshape(golden["inputs"]["shape"])
    assert inputs.shape == (4, 3, SIZE, SIZE) and np.array_equal(inputs, raw)
    assert golden["images"] == [None] * 4  # tensors from .npy files: there is no photo to ship
    assert set(golden["artifacts"]) == {a["file"] for a in manifest["artifacts"]}
    listed = {line.split("  ", 1)[1] for line in (bundle / "SHA256SUMS").read_text().splitlines()}
    assert {"manifest.json", "golden/inputs.f32", "mobilenet_v2.int8.mlpackage/Manifest.json"} <= listed


def test_golden_outputs_reproduce_with_only_the_runtimes(bundle: Path) -> None:
    """Issue 7 acceptance: no mdeploy import, just NumPy, ONNX Runtime, LiteRT and the manifest."""
    done = verify(bundle)
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("fp32.onnx", "int8.onnx", "fp32.tflite", "int8.tflite"):
        assert f"ok       mobilenet_v2.{name}" in done.stdout.replace("ok      ", "ok       ")
    assert "skipped  mobilenet_v2.int8.mlpackage: runs on Apple platforms only" in done.stdout


def test_verifier_catches_a_wrong_output_and_a_corrupt_file(root: Path, tmp_path: Path) -> None:
    bundle = convert(root, tmp_path / "b", targets="onnx,tflite")
    golden = bundle / "golden" / "mobilenet_v2.int8.tflite.npy"
    np.save(golden, np.load(golden) + 0.5)  # as if the runtime answered differently; re-sum so only that shows
    sums = (bundle / "SHA256SUMS").read_text().splitlines()
    import hashlib

    digest = hashlib.sha256(golden.read_bytes()).hexdigest()
    (bundle / "SHA256SUMS").write_text("\n".join(
        f"{digest}  golden/mobilenet_v2.int8.tflite.npy" if line.endswith("  golden/mobilenet_v2.int8.tflite.npy")
        else line for line in sums) + "\n")
    done = verify(bundle)
    assert done.returncode == 1 and "MISMATCH mobilenet_v2.int8.tflite" in done.stdout
    (bundle / "mobilenet_v2.int8.onnx").write_bytes(b"garbage")
    done = verify(bundle)
    assert done.returncode == 2 and "mobilenet_v2.int8.onnx" in done.stdout


def test_labels_and_normalisation_read_back_with_each_formats_own_tools(bundle: Path) -> None:
    import coremltools as ct
    import onnxruntime as ort

    meta = ort.InferenceSession(str(bundle / "mobilenet_v2.int8.onnx")).get_modelmeta().custom_metadata_map
    assert json.loads(meta["mdeploy.labels"]) == LABELS
    assert json.loads(meta["mdeploy.preprocess"])["mean"] == [0.485, 0.456, 0.406]
    assert meta["mdeploy.layout"] == "NCHW" and json.loads(meta["mdeploy.io"])["input"]["int8_grid"]["scale"] > 0
    spec = ct.utils.load_spec(str(bundle / "mobilenet_v2.int8.mlpackage"))
    user = spec.description.metadata.userDefined
    assert json.loads(user["mdeploy.labels"]) == LABELS and json.loads(user["mdeploy.preprocess"])["crop"] == SIZE
    assert spec.description.predictedFeatureName == "classLabel"  # a classifier: Vision returns the labels


def test_platform_readmes_carry_the_exact_contract(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    tflite = next(a for a in manifest["artifacts"] if a["file"] == "mobilenet_v2.int8.tflite")
    android = (bundle / "README_android.md").read_text()
    (inp,) = tflite["io"]["inputs"]
    assert f"const val IN_SCALE = {inp['scale']:.9g}f" in android
    assert f"const val IN_ZERO_POINT = {inp['zero_point']}" in android
    assert "const val RESIZE = 110" in android and "const val CROP = 96" in android
    assert "floatArrayOf(0.485f, 0.456f, 0.406f)" in android
    ios = (bundle / "README_ios.md").read_text()
    assert "MIL reference executor, not Core ML" in ios and "MLMultiArray" in ios


@pytest.mark.slow
def test_converting_twice_gives_identical_bytes(root: Path, bundle: Path, tmp_path: Path) -> None:
    again = convert(root, tmp_path / "again")

    def sums(folder: Path) -> dict[str, str]:
        return {name: digest for digest, name in
                (line.split("  ", 1) for line in (folder / "SHA256SUMS").read_text().splitlines())}

    first, second = sums(bundle), sums(again)
    assert first.keys() == second.keys()
    differing = {name for name in first if first[name] != second[name]}
    documented = set(json.loads((bundle / "manifest.json").read_text())["reproducibility"]["varies"])
    assert differing <= documented, differing - documented


def test_image_input_readme_uses_vision(root: Path, tmp_path: Path) -> None:
    bundle = convert(root, tmp_path / "image", "--coreml-input", "image", targets="coreml")
    ios = (bundle / "README_ios.md").read_text()
    assert "VNCoreMLRequest" in ios and "regionOfInterest" in ios and "0.872727" in ios  # 96 / 110
