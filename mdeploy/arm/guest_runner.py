"""Runs INSIDE the arm64 guest, with the guest's own Python (numpy, onnxruntime and ai_edge_litert only: it must
never import mdeploy). ``python3 guest_runner.py WORK`` reads ``WORK/request.json``:

    {"inputs": "inputs.npy",                       # preprocessed (N, C, H, W) float32
     "artifacts": [{"key": "a0", "file": "a0.tflite", "format": "tflite"}, ...],
     "kernels": "xnnpack" | "builtin" | "reference",  # LiteRT only
     "threads": 1,
     "probe_paths": ["/some/path", ...]}           # optional: does the guest see these paths?

runs every artifact on one image at a time, and writes ``WORK/<key>.outputs.npy`` (float32, dequantised),
``WORK/<key>.codes.npy`` (the raw int8/uint8 output tensor of a quantised TFLite output) and ``WORK/result.json``.
Int8 inputs are encoded and outputs decoded by ``tflite_io.py``, the very ``converters/tflite_io.py`` mdeploy uses,
which ``mdeploy/arm/run.py`` copies beside this script.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def describe_guest() -> dict[str, Any]:
    """The machine as the runtimes see it: qemu answers /proc/cpuinfo with the -cpu model's description."""
    fields: dict[str, str] = {}
    try:
        first_processor = Path("/proc/cpuinfo").read_text(encoding="utf-8").split("\n\n")[0]
    except OSError:
        first_processor = ""
    for line in first_processor.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields[key.strip()] = value.strip()
    return {"machine": platform.machine(), "python": sys.version.split()[0],
            "cpu_implementer": fields.get("CPU implementer"), "cpu_part": fields.get("CPU part"),
            "features": fields.get("Features", "").split()}


def probe_paths(paths: list[str]) -> dict[str, bool]:
    """Whether each path can be read from inside the guest (the isolation test's host marker must not)."""
    seen = {}
    for path in paths:
        try:
            with open(path, "rb") as handle:
                handle.read(1)
            seen[path] = True
        except OSError:
            seen[path] = os.path.exists(path)
    return seen


def run_onnx(path: Path, images: np.ndarray, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    start = time.perf_counter()
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    loaded = time.perf_counter()
    outputs = [session.run(None, {input_name: np.ascontiguousarray(image[None], dtype=np.float32)})[0]
               for image in images]
    return {"runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)", "outputs": np.concatenate(outputs),
            "codes": None, "load_seconds": loaded - start, "run_seconds": time.perf_counter() - loaded,
            "xnnpack_delegate": None}


def load_interpreter(path: Path, kernels: str, threads: int, work: Path) -> tuple[Any, str]:
    """The interpreter and what LiteRT printed while loading it (it announces the XNNPACK delegate on stderr)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = {"xnnpack": OpResolverType.AUTO, "builtin": OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
                "reference": OpResolverType.BUILTIN_REF}[kernels]
    log = work / f"{path.stem}.load.log"
    saved = os.dup(2)
    with open(log, "w+b") as capture:
        os.dup2(capture.fileno(), 2)
        try:
            interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                      experimental_op_resolver_type=resolver)
            interpreter.allocate_tensors()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    text = log.read_text(encoding="utf-8", errors="replace")
    log.unlink()
    sys.stderr.write(text)
    return interpreter, text


ANNOUNCED: list[bool] = []  # LiteRT announces the XNNPACK delegate once per process, not once per model


def xnnpack_announced(load_log: str) -> bool:
    if "XNNPACK delegate" in load_log:
        ANNOUNCED.append(True)
    return bool(ANNOUNCED)


def run_tflite(path: Path, images: np.ndarray, kernels: str, threads: int, work: Path) -> dict[str, Any]:
    from ai_edge_litert import __version__ as litert_version
    from tflite_io import tensor_decoder, tensor_encoder  # beside this script in the guest's work folder

    start = time.perf_counter()
    interpreter, load_log = load_interpreter(path, kernels, threads, work)
    (input_detail,) = interpreter.get_input_details()
    (output_detail,) = interpreter.get_output_details()
    encode, decode = tensor_encoder(input_detail), tensor_decoder(output_detail)
    loaded = time.perf_counter()
    nhwc = np.transpose(images, (0, 2, 3, 1)) if images.ndim == 4 else images
    raw = []
    for image in nhwc:
        interpreter.set_tensor(input_detail["index"], encode(image[None]))
        interpreter.invoke()
        raw.append(np.array(interpreter.get_tensor(output_detail["index"])))
    run_seconds = time.perf_counter() - loaded
    codes = np.concatenate(raw)
    outputs = decode(codes)
    if outputs.ndim == 4:
        outputs, codes = np.transpose(outputs, (0, 3, 1, 2)), np.transpose(codes, (0, 3, 1, 2))
    quantised = np.dtype(output_detail["dtype"]) in (np.dtype(np.int8), np.dtype(np.uint8))
    return {"runtime": f"ai-edge-litert {litert_version} ({kernels})", "outputs": outputs,
            "codes": codes if quantised else None, "load_seconds": loaded - start, "run_seconds": run_seconds,
            "xnnpack_delegate": xnnpack_announced(load_log) if kernels == "xnnpack" else None,
            "output_quantization": list(output_detail["quantization"]) if quantised else None}


def run_artifact(work: Path, entry: dict[str, Any], images: np.ndarray, request: dict[str, Any]) -> dict[str, Any]:
    path = work / entry["file"]
    threads = int(request.get("threads", 1))
    if entry["format"] == "onnx":
        found = run_onnx(path, images, threads)
    else:
        found = run_tflite(path, images, request.get("kernels", "xnnpack"), threads, work)
    np.save(work / f"{entry['key']}.outputs.npy", np.asarray(found.pop("outputs"), dtype=np.float32))
    codes = found.pop("codes")
    if codes is not None:
        np.save(work / f"{entry['key']}.codes.npy", codes)
    found["has_codes"] = codes is not None
    return found


def main(argv: list[str]) -> int:
    work = Path(argv[1])
    request = json.loads((work / "request.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {"guest": describe_guest(), "probes": probe_paths(request.get("probe_paths", [])),
                              "artifacts": {}}
    if request.get("artifacts"):
        images = np.load(work / request["inputs"])
        for entry in request["artifacts"]:
            result["artifacts"][entry["key"]] = run_artifact(work, entry, images, request)
    (work / "result.json").write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
