"""The x86 side of the ARM comparison: the same artifact on the host's runtimes, and how many int8 output codes
differ between an emulated ARM run and the host run.

Int8 output codes are compared, not floats: one code step (1 LSB) is the natural unit of an integer kernel's
rounding (XNNPACK's own tests allow 1 LSB). TFLite int8 outputs are codes already; an ONNX QDQ model's output is
``(q - zero_point) * scale`` from its last DequantizeLinear, so its codes are recovered exactly from the floats.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class HostRun:
    """One artifact run on the host's own (x86) runtime: the reference for the ARM runs."""

    artifact: Path
    outputs: np.ndarray
    codes: np.ndarray | None
    seconds: float
    runtime: str
    cpu: str = "host (x86_64)"
    emulated: bool = False


class KernelRun(Protocol):
    artifact: Path
    cpu: str
    outputs: np.ndarray
    codes: np.ndarray | None


@dataclass(frozen=True)
class CodeDifference:
    """How an ARM run differs from the host run of the same artifact on the same inputs."""

    artifact: str
    cpu: str
    unit: str  # "int8 output codes" or "float outputs" (artifacts with float outputs)
    total: int
    differing: int
    max_lsb: int | None  # largest code difference (None for float outputs)
    max_abs: float  # largest difference of the dequantised outputs

    @property
    def identical(self) -> bool:
        return self.differing == 0

    def summary(self) -> str:
        if self.identical:
            return f"{self.cpu}: all {self.total} {self.unit} identical to x86"
        worst = f"max {self.max_lsb} LSB" if self.max_lsb is not None else f"max |diff| {self.max_abs:.3g}"
        return f"{self.cpu}: {self.differing} of {self.total} {self.unit} differ from x86 ({worst})"

    def to_dict(self) -> dict[str, Any]:
        return {"artifact": self.artifact, "cpu": self.cpu, "unit": self.unit, "total": self.total,
                "differing": self.differing, "max_lsb": self.max_lsb, "max_abs": self.max_abs,
                "identical": self.identical}


def codes_on_host(artifact: Path, inputs: np.ndarray, kernels: str = "xnnpack") -> HostRun:
    """Runs ``artifact`` on the host exactly as the guest runs it (one image at a time, one thread)."""
    artifact = Path(artifact)
    images = np.ascontiguousarray(inputs, dtype=np.float32)
    start = time.perf_counter()
    if artifact.suffix == ".tflite":
        outputs, codes, runtime = _tflite_on_host(artifact, images, kernels)
    else:
        from mdeploy.converters import REGISTRY, Target

        run = REGISTRY[Target.onnx].runner(artifact, threads=1)
        outputs = np.concatenate([run(image[None]) for image in images]).astype(np.float32)
        codes, runtime = recovered_codes(artifact, outputs), "onnxruntime (CPUExecutionProvider)"
    return HostRun(artifact, outputs, codes, time.perf_counter() - start, runtime)


def _tflite_on_host(path: Path, images: np.ndarray, kernels: str) -> tuple[np.ndarray, np.ndarray | None, str]:
    from mdeploy.converters.tflite import Kernels, load_interpreter, tensor_decoder, tensor_encoder  # its own I/O coding

    interpreter = load_interpreter(path, 1, Kernels(kernels))
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    encode, decode = tensor_encoder(input_detail), tensor_decoder(output_detail)
    raw = []
    for image in np.transpose(images, (0, 2, 3, 1)):
        interpreter.set_tensor(input_detail["index"], encode(image[None]))
        interpreter.invoke()
        raw.append(np.array(interpreter.get_tensor(output_detail["index"])))
    codes = np.concatenate(raw)
    outputs = decode(codes)
    if outputs.ndim == 4:
        outputs, codes = np.transpose(outputs, (0, 3, 1, 2)), np.transpose(codes, (0, 3, 1, 2))
    quantised = codes.dtype in (np.dtype(np.int8), np.dtype(np.uint8))
    return outputs, codes if quantised else None, f"ai-edge-litert ({kernels})"


def onnx_output_quantization(path: Path) -> tuple[float, int, np.dtype] | None:
    """(scale, zero point, code type) of the DequantizeLinear that produces an ONNX model's first output (through
    Identity nodes), or None for a float output."""
    if path.suffix != ".onnx":
        return None
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:  # codes cannot be recovered without the onnx package: compare the floats
        return None

    model = onnx.load(str(path), load_external_data=False)
    producers = {output: node for node in model.graph.node for output in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    node = producers.get(model.graph.output[0].name)
    while node is not None and node.op_type == "Identity":
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    scale, zero_point = constants.get(node.input[1]), constants.get(node.input[2])
    if scale is None or zero_point is None or scale.size != 1:
        return None
    return float(scale.reshape(())), int(zero_point.reshape(())), zero_point.dtype


def recovered_codes(path: Path, outputs: np.ndarray) -> np.ndarray | None:
    """An ONNX QDQ output's int8 codes, exactly: the float output is ``(q - zero_point) * scale``."""
    quantization = onnx_output_quantization(path)
    if quantization is None:
        return None
    scale, zero_point, dtype = quantization
    return (np.round(outputs.astype(np.float64) / scale) + zero_point).astype(dtype)


def compare_codes(arm: KernelRun, host: KernelRun) -> CodeDifference:
    """Counts the outputs of ``arm`` that differ from ``host`` (codes when both have them, floats otherwise)."""
    max_abs = float(np.abs(arm.outputs.astype(np.float64) - host.outputs).max()) if arm.outputs.size else 0.0
    if arm.codes is not None and host.codes is not None:
        steps = np.abs(arm.codes.astype(np.int32) - host.codes.astype(np.int32))
        return CodeDifference(Path(arm.artifact).name, arm.cpu, "int8 output codes", int(steps.size),
                              int(np.count_nonzero(steps)), int(steps.max()) if steps.size else 0, max_abs)
    differing = int(np.count_nonzero(arm.outputs != host.outputs))
    return CodeDifference(Path(arm.artifact).name, arm.cpu, "float outputs", int(arm.outputs.size), differing,
                          None, max_abs)
