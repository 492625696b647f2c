"""Artifacts and output folders as bad input (issue 12): paths read from an .mlpackage's Manifest.json or an output
folder's manifest.json / SHA256SUMS that lead outside it, artifacts that no longer match SHA256SUMS, malformed,
empty or half-written artifacts, and artifacts whose precision only the file itself tells. Each case: the exit code,
one ``error:`` line naming the problem and the file, no traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.errors import ExitCode
from mdeploy.zoo import Arch, ModelConfig, build_model

SIZE = 32
NAME = "mobilenet_v2"
runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    torch.manual_seed(0)
    torch.save(build_model(ModelConfig(Arch.mobilenet_v2, 0.35, 10, 0.2)).state_dict(), root / "model.pt")
    for name, count, seed in (("calib", 16, 0), ("eval", 4, 1)):
        (root / name).mkdir()
        batch = np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)
        np.save(root / name / "batch.npy", batch)
    result = runner.invoke(app, [
        "convert", str(root / "model.pt"), "--arch", "mobilenet_v2", "--to", "onnx,tflite,coreml", "--int8",
        "--calib", str(root / "calib"), "--input-size", str(SIZE), "--out", str(root / "out"),
        "--min-top1", "0", "--min-snr", "-100",
    ])
    assert result.exit_code == 0, result.output
    return {"root": root, "model": root / "model.pt", "eval": root / "eval", "out": root / "out"}


def copy_of(project: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "build"
    shutil.copytree(project["out"], folder)
    return folder


def check_args(project: dict[str, Path], target: Path, *extra: str) -> list[str]:
    return ["check", str(target), "--model", str(project["model"]), "--arch", "mobilenet_v2", "--eval",
            str(project["eval"]), "--min-top1", "0", "--min-snr", "-100", *extra]


def bench_args(folder: Path, *extra: str) -> list[str]:
    return ["bench", str(folder), "--threads", "1,2", "--runs", "5", "--warmup", "0", *extra]


def one_error_line(result, code: ExitCode, *needles: str) -> str:  # noqa: ANN001 - click's Result
    """The command exited with ``code`` and exactly one ``error:`` line on stderr containing ``needles``."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def rewrite_checksums(folder: Path) -> None:
    """SHA256SUMS as convert would write it for the folder's current files (a file changed on purpose)."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        lines.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.relative_to(folder).as_posix()}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n")


# -- item 3: paths read from an artifact or a manifest stay inside it -------------------------------------------
def test_mlpackage_item_path_outside_the_package_is_refused(project: dict[str, Path], tmp_path: Path) -> None:
    """A crafted Manifest.json item path (``../..``) used to make coremltools open and parse a file elsewhere (here
    another package's model: the check would silently have run that model instead)."""
    package = tmp_path / f"{NAME}.fp32.mlpackage"
    shutil.copytree(project["out"] / package.name, package)
    elsewhere = project["out"] / f"{NAME}.int8.mlpackage" / "Data" / "com.apple.CoreML" / "model.mlmodel"
    manifest = json.loads((package / "Manifest.json").read_text())
    for item in manifest["itemInfoEntries"].values():
        if item["name"] == "model.mlmodel":
            item["path"] = "../" * 40 + str(elsewhere).lstrip("/")  # up to / and down to the other model
    (package / "Manifest.json").write_text(json.dumps(manifest))
    for args in (["inspect", str(package)], check_args(project, package)):
        line = one_error_line(runner.invoke(app, args), ExitCode.BAD_INPUT, str(package / "Manifest.json"),
                              "leads outside", "convert again")
        assert manifest["rootModelIdentifier"] in line  # the bad entry is named


def test_mlpackage_symlink_leading_outside_is_refused(project: dict[str, Path], tmp_path: Path) -> None:
    package = tmp_path / f"{NAME}.fp32.mlpackage"
    shutil.copytree(project["out"] / package.name, package)
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    shutil.rmtree(weights)
    weights.symlink_to(project["out"] / f"{NAME}.int8.mlpackage" / "Data" / "com.apple.CoreML" / "weights")
    one_error_line(runner.invoke(app, ["inspect", str(package)]), ExitCode.BAD_INPUT,
                   "Data/com.apple.CoreML/weights", "symlink", str(package))


def test_manifest_artifact_entry_outside_the_folder_is_refused(project: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(project, tmp_path)
    (tmp_path / "other.fp32.onnx").write_bytes((folder / f"{NAME}.fp32.onnx").read_bytes())
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"][0]["file"] = "../other.fp32.onnx"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for args in (check_args(project, folder), bench_args(folder)):
        one_error_line(runner.invoke(app, args), ExitCode.BAD_INPUT, "'../other.fp32.onnx'",
                       str(folder / "manifest.json"), "leads outside")


def test_sha256sums_entry_outside_the_folder_is_refused(project: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(project, tmp_path)
    with (folder / "SHA256SUMS").open("a") as sums:
        sums.write(f"{'0' * 64}  /etc/passwd\n")
    one_error_line(runner.invoke(app, bench_args(folder)), ExitCode.BAD_INPUT, "'/etc/passwd'",
                   str(folder / "SHA256SUMS"), "absolute path")


# -- item 6: a folder whose artifacts are not what was converted, and malformed artifacts ------------------------
def test_bench_reports_a_checksum_mismatch_and_times_the_others(project: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(project, tmp_path)
    changed = folder / f"{NAME}.fp32.onnx"
    content = bytearray(changed.read_bytes())
    content[-100] ^= 1  # still a loadable model
    changed.write_bytes(bytes(content))
    result = runner.invoke(app, bench_args(folder, "--json"))
    one_error_line(result, ExitCode.BAD_INPUT, changed.name, "SHA256SUMS", str(folder))
    rows = json.loads(result.stdout)["rows"]
    assert {r["status"] for r in rows if r["file"] == changed.name} == {"checksum mismatch"}
    assert all(r["p50_ms"] is None for r in rows if r["file"] == changed.name)
    timed = [r for r in rows if r["target"] in ("onnx", "tflite") and r["file"] != changed.name]
    assert len(timed) == 6 and all(r["status"] == "passed" and r["p50_ms"] > 0 for r in timed)


def test_check_refuses_a_folder_that_does_not_match_sha256sums(project: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(project, tmp_path)
    changed = folder / f"{NAME}.int8.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    content = bytearray(changed.read_bytes())
    content[-1] ^= 1
    changed.write_bytes(bytes(content))
    for target in (folder, folder / f"{NAME}.int8.mlpackage"):
        one_error_line(runner.invoke(app, check_args(project, target)), ExitCode.BAD_INPUT,
                       f"{NAME}.int8.mlpackage", "weight.bin differs from SHA256SUMS", str(folder))


def test_bench_malformed_artifact_gets_a_failed_row(project: dict[str, Path], tmp_path: Path) -> None:
    folder = copy_of(project, tmp_path)
    (folder / f"{NAME}.fp32.tflite").write_bytes(b"not a flatbuffer" * 8)
    rewrite_checksums(folder)  # the same bytes as listed: only malformed
    result = runner.invoke(app, bench_args(folder, "--json"))
    one_error_line(result, ExitCode.BAD_INPUT, f"{NAME}.fp32.tflite", "failed", "cannot be loaded by LiteRT")
    rows = json.loads(result.stdout)["rows"]
    broken = [r for r in rows if r["file"] == f"{NAME}.fp32.tflite"]
    assert [r["status"] for r in broken] == ["failed", "failed"] and "\n" not in broken[0]["reason"]
    assert "not a valid Flatbuffer" in broken[0]["reason"]
    timed = [r for r in rows if r["target"] in ("onnx", "tflite") and r["file"] != f"{NAME}.fp32.tflite"]
    assert len(timed) == 6 and all(r["status"] == "passed" and r["p50_ms"] > 0 for r in timed)


# -- item 8: empty and half-written artifacts, precision read from the file ------------------------------------
def test_zero_byte_onnx_says_it_is_empty(tmp_path: Path) -> None:
    empty = tmp_path / "model.onnx"
    empty.write_bytes(b"")
    line = one_error_line(runner.invoke(app, ["inspect", str(empty)]), ExitCode.BAD_INPUT, str(empty),
                          "is empty (0 bytes)", "convert again")
    assert "max()" not in line


def test_half_written_mlpackage_manifest(project: dict[str, Path], tmp_path: Path) -> None:
    package = tmp_path / f"{NAME}.int8.mlpackage"
    shutil.copytree(project["out"] / package.name, package)
    manifest = package / "Manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:200])
    line = one_error_line(runner.invoke(app, ["inspect", str(package)]), ExitCode.BAD_INPUT, str(manifest),
                          "is not valid JSON", "half-written")
    assert "( parse error" not in line


def test_check_reads_the_precision_from_the_file(project: dict[str, Path], tmp_path: Path) -> None:
    """Files not named NAME.fp32.* / NAME.int8.*: the precision (hence the limits) comes from what the file holds,
    and --precision overrides it."""
    cases = [(f"{NAME}.int8.onnx", "some_model.onnx", "int8"), (f"{NAME}.fp32.tflite", "model.tflite", "fp32"),
             (f"{NAME}.int8.mlpackage", "model.mlpackage", "int8")]
    for source, name, precision in cases:
        target = tmp_path / name
        copy = shutil.copytree if (project["out"] / source).is_dir() else shutil.copyfile
        copy(project["out"] / source, target)
        result = runner.invoke(app, check_args(project, target, "--json"))
        assert result.exit_code in (ExitCode.OK, ExitCode.PARITY_FAILED), result.stderr
        (artifact,) = json.loads(result.stdout)["artifacts"]
        assert artifact["precision"] == precision, name
    result = runner.invoke(app, check_args(project, tmp_path / "some_model.onnx", "--precision", "fp32", "--json"))
    (artifact,) = json.loads(result.stdout)["artifacts"]
    assert artifact["precision"] == "fp32" and "max_abs_error" in artifact["parity"]["thresholds"]
    one_error_line(runner.invoke(app, check_args(project, tmp_path / "some_model.onnx", "--precision", "int4")),
                   ExitCode.BAD_INPUT, "--precision")
