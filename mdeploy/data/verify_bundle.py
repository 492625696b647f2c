#!/usr/bin/env python3
"""Checks an mdeploy bundle with nothing but NumPy and the runtimes (no mdeploy needed):

1. every file matches SHA256SUMS;
2. each ONNX (onnxruntime) and TFLite (ai-edge-litert or tflite-runtime) artifact reproduces its golden outputs
   from the golden inputs within the tolerance manifest.json gives. Core ML needs macOS: it is reported as skipped.

    python3 verify_bundle.py [BUNDLE_DIR]      exit 0: all good; 1: an output is off; 2: a file is corrupt
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np


def corrupt_files(root: Path) -> list[str]:
    bad = []
    for line in (root / "SHA256SUMS").read_text(encoding="utf-8").splitlines():
        digest, name = line.split("  ", 1)
        path = root / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            bad.append(name)
    return bad


def run_onnx(path: Path, inputs: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[None]})[0] for x in inputs])


def tflite_interpreter(path: Path):  # noqa: ANN201 - either runtime's Interpreter
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        from tflite_runtime.interpreter import Interpreter
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


def run_tflite(path: Path, inputs: np.ndarray) -> np.ndarray:
    interpreter = tflite_interpreter(path)
    (feed,), (fetch,) = interpreter.get_input_details(), interpreter.get_output_details()
    outputs = []
    for x in inputs:
        x = x.transpose(1, 2, 0)[None] if feed["shape"][-1] == 3 else x[None]  # the model's own layout
        if np.dtype(feed["dtype"]) != np.float32:
            scale, zero_point = feed["quantization"]
            info = np.iinfo(feed["dtype"])
            x = np.clip(np.round(x / scale) + zero_point, info.min, info.max)
        interpreter.set_tensor(feed["index"], x.astype(feed["dtype"]))
        interpreter.invoke()
        y = interpreter.get_tensor(fetch["index"])
        if np.dtype(fetch["dtype"]) != np.float32:
            scale, zero_point = fetch["quantization"]
            y = (y.astype(np.float32) - zero_point) * scale
        outputs.append(y.reshape(1, -1))
    return np.concatenate(outputs).astype(np.float32)


RUNNERS = {".onnx": run_onnx, ".tflite": run_tflite}


def within(expected: np.ndarray, actual: np.ndarray, tolerance: dict) -> tuple[bool, str]:
    if "max_abs_error" in tolerance:
        error = float(np.abs(expected - actual).max())
        return error <= tolerance["max_abs_error"], f"max |diff| {error:.3g} (tolerance {tolerance['max_abs_error']:.3g})"
    noise = float(np.sum((expected.astype(np.float64) - actual) ** 2))
    snr = float("inf") if noise == 0 else 10 * np.log10(np.sum(expected.astype(np.float64) ** 2) / noise)
    return snr >= tolerance["min_snr_db"], f"SNR {snr:.1f} dB (tolerance {tolerance['min_snr_db']} dB)"


def main(root: Path) -> int:
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    bad = corrupt_files(root)
    if bad:
        print(f"CORRUPT: {', '.join(bad)} do not match SHA256SUMS")
        return 2
    golden = manifest["golden"]
    inputs = np.load(root / golden["inputs"]["npy"])
    failed = False
    for file, record in golden["artifacts"].items():
        runner = RUNNERS.get(Path(file).suffix)
        if runner is None:
            print(f"skipped  {file}: runs on Apple platforms only")
            continue
        try:
            actual = runner(root / file, inputs)
        except ImportError as err:
            print(f"skipped  {file}: runtime not installed ({err.name})")
            continue
        ok, detail = within(np.load(root / record["npy"]), actual, record["tolerance"])
        failed |= not ok
        print(f"{'ok     ' if ok else 'MISMATCH'} {file}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent))
