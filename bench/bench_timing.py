"""Does `mdeploy bench` measure what the runtime costs? Its p50 beside the same runtime calls timed directly.

    .venv/bin/python bench/bench_timing.py [--runs 40] [--repeats 3]

Converts the real MobileNetV2 (demo assets) to fp32 and int8 ONNX and TFLite once, then for each repeat times every
artifact directly (ORT ``session.run``; LiteRT ``set_tensor``+``invoke``+``get_tensor``, 1 thread), runs
``mdeploy bench --threads 1``, and times directly again, so that drift in machine load shows. A timing, not a test:
the ratio depends on how busy the machine is, so it lives here and in bench/RESULTS.md, never in an assertion.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdeploy.demo_assets import default_cache_dir, prepare_demo_assets  # noqa: E402

ARTIFACTS = ("mobilenet_v2.fp32.onnx", "mobilenet_v2.int8.onnx", "mobilenet_v2.fp32.tflite", "mobilenet_v2.int8.tflite")
INT8_FLAGS = ("avx2", "avx_vnni", "avx512_vnni", "avx512_bf16", "amx_int8")


def cpu() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.+)", text)
    flags = set(re.search(r"flags\s*:\s*(.+)", text).group(1).split()) if "flags" in text else set()
    return f"{model.group(1) if model else platform.processor()} ({', '.join(f for f in INT8_FLAGS if f in flags)})"


def direct_p50(path: Path, x: np.ndarray, runs: int) -> float:
    """Median ms of the runtime's own call on one input, 1 thread."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def call() -> None:
            session.run(None, {name: x})
    else:
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        (detail,), (out,) = interpreter.get_input_details(), interpreter.get_output_details()
        feed = x.transpose(0, 2, 3, 1)
        if detail["dtype"] != np.float32:
            scale, zero_point = detail["quantization"]
            feed = np.clip(np.round(feed / scale) + zero_point, -128, 127).astype(detail["dtype"])

        def call() -> None:
            interpreter.set_tensor(detail["index"], feed)
            interpreter.invoke()
            interpreter.get_tensor(out["index"])
    for _ in range(10):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    assets = prepare_demo_assets(default_cache_dir())
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "v2"
        subprocess.run([sys.executable, "-m", "mdeploy.cli", "convert", str(assets.weights), "--arch", "mobilenet_v2",
                        "--to", "onnx,tflite", "--int8", "--calib", str(assets.calib_dir), "--out", str(folder),
                        "--json"], check=True, capture_output=True)
        print(f"CPU: {cpu()}; 1 thread, {args.runs} runs; ms\n")
        print("| artifact | repeat | direct before | mdeploy bench p50 | direct after | bench / mean direct |")
        print("|---|---|---|---|---|---|")
        for repeat in range(args.repeats):
            before = {name: direct_p50(folder / name, x, args.runs) for name in ARTIFACTS}
            done = subprocess.run([sys.executable, "-m", "mdeploy.cli", "bench", str(folder), "--threads", "1",
                                   "--runs", str(args.runs), "--json"], check=True, capture_output=True, text=True)
            after = {name: direct_p50(folder / name, x, args.runs) for name in ARTIFACTS}
            rows = {row["file"]: row for row in json.loads(done.stdout)["rows"]}
            for name in ARTIFACTS:
                direct = (before[name] + after[name]) / 2
                p50 = rows[name]["p50_ms"]
                print(f"| {name} | {repeat + 1} | {before[name]:.2f} | {p50:.2f} | {after[name]:.2f} | "
                      f"{p50 / direct:.2f} |")


if __name__ == "__main__":
    main()
