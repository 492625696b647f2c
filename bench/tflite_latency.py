"""int8 vs fp32 latency on LiteRT + XNNPACK, in one process, for the TFLite artifacts mdeploy writes.

    .venv/bin/python bench/tflite_latency.py [--archs mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large]
        [--size 224] [--width 1.0] [--threads 1,2] [--runs 50] [--warmup 10] [--no-builtin-hardswish] [--probe]
        [--stock]

For each model: fp32, int8 as shipped (hardswish decomposed so XNNPACK takes the whole graph) and, for V3, int8
with TFLite's HARD_SWISH op (what every other converter emits) to show the partition problem. Times
``Interpreter.invoke()`` on a fixed input (what an app runs), median of ``--runs`` runs after ``--warmup`` runs;
variants are timed in interleaved rounds so that load from other processes hits them alike.

``--probe`` times minimal int8 models (one op, or one hardswish, between two int8 ADDs that XNNPACK takes) and shows
which int8 ops XNNPACK refuses: the evidence for the decomposition. ``--stock`` adds TensorFlow's TFLiteConverter
graphs of Keras's same architectures to the same interleaved run (``bench/stock_tflite.py``).
Weights are random (BatchNorm with real statistics); latency does not depend on the values.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.converters.base import ArtifactInfo  # noqa: E402
from mdeploy.converters.tflite import Kernels, TfliteConverter, load_interpreter  # noqa: E402
from mdeploy.converters.tflite_flatbuffer import ModelBuilder, Quant, fb  # noqa: E402
from mdeploy.converters.tflite_report import xnnpack_partitions  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.graph.ir import Graph, Op  # noqa: E402
from mdeploy.quantize.params import QuantizedGraph  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.zoo import Arch, ModelConfig, build_model  # noqa: E402

INFO = ArtifactInfo("bench", {}, (), "bench")


def minmax_int8(graph: Graph, calibration: np.ndarray) -> QuantizedGraph:
    """Plain min/max ranges and nearest rounding: latency does not depend on how the parameters were chosen."""
    return quantize(graph, calibration, QuantRecipe.stock_minmax())


def randomized(arch: Arch, width: float) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch, width, 1000, 0.2))
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model.eval()


class Timed:
    """One artifact loaded in LiteRT with a fixed input, timed by invoke()."""

    def __init__(self, path: Path, threads: int) -> None:
        self.interpreter = load_interpreter(path, threads, Kernels.xnnpack)
        detail = self.interpreter.get_input_details()[0]
        rng = np.random.default_rng(0)
        if np.dtype(detail["dtype"]) == np.float32:
            sample = rng.standard_normal(detail["shape"]).astype(np.float32)
        else:
            sample = rng.integers(-128, 128, detail["shape"]).astype(detail["dtype"])
        self.interpreter.set_tensor(detail["index"], sample)
        self.times: list[float] = []

    def run(self, n: int, record: bool = True) -> None:
        for _ in range(n):
            start = time.perf_counter()
            self.interpreter.invoke()
            if record:
                self.times.append((time.perf_counter() - start) * 1000.0)

    @property
    def median(self) -> float:
        return float(np.median(self.times))


def time_interleaved(paths: dict[str, Path], threads: int, runs: int, warmup: int, rounds: int = 5
                     ) -> dict[str, float]:
    timed = {key: Timed(path, threads) for key, path in paths.items()}
    for t in timed.values():
        t.run(warmup, record=False)
    per_round = -(-runs // rounds)
    for _ in range(rounds):
        for t in timed.values():
            t.run(per_round)
    return {key: t.median for key, t in timed.items()}


def bench_models(args: argparse.Namespace) -> list[dict[str, object]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            model = randomized(arch, args.width)
            graph = graph_from_torch(model, (1, 3, args.size, args.size))
            calibration = np.random.default_rng(1).standard_normal((4, 3, args.size, args.size)).astype(np.float32)
            quantized = minmax_int8(graph, calibration)
            paths = {"fp32": Path(tmp) / f"{arch.value}.fp32.tflite", "int8": Path(tmp) / f"{arch.value}.int8.tflite"}
            started = time.perf_counter()
            TfliteConverter().export(graph, None, paths["fp32"], INFO)
            TfliteConverter().export(graph, quantized, paths["int8"], INFO)
            export_s = time.perf_counter() - started
            has_hardswish = any(n.op is Op.HARDSWISH for n in graph.nodes)
            if has_hardswish and args.builtin_hardswish:
                paths["int8_hard_swish_op"] = Path(tmp) / f"{arch.value}.int8hs.tflite"
                TfliteConverter(hardswish="builtin").export(graph, quantized, paths["int8_hard_swish_op"], INFO)
            if args.stock:
                from stock_tflite import stock_paths

                paths |= stock_paths(arch, args.size, args.width, Path(tmp))
            partitions = {key: xnnpack_partitions(path.read_bytes())["partitions"] for key, path in paths.items()}
            for threads in args.threads:
                medians = time_interleaved(paths, threads, args.runs, args.warmup)
                row: dict[str, object] = {"model": f"{arch.value} x{args.width} @{args.size}", "threads": threads,
                                          "export_s": export_s, **{f"{k}_ms": v for k, v in medians.items()},
                                          **{f"{k}_partitions": v for k, v in partitions.items()}}
                row["speedup"] = medians["fp32"] / medians["int8"]
                if "stock_int8" in medians:
                    row["stock_speedup"] = medians["fp32"] / medians["stock_int8"]
                if "int8_hard_swish_op" in medians:
                    row["hard_swish_op_speedup"] = medians["fp32"] / medians["int8_hard_swish_op"]
                rows.append(row)
                print(format_row(row), flush=True)
    return rows


def header(stock: bool) -> str:
    columns = ["model", "threads", "fp32 ms", "int8 ms", "int8 speedup", "int8 partitions",
               "int8 with HARD_SWISH op ms (partitions, speedup)"]
    if stock:
        columns += ["TFLiteConverter fp32 ms", "TFLiteConverter int8 ms (partitions, speedup vs our fp32)"]
    return f"| {' | '.join(columns)} |\n|{'---|' * len(columns)}"


def format_row(row: dict[str, object]) -> str:
    hs = "-"
    if "int8_hard_swish_op_ms" in row:
        hs = (f"{row['int8_hard_swish_op_ms']:.2f} ({row['int8_hard_swish_op_partitions']}, "
              f"{row['hard_swish_op_speedup']:.2f}x)")
    stock = ""
    if "stock_int8_ms" in row:
        stock = (f" {row['stock_fp32_ms']:.2f} | {row['stock_int8_ms']:.2f} ({row['stock_int8_partitions']}, "
                 f"{row['stock_speedup']:.2f}x) |")
    return (f"| {row['model']} | {row['threads']} | {row['fp32_ms']:.2f} | {row['int8_ms']:.2f} | "
            f"{row['speedup']:.2f}x | {row['int8_partitions']} | {hs} |{stock}")


# -- one-op evidence -----------------------------------------------------------------------------------------------
def _probe_model(body: str, shape: tuple[int, ...] = (1, 56, 56, 96)) -> bytes:
    """int8 model x -> ADD(x, 0) -> <body> -> ADD(., 0): the ADDs are int8 ops XNNPACK takes, so the partition count
    shows whether the body splits the graph."""
    B, O, A = fb.BuiltinOperator, fb.BuiltinOptions, fb.ActivationFunctionType
    b = ModelBuilder()
    q, q_out = Quant.per_tensor(0.05, -3), Quant.per_tensor(0.04, -20)
    b.tensor("x", shape, np.int8, q)
    zero = b.constant("zero", np.array(0, np.int8), Quant.per_tensor(1.0, 0))
    three = b.constant("three", np.array(127, np.int8), Quant.per_tensor(3.0 / 127, 0))
    sixth = b.constant("sixth", np.array(127, np.int8), Quant.per_tensor(1.0 / 6 / 127, 0))

    def add(inputs: list[str], out: str, quant: Quant, act: int = A.NONE) -> None:
        options = fb.AddOptionsT()
        options.fusedActivationFunction = act
        b.tensor(out, shape, np.int8, quant)
        b.op(B.ADD, 2, inputs, [out], options, O.AddOptions)

    def mul(inputs: list[str], out: str, quant: Quant) -> None:
        b.tensor(out, shape, np.int8, quant)
        b.op(B.MUL, 2, inputs, [out], fb.MulOptionsT(), O.MulOptions)

    add(["x", zero], "a", q)
    if body in ("HARD_SWISH", "RELU", "RELU6", "LOGISTIC"):
        code = getattr(B, body)
        b.tensor("y", shape, np.int8, Quant.per_tensor(1 / 256, -128) if body == "LOGISTIC" else q_out)
        b.op(code, 1 if body == "HARD_SWISH" else 2, ["a"], ["y"])
    elif body == "hardswish as ADD(x,3;RELU6), MUL, MUL(1/6)":
        add(["a", three], "gate", Quant.per_tensor(6 / 255, -128), A.RELU6)
        mul(["a", "gate"], "product", Quant.per_tensor(6 * 0.04, -20))
        mul(["product", sixth], "y", q_out)
    elif body == "relu6 as ADD(x,0;RELU6)":
        add(["a", zero], "y", Quant.per_tensor(6 / 255, -128), A.RELU6)
    add(["y", zero], "z", q)
    b.inputs, b.outputs = ["x"], ["z"]
    return b.serialize("probe", {}, "probe")


PROBES = ("HARD_SWISH", "hardswish as ADD(x,3;RELU6), MUL, MUL(1/6)", "RELU", "RELU6", "relu6 as ADD(x,0;RELU6)",
          "LOGISTIC")


def probe(args: argparse.Namespace) -> None:
    print("| int8 body between two ADDs, 56x56x96 | XNNPACK partitions | ops outside XNNPACK | ms (1 thread) |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for body in PROBES:
            content = _probe_model(body)
            report = xnnpack_partitions(content)
            path = Path(tmp) / "probe.tflite"
            path.write_bytes(content)
            ms = time_interleaved({body: path}, 1, args.runs, args.warmup)[body]
            outside = ", ".join(op.split(" ")[0] for op in report["ops_outside"]) or "-"
            print(f"| {body} | {report['partitions']} | {outside} | {ms:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default="mobilenet_v2,mobilenet_v3_small,mobilenet_v3_large",
                        type=lambda s: [Arch(a) for a in s.split(",")])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--threads", default="1,2", type=lambda s: [int(t) for t in s.split(",")])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--no-builtin-hardswish", dest="builtin_hardswish", action="store_false")
    parser.add_argument("--probe", action="store_true", help="one-op evidence of what XNNPACK refuses in int8")
    parser.add_argument("--stock", action="store_true",
                        help="also time TFLiteConverter's fp32 and int8 graphs of Keras's same architectures")
    args = parser.parse_args()
    if args.runs < 30:
        parser.error("--runs must be >= 30")
    if args.probe:
        probe(args)
        return
    from families import cpu_line

    print(f"CPU: {cpu_line()}\n\n{header(args.stock)}", flush=True)
    bench_models(args)


if __name__ == "__main__":
    main()
