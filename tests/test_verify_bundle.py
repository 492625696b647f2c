"""The bundle's stand-alone verifier (issue 12, item 4): one line per problem, never a traceback, exit 2 for every
integrity problem, 1 only for a real numeric mismatch, and no path that leaves the bundle.

Set MDEPLOY_VERIFIER=/path/to/verify_bundle.py to run these tests against another version of the verifier.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from mdeploy.cli import app
from tests.test_bundle import write_project

SIZE = 32
FP32_ONNX, INT8_ONNX, INT8_TFLITE = "mobilenet_v2.fp32.onnx", "mobilenet_v2.int8.onnx", "mobilenet_v2.int8.tflite"
PREFIXES = ("ok      ", "MISMATCH ", "skipped  ", "CORRUPT: ")  # every line printed is one of these
# Runs the verifier with the named modules made unimportable.
BLOCKED = ("import runpy, sys\n"
           "for name in sys.argv[3].split(','): sys.modules[name] = None\n"
           "sys.argv = sys.argv[1:3]\n"
           "runpy.run_path(sys.argv[0], run_name='__main__')\n")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ONNX + TFLite, fp32 + int8 bundle (a few seconds to build)."""
    root = tmp_path_factory.mktemp("source")
    write_project(root, 0.25, 4, calib=16, evaluation=4, size=SIZE)
    result = CliRunner().invoke(app, [
        "convert", str(root / "model.pt"), "--arch", "mobilenet_v2", "--to", "onnx,tflite", "--int8", "--calib",
        str(root / "calib"), "--eval", str(root / "eval"), "--input-size", str(SIZE), "--out", str(root / "bundle"),
        "--min-top1", "0", "--min-snr", "0"])
    assert result.exit_code == 0, result.output
    return root / "bundle"


@pytest.fixture
def bundle(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine, tmp_path / "bundle", symlinks=True))


@pytest.fixture
def outside(pristine: Path, tmp_path: Path) -> Path:
    """A genuine golden file, copied next to (not into) the bundle: only where it lies is wrong."""
    return Path(shutil.copyfile(pristine / "golden" / f"{FP32_ONNX}.npy", tmp_path / "outside.npy"))


def verify(bundle: Path, blocked: str = "mdeploy,converters,calibration") -> subprocess.CompletedProcess[str]:
    script = os.environ.get("MDEPLOY_VERIFIER") or str(bundle / "verify_bundle.py")
    done = subprocess.run([sys.executable, "-I", "-c", BLOCKED, script, str(bundle), blocked], capture_output=True,
                          text=True, timeout=300)
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert all(line.startswith(PREFIXES) for line in done.stdout.splitlines()), done.stdout
    return done


def assert_exit(done: subprocess.CompletedProcess[str], code: int, *lines: str) -> None:
    """The exit code, and each expected line is the start of one printed line."""
    printed = done.stdout.splitlines()
    assert done.returncode == code, done.stdout + done.stderr
    for line in lines:
        assert any(p.startswith(line) for p in printed), f"no line starting {line!r} in:\n{done.stdout}"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def resum(bundle: Path, *names: str) -> None:
    """Re-lists the named files with their current digests, as a careless re-packer would."""
    lines = [line for line in (bundle / "SHA256SUMS").read_text().splitlines() if line.split("  ", 1)[1] not in names]
    lines += [f"{digest(bundle / name)}  {name}" for name in names]
    (bundle / "SHA256SUMS").write_text("\n".join(lines) + "\n")


