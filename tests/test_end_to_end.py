"""The real thing: torchvision's ImageNet MobileNetV2 and real photos, through the CLI, every registered target.

Slow (a few minutes): run in CI, skipped with ``-m "not slow"``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from mdeploy.converters import REGISTRY, Target
from mdeploy.cli import app
from mdeploy.errors import ExitCode
from tests.test_gate import corrupt_tflite_layer

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


def test_core_ml_int8_matches_onnx(converted: tuple[Path, dict]) -> None:
    """Issue 4: Core ML W8A8 (MIL reference) is no worse than int8 ONNX minus 1 point / 1 dB."""
    onnx = artifact(converted[1], "onnx", "int8")["parity"]["metrics"]
    other = artifact(converted[1], "coreml", "int8")["parity"]["metrics"]
    assert other["top1_agreement"] >= onnx["top1_agreement"] - 0.01
    assert other["snr_db"] >= onnx["snr_db"] - 1.0


def test_xnnpack_int8_matches_onnx_on_1280_crops(converted: tuple[Path, dict], demo_assets, tmp_path: Path
                                                 ) -> None:  # type: ignore[no-untyped-def]
    """Issues 3 and 17: int8 TFLite on LiteRT and int8 .pte on ExecuTorch, both on XNNPACK, are no worse than int8
    ONNX minus 1 point of top-1 agreement (and 1 dB, or 0.5 dB for .pte, of SNR).

    The runtimes round differently (their outputs agree at ~30 dB), which moves top-1 on 320 crops by about a
    point either way (measured: ONNX 89.7%, XNNPACK 88.4%, LiteRT's builtin kernels 90.3%, all at 22.2 dB), so the
    comparison runs on the 320 held-out crops plus 960 more crops of the same held-out photos (measured: 91.1% and
    22.2 dB for all three)."""
    from mdeploy.calibration.dataset import SampleSet
    from mdeploy.calibration.preprocess import Preprocess
    from mdeploy.demo_assets import write_extra_eval_crops
    from mdeploy.loading import load_model
    from mdeploy.metrics import compare
    from mdeploy.parity import run_batches, torch_runner
    from mdeploy.zoo import Arch

    out, manifest = converted
    extra = write_extra_eval_crops(demo_assets, 960, tmp_path / "extra")
    inputs = np.concatenate([SampleSet.from_folder(folder, Preprocess.imagenet()).to_array()
                             for folder in (demo_assets.eval_dir, extra)])
    reference = run_batches(torch_runner(load_model(demo_assets.weights, arch=Arch.mobilenet_v2).module), inputs)
    snr_margin = {Target.tflite: 1.0, Target("pte"): 0.5}
    metrics = {target: compare(reference, run_batches(REGISTRY[target].runner(
        out / artifact(manifest, target.value, "int8")["file"]), inputs)) for target in (Target.onnx, *snr_margin)}
    assert len(inputs) == 1280
    onnx = metrics[Target.onnx]
    assert onnx.top1_agreement >= 0.85 and onnx.snr_db >= 15.0
    for target, margin in snr_margin.items():
        assert metrics[target].top1_agreement >= onnx.top1_agreement - 0.01, (target, metrics)
        assert metrics[target].snr_db >= onnx.snr_db - margin, (target, metrics)


def test_manifest_records_the_recipe_and_data(converted: tuple[Path, dict]) -> None:
    manifest = converted[1]
    assert manifest["model"]["source_sha256"].startswith("b03531047ffacf1e")
    calibration = manifest["quantization"]["calibration_set"]
    assert calibration["samples"] == 200 and len(calibration["sha256"]) == 64
    assert manifest["quantization"]["recipe"]["name"] == "default"
    assert (converted[0] / "labels.txt").read_text().splitlines()[281] == "tabby"


def onnx_and_tflite_folder(out: Path, folder: Path, precisions: tuple[str, ...] = ("fp32", "int8")) -> Path:
    """A copy of the output folder with only its ONNX and TFLite artifacts (the Core ML reference is slow)."""
    folder.mkdir()
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"]
                             if a["target"] in ("onnx", "tflite") and a["precision"] in precisions]
    for entry in manifest["artifacts"]:
        shutil.copy(out / entry["file"], folder / entry["file"])
    shutil.copy(out / manifest["quantization"]["channel_scales_file"], folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_check_passes_then_a_corrupted_layer_fails_and_is_diagnosed(
        converted: tuple[Path, dict], real_v2_weights: Path, eval_dir: Path, tmp_path: Path) -> None:
    """Issue 5: a layer with corrupted weights fails check with exit 1 and the diagnosis names it among the worst
    three; the Markdown and HTML reports come out of the same run."""
    import onnx
    from onnx import numpy_helper

    folder = onnx_and_tflite_folder(converted[0], tmp_path / "folder")
    args = ["--model", str(real_v2_weights), "--arch", "mobilenet_v2", "--eval", str(eval_dir), "--eval-size", "64"]
    clean = runner.invoke(app, ["check", str(folder), *args, "--report", str(tmp_path / "clean")])
    assert clean.exit_code == 0, clean.output
    model = onnx.load(str(folder / "mobilenet_v2.int8.onnx"))
    weights = [i for i in model.graph.initializer if i.name.endswith("/weight_q")]
    victim = weights[len(weights) // 2]  # a layer in the middle of the network
    codes = numpy_helper.to_array(victim)
    shuffled = np.random.default_rng(0).permutation(codes.reshape(-1)).reshape(codes.shape)
    victim.CopyFrom(numpy_helper.from_array(shuffled, victim.name))
    onnx.save(model, str(folder / "mobilenet_v2.int8.onnx"))
    node = victim.name.removesuffix("/weight_q")
    corrupt_tflite_layer(folder / "mobilenet_v2.int8.tflite", node)
    result = runner.invoke(app, ["check", str(folder), *args, "--report", str(tmp_path / "broken")])
    assert result.exit_code == ExitCode.PARITY_FAILED, result.output
    report = json.loads((tmp_path / "broken" / "report.json").read_text())
    for entry in report["artifacts"]:
        if entry["precision"] == "int8":
            assert not entry["parity"]["passed"]
            assert node in [layer["name"] for layer in entry["diagnosis"]["worst"]], entry["diagnosis"]["worst"]
    source = next(a for a in report["artifacts"] if a["precision"] == "int8")["diagnosis"]["worst"][0]["source"]
    summary = (tmp_path / "broken" / "summary.md").read_text()
    assert "FAILED" in summary and source in summary
    html = (tmp_path / "broken" / "report.html").read_text()
    assert html.count("<svg") >= 3 and source in html
    assert "PASSED" in (tmp_path / "clean" / "summary.md").read_text()


def test_bench_times_every_artifact_of_the_real_model(converted: tuple[Path, dict], tmp_path: Path) -> None:
    """Issue 5: bench prints fp32 and int8 latency for ONNX Runtime and LiteRT with percentiles. How close its p50
    comes to the runtime calls timed directly depends on machine load: bench/bench_timing.py measures that (and
    bench/RESULTS.md records it); tests/test_latency.py checks the arithmetic with a fake clock."""
    folder = onnx_and_tflite_folder(converted[0], tmp_path / "folder")
    result = runner.invoke(app, ["bench", str(folder), "--threads", "1", "--runs", "40", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["file"]: row for row in json.loads(result.stdout)["rows"]}
    table = runner.invoke(app, ["bench", str(folder), "--threads", "1", "--runs", "5"]).stdout
    for name in BENCHED:
        row = rows[name]
        assert row["status"] == "passed" and 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["runs"] == 40 and row["threads"] == 1
        assert name in table
    assert "p99 ms" in table


BENCHED = ("mobilenet_v2.fp32.onnx", "mobilenet_v2.int8.onnx", "mobilenet_v2.fp32.tflite", "mobilenet_v2.int8.tflite")


def test_real_model_predicts_real_photos(converted: tuple[Path, dict], eval_dir: Path) -> None:
    """The weights really loaded: espresso crops are mostly called espresso by the int8 ONNX model."""
    from mdeploy.calibration.dataset import SampleSet
    from mdeploy.calibration.preprocess import Preprocess

    out, _ = converted
    samples = SampleSet.from_folder(eval_dir, Preprocess.imagenet(224))
    coffee = np.stack([samples[i] for i, p in enumerate(samples.paths) if p.name.startswith("coffee_")])
    logits = REGISTRY[Target.onnx].runner(out / "mobilenet_v2.int8.onnx")(coffee)
    labels = LABELS.read_text().splitlines()
    names = [labels[i] for i in logits.argmax(axis=1)]
    assert names.count("espresso") >= len(names) // 2, names


def test_bundle_golden_vectors_come_from_real_photos(converted: tuple[Path, dict]) -> None:
    """Issue 7 on the real model: the golden inputs are real held-out photos, shipped raw beside their tensors, and
    the bundle's own verifier (no mdeploy import) reproduces every golden output it has a runtime for."""
    import subprocess
    import sys

    from tests.test_bundle import NO_MDEPLOY

    out, manifest = converted
    golden = manifest["golden"]
    assert golden["samples"] == 4 and all(image and (out / image).is_file() for image in golden["images"])
    done = subprocess.run([sys.executable, "-I", "-c", NO_MDEPLOY, str(out)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    runnable = [t for t, c in REGISTRY.items() if (r := c.bundle_runner()) is not None and r.run is not None]
    assert done.stdout.count("ok ") == 2 * len(runnable)  # fp32 and int8 of each; Core ML is skipped off Apple


@pytest.mark.arm
def test_real_int8_artifacts_on_three_emulated_arm_cpus(converted: tuple[Path, dict], real_v2_weights: Path,
                                                        eval_dir: Path, tmp_path: Path) -> None:
    """Issue 6: the real MobileNetV2 int8 ONNX and TFLite files on three emulated ARM CPU models, with parity vs
    PyTorch and the int8 output codes that differ from the x86 run."""
    from tests.test_arm import require_root_on_debian

    require_root_on_debian()
    from mdeploy.arm import setup_sandbox

    assert setup_sandbox().ready
    folder = onnx_and_tflite_folder(converted[0], tmp_path / "int8", precisions=("int8",))
    result = runner.invoke(app, ["check", str(folder), "--model", str(real_v2_weights), "--arch", "mobilenet_v2",
                                 "--eval", str(eval_dir), "--eval-size", "16", "--min-top1", "0.5",
                                 "--platform", "linux-arm64", "--report", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    arm = json.loads((tmp_path / "report" / "report.json").read_text())["arm"]
    assert arm["cpus"] == ["cortex-a53", "neoverse-n1", "neoverse-v1"]
    assert {(r["artifact"], r["cpu"]) for r in arm["results"]} == {
        (f"mobilenet_v2.int8.{suffix}", cpu) for suffix in ("onnx", "tflite") for cpu in arm["cpus"]}
    for row in arm["results"]:
        assert row["parity"]["metrics"]["snr_db"] >= 15.0
        # Measured: LiteRT/XNNPACK int8 is bit-identical to x86; ONNX Runtime's ARM int8 kernels round up to 3 LSB
        # away from its x86 ones on ~40% of the codes, at the same SNR. Differences are reported, small, and real.
        assert row["vs_x86"]["unit"] == "int8 output codes" and row["vs_x86"]["max_lsb"] <= 4
    assert "emulated ARM" in result.stdout and "no latency" in result.stdout
