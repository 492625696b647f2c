"""A target registered from this file alone gets convert, the manifest, the bundle (its app README, its runner in
``verify_bundle.py``), check and bench, with no other file changed: what issue 13 asks of the Converter interface.

The dummy target writes ``NAME.PRECISION.dummy``: one header line naming its flavour (the option it adds to
``mdeploy convert``), then the bytes of the ONNX artifact of the same graph, run on ONNX Runtime.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.cli import app
from mdeploy.converters import REGISTRY
from mdeploy.converters.base import AppReadme, ArtifactInfo, BundleRunner, CliOption, ConverterBase, ReadmeParts
from mdeploy.converters.onnx import OnnxConverter
from mdeploy.errors import ExitCode
from mdeploy.graph.ir import Graph
from mdeploy.manifest import Manifest
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.types import Precision, Runner, Target
from mdeploy.zoo import Arch, ModelConfig, build_model
from tests.test_graph import randomize_batch_norm

DUMMY = Target("dummy")
HEADER = b"DUMMY1 "
SIZE = 64
runner = CliRunner()


class Flavour(str, Enum):
    plain = "plain"
    salted = "salted"


def split_dummy(path: Path) -> tuple[str, bytes]:
    data = Path(path).read_bytes()
    header, _, onnx_bytes = data.partition(b"\n")
    if not header.startswith(HEADER):
        raise ValueError(f"{path} is not a dummy artifact")
    return header[len(HEADER):].decode(), onnx_bytes


def run_dummy_in_bundle(path: Path, inputs: Any) -> Any:
    """The verifier's runner: its source is copied into verify_bundle.py, so it imports inside its body."""
    import numpy as np
    import onnxruntime as ort

    data = open(path, "rb").read()
    session = ort.InferenceSession(data.partition(b"\n")[2], providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in np.asarray(inputs, dtype=np.float32)])


class DummyConverter(ConverterBase):
    target = DUMMY
    suffix = ".dummy"
    runtime_name = "ONNX Runtime (dummy wrapper)"
    requires = ("onnxruntime",)
    packages = ("onnxruntime",)

    def __init__(self, flavour: Flavour = Flavour.plain) -> None:
        self.flavour = Flavour(flavour)

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        onnx_path = Path(path).with_suffix(".onnx.tmp")
        OnnxConverter().export(graph, quantized, onnx_path, info)
        Path(path).write_bytes(HEADER + self.flavour.value.encode() + b"\n" + onnx_path.read_bytes())
        onnx_path.unlink()

    def runner(self, path: Path, threads: int = 1) -> Runner:
        import onnxruntime as ort

        _, onnx_bytes = split_dummy(path)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def inspect(self, path: Path) -> dict[str, Any]:
        flavour, onnx_bytes = split_dummy(path)
        with tempfile.TemporaryDirectory() as folder:
            onnx_path = Path(folder) / "model.onnx"
            onnx_path.write_bytes(onnx_bytes)
            report = OnnxConverter().inspect(onnx_path)
        return {**report, "format": "dummy", "flavour": flavour, "size_bytes": Path(path).stat().st_size}

    def settings(self, precision: Precision) -> dict[str, Any]:
        return {"flavour": self.flavour.value}

    def cli_options(self) -> tuple[CliOption, ...]:
        return (CliOption("dummy_flavour", Flavour, Flavour.plain, "flavour written into the dummy header"),)

    def configured(self, values: Mapping[str, Any], int8: bool) -> DummyConverter:
        return DummyConverter(values["dummy_flavour"])

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme:
        files = ", ".join(a.file for a in manifest.artifacts if a.target == DUMMY)
        return AppReadme("README_dummy.md", f"# Dummy app\n\nShipped: {files}\n\n{parts.contract}\n")

    def bundle_runner(self) -> BundleRunner:
        return BundleRunner("ONNX Runtime (dummy)", run_dummy_in_bundle)


@pytest.fixture
def dummy_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, DUMMY, DummyConverter())


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.manual_seed(0)
    model = randomize_batch_norm(build_model(ModelConfig(Arch.mobilenet_v2, 0.35, 10, 0.2)))
    root = tmp_path_factory.mktemp("dummy")
    torch.save(model.state_dict(), root / "model.pt")
    (root / "calib").mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "calib" / "batch.npy", rng.standard_normal((16, 3, SIZE, SIZE)).astype(np.float32))
    return root / "model.pt", root / "calib"


