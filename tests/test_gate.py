"""The CI gate end to end through the CLI: `mdeploy check` (config file, reports, agreement, diagnosis, baseline)
and `mdeploy bench` (statuses, percentiles, regressions), on a small MobileNetV2 converted once per module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xmlschema
from typer.testing import CliRunner

from mdeploy.converters.tflite_flatbuffer import read_model
from mdeploy.bundle import write_checksums
from mdeploy.cli import app
from mdeploy.errors import ExitCode
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_graph import randomize_batch_norm

SIZE = 96
CORRUPTED_NODE = "conv2d_50"  # late enough to move the logits of this random-weight model (mid layers barely do)
runner = CliRunner()
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gate")
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.5, 10, 0.2)))
    torch.save(model.state_dict(), root / "model.pt")
    for name, count, seed in (("calib", 32, 0), ("eval", 16, 1)):
        (root / name).mkdir()
        batch = np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)
        np.save(root / name / "batch.npy", batch)
    result = runner.invoke(app, [
        "convert", str(root / "model.pt"), "--arch", "mobilenet_v2", "--to", "onnx,tflite", "--int8", "--calib",
        str(root / "calib"), "--input-size", str(SIZE), "--out", str(root / "out"), "--min-top1", "0",
    ])
    assert result.exit_code == 0, result.output
    return {"root": root, "model": root / "model.pt", "eval": root / "eval", "out": root / "out"}


def check_args(project: dict[str, Path], folder: Path, *extra: str) -> list[str]:
    return ["check", str(folder), "--model", str(project["model"]), "--arch", "mobilenet_v2", "--eval",
            str(project["eval"]), "--min-top1", "0", *extra]


def corrupt_onnx_layer(path: Path, node: str) -> None:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == f"{node}/weight_q":
            stored = numpy_helper.to_array(init)  # uint8: int8 code + 128 (converters/onnx_dense.stored_codes)
            codes = stored.astype(np.int16) - 128
            init.CopyFrom(numpy_helper.from_array((np.clip(-codes, -127, 127) + 128).astype(stored.dtype), init.name))
            break
    else:
        raise AssertionError(f"no int8 weight of {node}")
    onnx.save(model, str(path))


def corrupt_tflite_layer(path: Path, node: str) -> None:
    """Negates the int8 weight codes of ``node`` in place in the flatbuffer's bytes."""
    content = bytearray(path.read_bytes())
    model = read_model(bytes(content))
    (tensor,) = [t for t in model.subgraphs[0].tensors if t.name == f"{node}/weight".encode()]
    codes = np.asarray(model.buffers[tensor.buffer].data, dtype=np.uint8).tobytes()
    at = content.find(codes)
    assert at >= 0 and content.find(codes, at + 1) < 0
    flipped = np.clip(-np.frombuffer(codes, np.int8).astype(np.int16), -127, 127).astype(np.int8)
    content[at : at + len(codes)] = flipped.tobytes()
    path.write_bytes(bytes(content))


@pytest.fixture(scope="module")
def corrupted(project: dict[str, Path]) -> Path:
    folder = project["root"] / "corrupted"
    shutil.copytree(project["out"], folder)
    corrupt_onnx_layer(folder / "mobilenet_v2.int8.onnx", CORRUPTED_NODE)
    corrupt_tflite_layer(folder / "mobilenet_v2.int8.tflite", CORRUPTED_NODE)
    write_checksums(folder)  # a conversion that went wrong, not a file changed after it (that is exit 2)
    return folder


