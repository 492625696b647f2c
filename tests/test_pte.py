"""The `pte` target's own surface (``converters/pte.py``; the registry-parametrised tests cover the rest): what
``inspect`` reads back from a program, the ``metadata`` method, and files that are not programs as bad input."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from mdeploy.calibration.config import QuantRecipe
from mdeploy.cli import app
from mdeploy.converters import REGISTRY, Target
from mdeploy.errors import BadInputError, ExitCode
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.quantize.ptq import quantize
from tests.model_library import short_mobilenet_v3
from tests.test_converters import INFO, nearest_int8
from tests.test_graph import randomize_batch_norm

PTE = Target("pte")
SIZE = 32
runner = CliRunner()


@pytest.fixture(scope="module")
def int8_v3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, QuantizedGraph]:
    model = randomize_batch_norm(short_mobilenet_v3())
    graph = graph_from_torch(model, (1, 3, SIZE, SIZE))
    quantized = nearest_int8(graph, np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32))
    path = tmp_path_factory.mktemp("pte") / "v3.int8.pte"
    REGISTRY[PTE].export(graph, quantized, path, INFO)
    return path, quantized


def test_inspect_reads_the_delegate_and_the_metadata_back(int8_v3) -> None:  # type: ignore[no-untyped-def]
    path, quantized = int8_v3
    report = REGISTRY[PTE].inspect(path)
    graph = quantized.graph
    assert report["format"] == "ExecuTorch" and report["methods"] == ["forward", "metadata"]
    assert report["delegates"] == {"XnnpackBackend": 1} and report["ops"] == {}, report
    assert report["float_int8_conversions"] == 2  # float only at the program's input and output
    assert report["xnnpack_nodes"]["XNNConv2d"] > 10 and report["int8_weight_tensors"] == len(graph.weighted_nodes)
    gates = sum(n.op.value == "hardsigmoid" for n in graph.nodes)  # hard-swish is XNNPACK's int8 table: no weight
    assert int(report["metadata"]["mdeploy.int8_gates"]) == gates > 0
    assert report["inputs"] == [{"name": "input", "dtype": "float32", "shape": [1, 3, SIZE, SIZE]}]
    assert report["outputs"] == [{"name": "logits", "dtype": "float32", "shape": [1, 10]}]
    io = json.loads(report["metadata"]["mdeploy.io"])
    grid = quantized.activations[graph.outputs[0]]
    assert io["output"]["int8_grid"]["scale"] == pytest.approx(grid.scale) and "crop" in report["metadata"][
        "mdeploy.preprocess"]
    assert any(g["scale"] == pytest.approx(grid.scale, rel=1e-6) and g["zero_point"] == grid.zero_point
               for g in report["activation_quantization"])  # the output's grid, as XNNPACK holds it


@pytest.mark.parametrize("content", [b"", b"not a program at all" * 10], ids=["empty", "garbage"])
def test_a_file_that_is_no_program_is_bad_input(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.int8.pte"
    path.write_bytes(content)
    with pytest.raises(BadInputError, match="model.int8.pte"):
        REGISTRY[PTE].inspect(path)
    with pytest.raises(BadInputError, match="model.int8.pte"):
        REGISTRY[PTE].runner(path)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == ExitCode.BAD_INPUT and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1 and "model.int8.pte" in result.stderr


def test_a_truncated_program_is_bad_input(int8_v3, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cut.pte"
    path.write_bytes(int8_v3[0].read_bytes()[:4096])
    with pytest.raises(BadInputError, match="cut.pte"):
        REGISTRY[PTE].runner(path)


def test_mixed_precision_programs_record_no_gate_for_float_layers(int8_v3: tuple[Path, QuantizedGraph],
                                                                 tmp_path: Path) -> None:
    """The metadata's gate count is the program's: a hard-sigmoid kept in float has none."""
    path, full = int8_v3
    graph = full.graph
    first_hardsigmoid = next(n for n in graph.nodes if n.op.value == "hardsigmoid")
    x = np.random.default_rng(0).standard_normal((8, 3, SIZE, SIZE)).astype(np.float32)
    mixed = quantize(graph, x, replace(QuantRecipe.stock_minmax(), float_nodes=(first_hardsigmoid.name,)))
    REGISTRY[PTE].export(graph, mixed, tmp_path / "mixed.pte", INFO)
    gates = [int(REGISTRY[PTE].inspect(p)["metadata"]["mdeploy.int8_gates"]) for p in (path, tmp_path / "mixed.pte")]
    assert gates[1] == gates[0] - 1 > 0