@pytest.fixture
def converted(dummy_registered: None, model_and_data: tuple[Path, Path], tmp_path: Path) -> Path:
    model, calib = model_and_data
    out = tmp_path / "out"
    result = runner.invoke(app, [
        "convert", str(model), "--arch", "mobilenet_v2", "--to", "onnx,dummy", "--int8", "--calib", str(calib),
        "--input-size", str(SIZE), "--dummy-flavour", "salted", "--out", str(out),
    ])
    assert result.exit_code == 0, result.output
    return out


def test_convert_writes_the_dummy_artifacts_with_its_option(converted: Path) -> None:
    for precision in ("fp32", "int8"):
        flavour, onnx_bytes = split_dummy(converted / f"mobilenet_v2.{precision}.dummy")
        assert flavour == "salted" and onnx_bytes.startswith(b"\x08")  # a serialised ONNX ModelProto
    manifest = Manifest.read(converted / "manifest.json")
    dummies = [a for a in manifest.artifacts if a.target == DUMMY]
    assert [a.precision for a in dummies] == ["fp32", "int8"]
    assert all(a.parity.passed and a.settings == {"flavour": "salted"} for a in dummies)
    readme = (converted / "README_dummy.md").read_text()
    assert "mobilenet_v2.fp32.dummy" in readme and "mobilenet_v2.int8.dummy" in readme
    sums = (converted / "SHA256SUMS").read_text()
    assert "mobilenet_v2.int8.dummy" in sums and "README_dummy.md" in sums
    golden = json.loads((converted / "manifest.json").read_text())["golden"]["artifacts"]
    assert {"mobilenet_v2.fp32.dummy", "mobilenet_v2.int8.dummy"} <= set(golden)


def test_the_bundle_verifier_runs_the_dummy_artifacts_without_mdeploy(converted: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "mdeploy.py").write_text("raise ImportError('mdeploy must not be needed by verify_bundle.py')\n")
    env = {**os.environ, "PYTHONPATH": str(blocker)}
    result = subprocess.run([sys.executable, str(converted / "verify_bundle.py")], cwd=converted, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mobilenet_v2.int8.dummy" in result.stdout and "ONNX Runtime (dummy)" in result.stdout


def test_check_and_bench_run_the_dummy_artifacts(converted: Path, model_and_data: tuple[Path, Path]) -> None:
    model, calib = model_and_data
    checked = runner.invoke(app, ["check", str(converted / "mobilenet_v2.int8.dummy"), "--model", str(model),
                                  "--arch", "mobilenet_v2", "--eval", str(calib), "--input-size", str(SIZE), "--json"])
    assert checked.exit_code == 0, checked.output
    report = json.loads(checked.stdout)
    (artifact,) = report["artifacts"]
    assert report["passed"] and artifact["target"] == "dummy" and artifact["runtime"] == "ONNX Runtime (dummy wrapper)"
    benched = runner.invoke(app, ["bench", str(converted), "--threads", "1", "--runs", "5", "--warmup", "1",
                                  "--json"])
    assert benched.exit_code == 0, benched.output
    assert "mobilenet_v2.int8.dummy" in benched.stdout


def test_the_option_exists_only_while_the_target_is_registered(dummy_registered: None, monkeypatch: pytest.MonkeyPatch,
                                                                model_and_data: tuple[Path, Path]) -> None:
    shown = runner.invoke(app, ["convert", "--help"], env={"TERMINAL_WIDTH": "240", "COLUMNS": "240"})
    assert "--dummy-flavour" in shown.output and ",".join([*(t.value for t in REGISTRY if t != DUMMY), "dummy"]) in \
        shown.output
    monkeypatch.delitem(REGISTRY, DUMMY)
    model, _ = model_and_data
    refused = runner.invoke(app, ["convert", str(model), "--to", "dummy", "--out", "unused"])
    assert refused.exit_code == ExitCode.BAD_INPUT and "unknown target 'dummy'" in refused.output
    assert "--dummy-flavour" not in runner.invoke(app, ["convert", "--help"], env={"TERMINAL_WIDTH": "240", "COLUMNS": "240"}).output