def test_clean_folder_passes_with_reports_and_agreement(project: dict[str, Path]) -> None:
    report_dir = project["root"] / "report-clean"
    result = runner.invoke(app, check_args(project, project["out"], "--report", str(report_dir), "--bench"))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in report_dir.iterdir()) == ["junit.xml", "report.html", "report.json", "summary.md"]
    report = json.loads((report_dir / "report.json").read_text())
    assert report["kind"] == "check" and report["passed"] and len(report["artifacts"]) == 4
    matrix = report["agreement"]
    assert matrix["artifacts"] == [a["file"] for a in report["artifacts"]]
    assert all(matrix["top1"][i][i] == 1.0 for i in range(4))
    assert all(a["diagnosis"] is None for a in report["artifacts"])  # only failures (or --explain) get one
    assert [row["status"] for row in report["bench"]["rows"]] == ["passed"] * 4
    assert "p50" in (report_dir / "summary.md").read_text() and "mobilenet_v2.int8.tflite" in result.stdout
    assert (report_dir / "report.html").read_text().count("<svg") >= 2  # agreement heat map and latency bars
    xmlschema.XMLSchema(DATA / "junit-10.xsd").validate(str(report_dir / "junit.xml"))


def test_corrupted_layer_fails_and_is_named_by_the_diagnosis(project: dict[str, Path], corrupted: Path) -> None:
    report_dir = project["root"] / "report-corrupted"
    result = runner.invoke(app, check_args(project, corrupted, "--report", str(report_dir)))
    assert result.exit_code == ExitCode.PARITY_FAILED, result.output
    report = json.loads((report_dir / "report.json").read_text())
    by_file = {a["file"]: a for a in report["artifacts"]}
    for name in ("mobilenet_v2.int8.onnx", "mobilenet_v2.int8.tflite"):
        artifact = by_file[name]
        assert not artifact["parity"]["passed"]
        worst = [layer["name"] for layer in artifact["diagnosis"]["worst"]]
        assert CORRUPTED_NODE in worst[:3], (name, worst)
        assert artifact["diagnosis"]["first_jump"]["name"] == CORRUPTED_NODE
    assert by_file["mobilenet_v2.fp32.onnx"]["parity"]["passed"]
    assert by_file["mobilenet_v2.fp32.onnx"]["diagnosis"] is None
    source = by_file["mobilenet_v2.int8.onnx"]["diagnosis"]["first_jump"]["source"]
    assert source in result.stdout and source in (report_dir / "summary.md").read_text()
    junit = xmlschema.XMLSchema(DATA / "junit-10.xsd").to_dict(str(report_dir / "junit.xml"))
    assert "failure" in json.dumps(junit)
    assert "<svg" in (report_dir / "report.html").read_text()


