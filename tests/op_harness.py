"""What the op test files (``test_ops_structure``, ``test_ops_activations``, ``test_ops_attention``) share: photo sets,
building and tracing a small model, exporting to a target and running it, and the two checks every op model goes
through: fp32 on every runtime against PyTorch, and int8 on every runtime against PyTorch and against the
quantiser's simulation. The thresholds are the callers': each test file explains its own.

The checks' assertions carry their measured values in their messages (pytest rewrites asserts in test files only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from mdeploy.converters import REGISTRY, Target
from mdeploy.converters.base import ArtifactInfo
from mdeploy.graph.execute import GraphRunner
from mdeploy.graph.from_torch import graph_from_torch
from mdeploy.graph.ir import Graph
from mdeploy.quantize.simulate import simulate
from tests.model_library import photos

INFO = ArtifactInfo("model", {"crop": 224}, tuple(f"class{i}" for i in range(10)), "test")
# Core ML runs on the MIL reference; ExecuTorch on its runtime
PTE = Target("pte")
TARGETS = (Target.onnx, Target.tflite, Target.coreml, PTE)


def photo_sets(calib_dir: Path, eval_dir: Path, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(32 calibration photos, 8 other photos to check on), preprocessed at ``size``."""
    return photos(calib_dir, size, 32).numpy(), photos(eval_dir, size, 8).numpy()


def build_and_trace(make: Callable[[], nn.Module], size: int,
                    materialise: np.ndarray | None = None) -> tuple[nn.Module, Graph]:
    """The eval model ``make()`` builds (seed 0) and its graph traced at ``size``; with ``materialise``, the model
    first runs on its first image (which materialises lazy layers)."""
    torch.manual_seed(0)
    model = make().eval()
    if materialise is not None:
        with torch.no_grad():
            model(torch.from_numpy(materialise[:1]))
    return model, graph_from_torch(model, (1, 3, size, size))


def reference(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """PyTorch's outputs on ``x``, one flat row an image."""
    with torch.no_grad():  # an in-place op writes into a tensor autograd would otherwise track
        return model(torch.from_numpy(x)).numpy().reshape(len(x), -1)


def export_and_run(target: Target, graph: Graph, quantized: object, x: np.ndarray, path: Path) -> np.ndarray:
    """Exports ``graph`` as given (with ``quantized``: int8; pass ``quantized.graph`` to export what the pipeline
    does) to ``path`` with the target's converter, runs it on ``x``, returns its one output a flat row an image."""
    converter = REGISTRY[target]
    converter.export(graph, quantized, path, INFO)  # type: ignore[arg-type]
    (output,) = converter.outputs_runner(path)(x).values()
    return np.asarray(output, np.float32).reshape(len(x), -1)


def assert_one_delegate(path: Path, outside: tuple[str, ...]) -> None:
    """The ExecuTorch program at ``path`` is one XNNPACK delegate with nothing outside, or runs exactly the ops
    ``outside`` (as ``inspect`` names them) outside its delegates."""
    report = REGISTRY[PTE].inspect(path)
    assert sorted(report["ops"]) == sorted(outside), f"pte: outside XNNPACK {report['ops']}, expected {outside}"
    if not outside:
        assert report["delegates"] == {"XnnpackBackend": 1}, f"pte: delegates {report['delegates']}"


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """Signal-to-noise ratio of ``value`` against ``reference``, in dB."""
    noise = np.sum((value.astype(np.float64) - reference) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def assert_fp32_everywhere(model: nn.Module, graph: Graph, x: np.ndarray, tmp_path: Path, limit: float,
                           pte_outside: tuple[str, ...] = ()) -> None:
    """The executor, then ONNX, TFLite, Core ML and ExecuTorch in fp32, each within ``limit`` * max(1, max
    |PyTorch|) of PyTorch (largest absolute difference); the ExecuTorch program one XNNPACK delegate, or with
    exactly ``pte_outside`` outside (``assert_one_delegate``)."""
    expected = reference(model, x)
    limit = limit * max(1.0, float(np.abs(expected).max()))
    error = np.abs(GraphRunner(graph)(x).numpy().reshape(len(x), -1) - expected).max()
    assert error <= limit, f"executor: {error} > {limit}"
    for target in TARGETS:
        path = tmp_path / f"m.fp32{REGISTRY[target].suffix}"
        error = np.abs(export_and_run(target, graph, None, x, path) - expected).max()
        assert error <= limit, f"{target}: {error} > {limit}"
        if target is PTE:
            assert_one_delegate(path, pte_outside)


def assert_int8_everywhere(model: nn.Module, graph: Graph, quantized: object, x: np.ndarray, tmp_path: Path,
                           min_snr_db: float, min_snr_vs_simulation_db: float, pte_outside: tuple[str, ...] = ()
                           ) -> None:
    """The quantiser's simulation, then ONNX, TFLite, Core ML and ExecuTorch in int8 (``graph`` exported as given,
    with ``quantized``), each at least ``min_snr_db`` against PyTorch; each runtime also at least
    ``min_snr_vs_simulation_db`` against the simulation (the runtime runs what the quantiser chose); the ExecuTorch
    program as ``assert_one_delegate`` wants it."""
    expected = reference(model, x)
    simulated = simulate(quantized, x).reshape(len(x), -1)  # type: ignore[arg-type]
    snr = snr_db(expected, simulated)
    assert snr >= min_snr_db, f"simulation vs PyTorch: {snr:.2f} dB < {min_snr_db} dB"
    for target in TARGETS:
        path = tmp_path / f"m.int8{REGISTRY[target].suffix}"
        out = export_and_run(target, graph, quantized, x, path)
        if target is PTE:
            assert_one_delegate(path, pte_outside)
        snr = snr_db(expected, out)
        assert snr >= min_snr_db, f"{target} vs PyTorch: {snr:.2f} dB < {min_snr_db} dB"
        snr = snr_db(simulated, out)
        assert snr >= min_snr_vs_simulation_db, f"{target} vs simulation: {snr:.2f} dB < {min_snr_vs_simulation_db} dB"
