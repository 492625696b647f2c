"""ExecuTorch beside TFLite (issue 17): the same graphs and the same int8 parameters written as `.pte` (XNNPACK
delegate) and `.tflite` (LiteRT with XNNPACK), fp32 and int8, timed in one interleaved run on one thread.

    .venv/bin/python bench/pte_latency.py [--archs mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large] [--size 224]
        [--runs 100] [--warmup 10]

Random weights (latency does not depend on them), min/max int8 parameters. Per program it also prints what XNNPACK
took: delegates, float <-> int8 conversions inside (2 = only at the input and output) and ops left outside. The same
run times ExecuTorch's own int8 flow on the same model (PT2E with its ``XNNPACKQuantizer``, symmetric per-channel,
lowered the same way): the best int8 program another tool makes of it, so that a CPU on which no int8 program beats
fp32 shows as such.
ExecuTorch is timed through its Python bindings (``Method.execute``: the input tensor is passed by reference, a few
microseconds per call), LiteRT through ``Interpreter.invoke`` on a tensor already set.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from families import cpu_line  # noqa: E402
from tflite_latency import INFO, Timed, minmax_int8, randomized  # noqa: E402

from mdeploy.converters.pte_program import (  # noqa: E402
    Lowered,
    lowered,
    quiet_imports,
    write_program,
    xnnpack_node_kinds,
)
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


def stock_int8_program(model: torch.nn.Module, calibration: np.ndarray, path: Path) -> Lowered:
    """ExecuTorch's documented int8 flow: PT2E with ``XNNPACKQuantizer`` (symmetric, per-channel), calibrated on
    ``calibration``, lowered to XNNPACK."""
    with quiet_imports():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer,
            get_symmetric_quantization_config,
        )
        from executorch.exir import to_edge_transform_and_lower
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    example = (torch.from_numpy(calibration[:1]),)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings(), xnnpack_node_kinds() as inside:
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices (pytree LeafSpec)
        prepared = prepare_pt2e(torch.export.export(model.eval(), example).module(), quantizer)
        for sample in calibration:
            prepared(torch.from_numpy(sample[None]))
        edge = to_edge_transform_and_lower(torch.export.export(convert_pt2e(prepared), example),
                                           partitioner=[XnnpackPartitioner()])
    path.write_bytes(edge.to_executorch().buffer)
    return lowered(edge, inside)


def took(program: Lowered) -> str:
    return (f"{program.delegates}, {program.inside.get('XNNConvert', 0)}, "
            f"{', '.join(f'{k} {v}' for k, v in program.outside.items()) or 'none'}")


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
          "int8 speed-up | int8 program: delegates, conversions inside, ops outside | "
          "ExecuTorch PT2E int8 ms (delegates, conversions inside, ops outside) |\n|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            model = randomized(arch, 1.0)
            graph = graph_from_torch(model, (1, 3, args.size, args.size))
            calibration = np.random.default_rng(1).standard_normal((4, 3, args.size, args.size)).astype(np.float32)
            quantized = minmax_int8(graph, calibration)
            timed: dict[str, Timed | TimedProgram] = {}
            ours = None
            for precision, q in (("fp32", None), ("int8", quantized)):
                pte = Path(tmp) / f"{arch.value}.{precision}.pte"
                ours = write_program(graph, q, pte)
                tflite = Path(tmp) / f"{arch.value}.{precision}.tflite"
                TfliteConverter().export(graph, q, tflite, INFO)
                timed[f"pte {precision}"] = TimedProgram(pte, tuple(graph.input_shape))
                timed[f"tflite {precision}"] = Timed(tflite, 1)
            stock_path = Path(tmp) / f"{arch.value}.pt2e.pte"
            stock = stock_int8_program(model, calibration, stock_path)
            timed["pte pt2e"] = TimedProgram(stock_path, tuple(graph.input_shape))
            for t in timed.values():
                t.run(args.warmup, record=False)
            for _ in range(5):
                for t in timed.values():
                    t.run(-(-args.runs // 5))
            ms = {key: t.median for key, t in timed.items()}
            assert ours is not None
            print(f"| {arch.value} {args.size} px | {ms['pte fp32']:.2f} | {ms['pte int8']:.2f} | "
                  f"{ms['pte fp32'] / ms['pte int8']:.2f}x | {ms['tflite fp32']:.2f} | {ms['tflite int8']:.2f} | "
                  f"{ms['tflite fp32'] / ms['tflite int8']:.2f}x | {took(ours)} | "
                  f"{ms['pte pt2e']:.2f} ({took(stock)}) |", flush=True)


if __name__ == "__main__":
    main()