def test_thresholds_from_a_config_file_and_flags_win(project: dict[str, Path], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mdeploy.toml").write_text("[thresholds.int8]\nmin_snr_db = 200.0\n")
    monkeypatch.chdir(tmp_path)  # found in the current folder, like pyproject.toml
    result = runner.invoke(app, check_args(project, project["out"], "--json"))
    assert result.exit_code == ExitCode.PARITY_FAILED
    int8 = [a for a in json.loads(result.stdout)["artifacts"] if a["precision"] == "int8"]
    assert all(a["parity"]["thresholds"]["min_snr_db"] == 200.0 for a in int8)
    result = runner.invoke(app, check_args(project, project["out"], "--min-snr", "10", "--json"))
    assert result.exit_code == 0, result.output


def test_pyproject_tool_table_and_typos(project: dict[str, Path], tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text("[project]\nname = 'app'\n[tool.mdeploy.thresholds.fp32]\nmax_abs_error = 1e-12\n")
    result = runner.invoke(app, check_args(project, project["out"], "--config", str(pyproject), "--json"))
    assert result.exit_code == ExitCode.PARITY_FAILED
    pyproject.write_text("[tool.mdeploy.thresholds.int8]\nmin_snr = 20\n")
    result = runner.invoke(app, check_args(project, project["out"], "--config", str(pyproject)))
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "unknown key min_snr" in result.stderr and "min_snr_db" in result.stderr


def test_baseline_regression_fails_the_gate(project: dict[str, Path], corrupted: Path) -> None:
    baseline = project["root"] / "baseline.json"
    clean = runner.invoke(app, check_args(project, project["out"], "--json"))
    baseline.write_text(clean.stdout)
    same = runner.invoke(app, check_args(project, project["out"], "--baseline", str(baseline), "--json"))
    assert same.exit_code == 0 and json.loads(same.stdout)["baseline"]["passed"]
    # Limits loose enough for the corrupted folder to pass parity: only the baseline can fail it.
    worse = runner.invoke(app, check_args(project, corrupted, "--min-snr", "-100", "--baseline", str(baseline),
                                          "--json"))
    assert worse.exit_code == ExitCode.PARITY_FAILED
    regressions = json.loads(worse.stdout)["baseline"]["regressions"]
    assert {(r["artifact"], r["metric"]) for r in regressions} >= {("mobilenet_v2.int8.onnx", "snr_db"),
                                                                  ("mobilenet_v2.int8.tflite", "snr_db")}


def test_explain_diagnoses_passing_artifacts_too(project: dict[str, Path]) -> None:
    result = runner.invoke(app, check_args(project, project["out"], "--explain", "--json"))
    assert result.exit_code == 0, result.output
    for artifact in json.loads(result.stdout)["artifacts"]:
        diagnosis = artifact["diagnosis"]
        assert diagnosis["layers"] and len(diagnosis["worst"]) == 3
        if artifact["precision"] == "fp32":
            assert diagnosis["first_jump"] is None


def test_bench_reports_percentiles_statuses_and_regressions(project: dict[str, Path], tmp_path: Path) -> None:
    result = runner.invoke(app, ["bench", str(project["out"]), "--threads", "1,2", "--runs", "10", "--warmup", "2",
                                 "--json", "--report", str(tmp_path / "bench")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["kind"] == "bench" and len(report["rows"]) == 8
    for row in report["rows"]:
        assert row["status"] == "passed" and row["runs"] == 10
        assert 0 < row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["size_bytes"] > 0
    # A baseline that was 100x faster: every row regresses.
    fast = json.loads(json.dumps(report))
    for row in fast["rows"]:
        row["p50_ms"] /= 100
    (tmp_path / "fast.json").write_text(json.dumps(fast))
    result = runner.invoke(app, ["bench", str(project["out"]), "--threads", "1", "--runs", "5", "--warmup", "1",
                                 "--baseline", str(tmp_path / "fast.json")])
    assert result.exit_code == ExitCode.PARITY_FAILED
    assert "regression" in result.stdout and "p50 latency" in result.stdout


def test_bench_statuses_for_failed_and_unrunnable_targets(project: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    shutil.copytree(project["out"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"][1]["parity"].update(passed=False, failures=["SNR 3.0 dB < 15.0 dB"])
    manifest["artifacts"].append({**manifest["artifacts"][0], "file": "mobilenet_v2.fp32.mlpackage", "target": "coreml",
                                  "precision": "fp32", "runtime": "MIL reference (not Core ML)", "latency": None})
    manifest["failures"] = [{"target": "coreml", "precision": "int8", "error": "coreml int8 export failed: boom"}]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    result = runner.invoke(app, ["bench", str(folder), "--threads", "1", "--runs", "5", "--warmup", "1", "--json"])
    assert result.exit_code == 0, result.output
    rows = {(r["target"], r["precision"]): r for r in json.loads(result.stdout)["rows"]}
    assert rows[("onnx", "int8")]["status"] == "parity failed" and rows[("onnx", "int8")]["p50_ms"] > 0
    assert rows[("coreml", "fp32")]["status"] == "skipped" and "MIL reference" in rows[("coreml", "fp32")]["reason"]
    assert rows[("coreml", "fp32")]["p50_ms"] is None
    assert rows[("coreml", "int8")]["status"] == "conversion failed" and "boom" in rows[("coreml", "int8")]["reason"]


def test_report_folder_never_replaces_a_foreign_folder(project: dict[str, Path], tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    result = runner.invoke(app, check_args(project, project["out"], "--report", str(foreign)))
    assert result.exit_code == ExitCode.BAD_INPUT and "holds no earlier mdeploy report" in result.stderr
    assert (foreign / "notes.txt").read_text() == "keep"
