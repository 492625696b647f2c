"""ExecuTorch target (``--to pte``): programs for PyTorch's on-device runtime, lowered whole to its XNNPACK delegate,
run on ``executorch.runtime`` for parity and latency.

The program is written from the IR (``pte_program``): fp32 as the graph is; int8 with exactly the quantiser's
weights, scales and zero points as quantize/dequantize pairs XNNPACK turns into int8 kernels, hard-swish and
hard-sigmoid in int8 forms it keeps. The input and outputs stay float32 NCHW (the program quantises inside), batch 1.
A program has no metadata slot: a second method, ``metadata``, returns the preprocessing contract, labels and I/O
description as one JSON string (the keys the other targets carry).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from importlib import metadata as distributions
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.converters.base import (ONE_OUTPUT_STAGE, AppReadme, ArtifactInfo, BundleRunner, ConverterBase,
                                     Precision, ReadmeParts, Runner, Target, capture_stderr, require_content)
from mdeploy.errors import BadInputError
from mdeploy.graph.ir import Graph, only_output
from mdeploy.manifest import Manifest
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.types import INPUT_NAME, OutputsRunner, outputs_entry

PTE = Target("pte")


class PteConverter(ConverterBase):
    target = PTE
    suffix = ".pte"
    runtime_name = "ExecuTorch runtime (XNNPACK delegate, CPU)"
    requires = ("executorch",)
    packages = ("executorch", "torchao")
    # Measured 2026-12-07: torch-2.13.0-cp311-manylinux_2_28_aarch64 from PyPI fails at import without libcublasLt.
    taps_unavailable = ("ExecuTorch's ETDump exposes intermediate tensors only outside delegates, and the whole "
                        "program is one XNNPACK delegate; diagnose the ONNX or TFLite artifact of the same int8 model")
    arm_unavailable = ("ExecuTorch's Python runtime imports torch, and PyPI's torch for aarch64 is a CUDA build that "
                       "needs NVIDIA's libraries (the CPU build is not on PyPI)")

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        from mdeploy.converters.pte_program import write_program

        # ops XNNPACK does not take run outside its delegate, on ExecuTorch's portable kernels (inspect lists them)
        write_program(graph, quantized, Path(path), _metadata(graph, quantized, info))

    def settings(self, precision: Precision) -> dict[str, Any]:
        common = {"delegate": "XNNPACK", "batch": 1, "layout": "NCHW", "executorch": _version("executorch")}
        if precision is Precision.int8:
            return {**common, "int8_format": "quantize/dequantize pairs lowered to XNNPACK int8 kernels, float32 I/O"}
        return common

    def runner(self, path: Path, threads: int = 1) -> Runner:
        run, names = _load(Path(path), threads)
        only_output(names, ONE_OUTPUT_STAGE, Path(path).name)
        return lambda batch: run(batch)[0]

    def outputs_runner(self, path: Path, threads: int = 1) -> OutputsRunner:
        run, names = _load(Path(path), threads)
        return lambda batch: dict(zip(names, run(batch), strict=True))

    def inspect(self, path: Path) -> dict[str, Any]:
        from mdeploy.converters.pte_inspect import read_program

        require_content(Path(path), "an ExecuTorch program")
        report = read_program(Path(path))
        gates = int(report["metadata"].get("mdeploy.int8_gates", 0))
        report["int8_weight_tensors"] = report.pop("per_channel_int8_tensors") - gates
        return report

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
        from mdeploy.converters.pte_readme import executorch_readme

        return executorch_readme(manifest, parts)

    def bundle_runner(self) -> BundleRunner:
        from mdeploy.converters.pte_runs import run_pte_in_bundle

        return BundleRunner("executorch", run_pte_in_bundle)


def _metadata(graph: Graph, quantized: QuantizedGraph | None, info: ArtifactInfo) -> dict[str, str]:
    from mdeploy.converters.pte_program import gated_nodes

    names = graph.artifact_names
    tensors: dict[str, dict[str, Any]] = {graph.input_name: {"name": INPUT_NAME, "dtype": "float32",
                                                             "shape": list(graph.input_shape)}}
    meaning = {"meaning": "raw logits"} if len(names) == 1 else {}
    for tensor, name in names.items():
        tensors[tensor] = {"name": name, "dtype": "float32", "shape": [1, *graph.shapes.get(tensor, (1, 0))[1:]],
                           **meaning}
    if quantized is not None:
        for tensor, entry in tensors.items():
            grid = quantized.activations.get(tensor)
            if grid is not None:
                entry["int8_grid"] = {"scale": float(grid.scale), "zero_point": int(grid.zero_point),
                                      "stored_as": "int8 inside the program; the I/O tensors are float32"}
    io = {"input": tensors[graph.input_name], **outputs_entry([tensors[t] for t in names])}
    return {
        "mdeploy.preprocess": json.dumps(info.preprocess, sort_keys=True),
        "mdeploy.labels": json.dumps(list(info.labels)),
        "mdeploy.precision": "int8" if quantized is not None else "fp32",
        "mdeploy.layout": "NCHW",
        "mdeploy.io": json.dumps(io, sort_keys=True),
        "mdeploy.int8_gates": str(len(gated_nodes(quantized)) if quantized is not None else 0),
        "mdeploy.producer_version": info.producer_version,
        **info.extra,
    }


def _load(path: Path, threads: int) -> tuple[Callable[[np.ndarray], list[np.ndarray]], list[str]]:
    """The program's forward method on ExecuTorch's runtime, run one image at a time, and its outputs' names."""
    from mdeploy.converters.pte_inspect import output_names, read_program
    from mdeploy.converters.pte_program import quiet_imports

    require_content(path, "an ExecuTorch program")
    report = read_program(path)  # BadInputError for anything else, before the runtime's own messages
    names = output_names(report["metadata"], len(report["outputs"]))
    with quiet_imports():
        import torch
        from executorch.extension.pybindings.portable_lib import (_threadpool_get_thread_count,
                                                                  _unsafe_reset_threadpool)
        from executorch.runtime import Runtime

    def load() -> Any:
        if _threadpool_get_thread_count() != threads:
            _unsafe_reset_threadpool(threads)  # XNNPACK's pool is process-wide: nothing else runs meanwhile here
        return Runtime.get().load_program(str(path)).load_method("forward")

    try:  # the runtime logs CPU detection and thread pool lines to stderr on first use: not the user's business
        method, _ = capture_stderr(load)
    except RuntimeError as error:
        raise BadInputError(f"ExecuTorch's runtime could not load {path}: {str(error).splitlines()[0][:160]}; "
                            "convert again with this mdeploy") from None

    def run(batch: np.ndarray) -> list[np.ndarray]:
        outputs: list[list[np.ndarray]] = [[] for _ in names]
        for image in np.asarray(batch, dtype=np.float32):
            values = method.execute([torch.from_numpy(np.ascontiguousarray(image[None]))])
            for collected, value in zip(outputs, values, strict=True):
                collected.append(value.numpy().copy())
        return [np.concatenate(collected) for collected in outputs]

    return run, names


@cache
def _version(distribution: str) -> str:
    try:
        return distributions.version(distribution)
    except distributions.PackageNotFoundError:
        return "not installed"
