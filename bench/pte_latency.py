"""ExecuTorch beside TFLite (issue 17): the same graphs and the same int8 parameters written as `.pte` (XNNPACK
delegate) and `.tflite` (LiteRT with XNNPACK), fp32 and int8, timed in one interleaved run on one thread.

    .venv/bin/python bench/pte_latency.py [--archs mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large] [--size 224]
        [--runs 100] [--warmup 10]

Random weights (latency does not depend on them), min/max int8 parameters. Per program it also prints what XNNPACK
took: delegates, float <-> int8 conversions inside (2 = only at the input and output) and ops left outside.
ExecuTorch is timed through its Python bindings (``Method.execute``: the input tensor is passed by reference, a few
microseconds per call), LiteRT through ``Interpreter.invoke`` on a tensor already set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from families import cpu_line  # noqa: E402
from tflite_latency import INFO, Timed, minmax_int8, randomized  # noqa: E402

from mdeploy.converters.pte_program import quiet_imports, write_program  # noqa: E402
from mdeploy.converters.tflite import TfliteConverter  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.zoo import Arch  # noqa: E402


class TimedProgram:
    """One ExecuTorch program loaded with a fixed input, timed by ``execute``."""

    def __init__(self, path: Path, shape: tuple[int, ...]) -> None:
        with quiet_imports():
            from executorch.runtime import Runtime

        self.method = Runtime.get().load_program(str(path)).load_method("forward")
        self.inputs = [torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype(np.float32))]
        self.times: list[float] = []

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            start = time.perf_counter()
            self.method.execute(self.inputs)
            if record:
                self.times.append((time.perf_counter() - start) * 1000.0)

    @property
    def median(self) -> float:
        return float(np.median(self.times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large",
                        type=lambda s: [Arch(a) for a in s.split(",")])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with quiet_imports():
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    _unsafe_reset_threadpool(1)
    print(f"CPU: {cpu_line()}\n1 thread, median of {args.runs} runs per artifact, interleaved in 5 rounds\n")
    print("| model | ExecuTorch fp32 ms | ExecuTorch int8 ms | int8 speed-up | TFLite fp32 ms | TFLite int8 ms | "
          "int8 speed-up | int8 program: delegates, conversions inside, ops outside |\n|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            graph = graph_from_torch(randomized(arch, 1.0), (1, 3, args.size, args.size))
            calibration = np.random.default_rng(1).standard_normal((4, 3, args.size, args.size)).astype(np.float32)
            quantized = minmax_int8(graph, calibration)
            timed: dict[str, Timed | TimedProgram] = {}
            lowered = None
            for precision, q in (("fp32", None), ("int8", quantized)):
                pte = Path(tmp) / f"{arch.value}.{precision}.pte"
                lowered = write_program(graph, q, pte)
                tflite = Path(tmp) / f"{arch.value}.{precision}.tflite"
                TfliteConverter().export(graph, q, tflite, INFO)
                timed[f"pte {precision}"] = TimedProgram(pte, tuple(graph.input_shape))
                timed[f"tflite {precision}"] = Timed(tflite, 1)
            for t in timed.values():
                t.run(args.warmup, record=False)
            for _ in range(5):
                for t in timed.values():
                    t.run(-(-args.runs // 5))
            ms = {key: t.median for key, t in timed.items()}
            assert lowered is not None
            took = (f"{lowered.delegates}, {lowered.inside.get('XNNConvert', 0)}, "
                    f"{', '.join(f'{k} {v}' for k, v in lowered.outside.items()) or 'none'}")
            print(f"| {arch.value} {args.size} px | {ms['pte fp32']:.2f} | {ms['pte int8']:.2f} | "
                  f"{ms['pte fp32'] / ms['pte int8']:.2f}x | {ms['tflite fp32']:.2f} | {ms['tflite int8']:.2f} | "
                  f"{ms['tflite fp32'] / ms['tflite int8']:.2f}x | {took} |", flush=True)


if __name__ == "__main__":
    main()