def append_sum(bundle: Path, line: str) -> int:
    """Adds a line to SHA256SUMS; returns its line number."""
    lines = [*(bundle / "SHA256SUMS").read_text().splitlines(), line]
    (bundle / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return len(lines)


def edit_manifest(bundle: Path, change: Callable[[dict[str, Any]], object]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    resum(bundle, "manifest.json")


def test_a_sound_bundle_passes_with_mdeploy_unimportable(bundle: Path) -> None:
    done = verify(bundle)
    assert_exit(done, 0, *(f"ok      mobilenet_v2.{name}: max |diff| "
                           for name in ("fp32.onnx", "int8.onnx", "fp32.tflite", "int8.tflite")))
    assert "CORRUPT" not in done.stdout and "MISMATCH" not in done.stdout


def test_a_missing_runtime_is_skipped_not_an_error(bundle: Path) -> None:
    done = verify(bundle, blocked="mdeploy,onnxruntime")
    assert_exit(done, 0, f"skipped  {FP32_ONNX}: runtime not installed (onnxruntime)",
                f"skipped  {INT8_ONNX}: runtime not installed (onnxruntime)", f"ok      {INT8_TFLITE}")


def test_a_real_numeric_mismatch_exits_1(bundle: Path) -> None:
    golden = bundle / "golden" / f"{INT8_TFLITE}.npy"
    np.save(golden, np.load(golden) + 0.5)
    resum(bundle, f"golden/{INT8_TFLITE}.npy")
    done = verify(bundle)
    assert_exit(done, 1, f"MISMATCH {INT8_TFLITE}: max |diff| 0.5", f"ok      {FP32_ONNX}")
    assert "CORRUPT" not in done.stdout


def test_a_missing_manifest_is_corrupt(bundle: Path) -> None:
    (bundle / "manifest.json").unlink()
    lines = (bundle / "SHA256SUMS").read_text().splitlines()
    (bundle / "SHA256SUMS").write_text("".join(f"{line}\n" for line in lines if not line.endswith("  manifest.json")))
    assert_exit(verify(bundle), 2, "CORRUPT: manifest.json: missing")


def test_a_garbled_manifest_is_corrupt(bundle: Path) -> None:
    (bundle / "manifest.json").write_text('{"golden": {"inputs": ')
    resum(bundle, "manifest.json")
    assert_exit(verify(bundle), 2, "CORRUPT: manifest.json: not readable JSON (Expecting value: line 1")


@pytest.mark.parametrize(("change", "line"), [
    (lambda m: m.update(golden=[]), "manifest.golden missing or not an object"),
    (lambda m: m["golden"].pop("inputs"), "golden.inputs missing or not an object"),
    (lambda m: m["golden"]["artifacts"][FP32_ONNX].update(npy=7),
     f'golden.artifacts["{FP32_ONNX}"].npy missing or not a string'),
], ids=["golden-a-list", "no-inputs", "npy-a-number"])
def test_a_manifest_of_the_wrong_shape_is_corrupt(bundle: Path, change: Callable[[dict[str, Any]], object],
                                                  line: str) -> None:
    edit_manifest(bundle, change)
    assert_exit(verify(bundle), 2, f"CORRUPT: manifest.json: {line}")


@pytest.mark.parametrize("tolerance", [{"max_abs_error": "tight"}, {"max_abs_error": None}, {"min_snr_db": [30]},
                                       {"max_abs_error": True}, {"max_abs_error": -1}, {"max_abs_error": float("nan")},
                                       {"note": "none given"}])
def test_a_tolerance_that_is_not_a_number_is_corrupt(bundle: Path, tolerance: dict[str, Any]) -> None:
    edit_manifest(bundle, lambda m: m["golden"]["artifacts"][FP32_ONNX].update(tolerance=tolerance))
    assert_exit(verify(bundle), 2, f'CORRUPT: manifest.json: golden.artifacts["{FP32_ONNX}"].tolerance')


@pytest.mark.parametrize("line", ["nonsense", "abc123  manifest.json", "0" * 64, "0" * 64 + "manifest.json"])
def test_a_malformed_checksum_line_is_corrupt(bundle: Path, line: str) -> None:
    number = append_sum(bundle, line)
    assert_exit(verify(bundle), 2, f'CORRUPT: SHA256SUMS line {number}: not "<64 hex digits>  <file>"')


@pytest.mark.parametrize("kind", ["dot-dot", "absolute", "symlink"])
def test_a_checksum_entry_outside_the_bundle_is_corrupt(bundle: Path, outside: Path, kind: str) -> None:
    name = {"dot-dot": "../outside.npy", "absolute": str(outside), "symlink": "link.npy"}[kind]
    if kind == "symlink":
        (bundle / "link.npy").symlink_to(outside)
    number = append_sum(bundle, f"{digest(outside)}  {name}")  # the right digest: only where it lies is wrong
    reason = {"dot-dot": "contains '..'", "absolute": "an absolute path", "symlink": "resolves outside the bundle"}
    assert_exit(verify(bundle), 2, f"CORRUPT: SHA256SUMS line {number}: {name}: {reason[kind]}")


def test_the_bundles_own_etc_hostname_trick_is_refused(bundle: Path) -> None:
    number = append_sum(bundle, f"{'0' * 64}  ../../../etc/hostname")
    done = verify(bundle)
    assert_exit(done, 2, f"CORRUPT: SHA256SUMS line {number}: ../../../etc/hostname: contains '..'")
    assert len([line for line in done.stdout.splitlines() if line.startswith("CORRUPT")]) == 1


def test_every_file_of_the_bundle_must_be_listed(bundle: Path) -> None:
    (bundle / "extra.bin").write_bytes(b"\0")
    (bundle / "golden" / "images" / "cat.png").write_bytes(b"\x89PNG")
    done = verify(bundle)
    assert_exit(done, 2, "CORRUPT: extra.bin: not listed in SHA256SUMS",
                "CORRUPT: golden/images/cat.png: not listed in SHA256SUMS")
    assert "SHA256SUMS: not listed" not in done.stdout


def test_a_listed_file_missing_or_changed_is_corrupt_and_each_is_named(bundle: Path) -> None:
    (bundle / "golden" / "pytorch.f32").unlink()
    (bundle / "README_android.md").write_text("edited")
    assert_exit(verify(bundle), 2, "CORRUPT: golden/pytorch.f32: listed in SHA256SUMS but missing",
                "CORRUPT: README_android.md: does not match SHA256SUMS")


@pytest.mark.parametrize("kind", ["dot-dot", "absolute", "symlink"])
def test_a_golden_path_outside_the_bundle_is_corrupt(bundle: Path, outside: Path, kind: str) -> None:
    name = {"dot-dot": "../outside.npy", "absolute": str(outside), "symlink": "golden/link.npy"}[kind]
    if kind == "symlink":
        (bundle / name).symlink_to(outside)
        resum(bundle, name)
    edit_manifest(bundle, lambda m: m["golden"]["artifacts"][FP32_ONNX].update(npy=name))
    done = verify(bundle)
    assert_exit(done, 2, f"CORRUPT: manifest.json: {name}: ")
    assert f"{FP32_ONNX}: max |diff|" not in done.stdout  # never read


@pytest.mark.parametrize(("content", "line"), [
    (b"\x93NUMPY garbage", "not a readable .npy file"),
    (np.array([{"a": 1}], dtype=object), "not a readable .npy file"),  # loading it would need pickle
    (np.array(["a", "b"]), "holds <U1, not numbers"),
    (np.zeros((3, 3), np.float32), "shape (3, 3), but mobilenet_v2.fp32.onnx answers (4, 4)"),
], ids=["garbage", "pickle", "strings", "wrong-shape"])
def test_an_unusable_golden_array_is_corrupt(bundle: Path, content: bytes | np.ndarray, line: str) -> None:
    golden = bundle / "golden" / f"{FP32_ONNX}.npy"
    if isinstance(content, bytes):
        golden.write_bytes(content)
    else:
        np.save(golden, content, allow_pickle=True)
    resum(bundle, f"golden/{FP32_ONNX}.npy")
    assert_exit(verify(bundle), 2, f"CORRUPT: golden/{FP32_ONNX}.npy: {line}", f"ok      {INT8_ONNX}")


@pytest.mark.parametrize("artifact", [INT8_ONNX, INT8_TFLITE])
def test_a_corrupt_artifact_whose_hash_matches_is_corrupt(bundle: Path, artifact: str) -> None:
    (bundle / artifact).write_bytes(b"garbage, but listed with its own digest")
    resum(bundle, artifact)
    runtime = "onnxruntime" if artifact.endswith(".onnx") else "LiteRT"
    assert_exit(verify(bundle), 2, f"CORRUPT: {artifact}: {runtime} cannot load or run it (",
                f"ok      {FP32_ONNX}")


def test_the_bundles_verifier_is_the_static_one_with_every_targets_runner_written_in(pristine: Path) -> None:
    """Composed at bundle time (mdeploy/bundle/verifier.py), byte for byte the same each time; the static file in
    mdeploy/data knows no target and runs nothing."""
    from mdeploy.bundle.verifier import MARKER, compose_verifier, static_verifier
    from mdeploy.converters import REGISTRY

    shipped = (pristine / "verify_bundle.py").read_text(encoding="utf-8")
    assert shipped == compose_verifier() == compose_verifier()
    static = static_verifier()
    before, after = static.split(MARKER)
    assert shipped.startswith(before + MARKER) and shipped.endswith(after)
    written = shipped[len(before + MARKER): len(shipped) - len(after)]
    for target, converter in REGISTRY.items():
        runner = converter.bundle_runner()
        assert runner is not None, target
        if runner.run is not None:
            assert any(line.startswith(f"def {runner.run.__name__}(") for line in written.splitlines())
            assert f'register("{target}", "{converter.suffix}", "{runner.runtime}", {runner.run.__name__})\n' \
                in written
        else:
            assert f'register("{target}", "{converter.suffix}", "{runner.runtime}", None, "{runner.why_not}")' \
                in written
    assert written.count("def tensor_encoder(") == 1 and written.count("def tensor_decoder(") == 1
    static_copy = pristine.parent / "static" / "verify_bundle.py"
    static_copy.parent.mkdir(exist_ok=True)
    static_copy.write_text(static, encoding="utf-8")
    done = subprocess.run([sys.executable, "-I", "-c", BLOCKED, str(static_copy), str(pristine), "mdeploy"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok " not in done.stdout, done.stdout + done.stderr
    assert f"skipped  {INT8_TFLITE}: this script does not know how to run it" in done.stdout


def helper_of_a_target() -> None:
    """A module-level function, as a bundle runner's must be."""


def inside(path: Path, inputs: np.ndarray) -> np.ndarray:
    """Module-level, but named like one of the verifier's own functions."""
    return inputs


def test_a_runner_that_cannot_be_copied_in_is_refused_when_composing() -> None:
    from mdeploy.bundle.verifier import compose_verifier
    from mdeploy.converters.base import BundleRunner, ConverterBase

    def local_run(path: Path, inputs: np.ndarray) -> np.ndarray:  # a closure: its source alone would not run
        return inputs

    class Target(ConverterBase):
        suffix = ".x"

        def __init__(self, runner: BundleRunner | None) -> None:
            self.runner = runner

        def bundle_runner(self) -> BundleRunner | None:
            return self.runner

    with pytest.raises(TypeError, match="module-level"):
        compose_verifier({"x": Target(BundleRunner("X", local_run))})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="inside .* would replace another function"):
        compose_verifier({"x": Target(BundleRunner("X", inside))})  # type: ignore[dict-item]
    cannot_run = BundleRunner("Y", None, "needs a Y device", helpers=(helper_of_a_target,))
    composed = compose_verifier({"x": Target(None), "y": Target(cannot_run)})  # type: ignore[dict-item]
    assert 'register("x", ".x", "x", None, "verify_bundle.py cannot run x artifacts")' in composed
    assert 'register("y", ".x", "Y", None, "needs a Y device")' in composed and "def helper_of_a_target(" in composed
