"""Where int8 error comes from (issue 16): mdeploy's default recipe on a trained model, its fake-quant simulation
with only some tensors quantised, SNR against fp32 PyTorch on the held-out samples of ``bench/ptq_compare.py``.

    .venv/bin/python bench/error_budget.py [--models mobilenet_v2,efficientnet_lite0,ppocr_cls] [--calib 200]
        [--eval 320] [--top 10] [--per-tensor-samples 96]

Rows: everything quantised; weights only (activations float, biases as corrected for the rounded weights);
activations only (weights float); the input alone; everything but the input; then, per activation tensor, the SNR
with that one tensor left float, the largest gains first, on the first ``--per-tensor-samples`` held-out samples (one
simulation per tensor: on all 320 crops, MobileNetV2's 103 take 40 minutes on 2 cores): what int16 or float would
buy there (the simulation agrees with the runtimes to ~30 dB, ``tests/test_tflite.py``, so it ranks tensors, it
does not replace them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from ptq_compare import Case, selected_cases  # noqa: E402

from mdeploy.calibration.config import QuantRecipe  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.parity import run_batches, torch_runner  # noqa: E402
from mdeploy.quantize.params import QuantizedGraph, TensorQuant  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import Simulator  # noqa: E402


def budget(case: Case, top: int, per_tensor_samples: int) -> None:
    graph = graph_from_torch(case.model, (1, *case.calib.shape[1:]))
    started = time.perf_counter()
    q = quantize(graph, case.calib, QuantRecipe.default())
    seconds = time.perf_counter() - started
    reference = run_batches(torch_runner(case.model), case.eval)

    def row(label: str, activations: dict[str, TensorQuant], weighted: bool = True, samples: int = 0) -> float:
        partial = QuantizedGraph(q.graph, activations, q.weights if weighted else {}, q.float_nodes, q.recipe)
        samples = samples or len(case.eval)
        m = compare(reference[:samples], Simulator(partial)(case.eval[:samples]))
        if label:
            print(f"| {label} | {m.snr_db:.2f} | {m.top1_agreement:.1%} |", flush=True)
        return m.snr_db

    print(f"\n### {case.name}: {len(case.calib)} calibration / {len(case.eval)} held-out samples, "
          f"quantised in {seconds:.0f} s\n\n| quantised | SNR dB | top-1 agreement |\n|---|---|---|")
    acts = q.activations
    row("everything", acts)
    row("weights only", {})
    row("activations only", acts, weighted=False)
    row("the input only", {graph.input_name: acts[graph.input_name]}, weighted=False)
    row("everything but the input", {k: v for k, v in acts.items() if k != graph.input_name})
    samples = min(per_tensor_samples, len(case.eval))
    base = row("", acts, samples=samples)
    gains = sorted(((row("", {k: v for k, v in acts.items() if k != name}, samples=samples) - base, name)
                    for name in acts), reverse=True)
    print(f"\nOne tensor left float (of {len(acts)}), on the first {samples} held-out samples (everything "
          f"quantised: {base:.2f} dB there), the {top} largest gains:\n\n"
          "| tensor | producer | grid step | SNR gain dB |\n|---|---|---|---|")
    for gain, name in gains[:top]:
        producer = graph.producer(name)
        source = producer.source if producer is not None and producer.source else "the model input"
        print(f"| `{name}` | {source} | {acts[name].scale:.4g} | {gain:+.2f} |")
    print(f"\nSum of all {len(gains)} one-tensor gains: {sum(g for g, _ in gains):+.2f} dB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mobilenet_v2", type=lambda s: s.split(","))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=320)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--per-tensor-samples", type=int, default=96)
    args = parser.parse_args()
    for _, case in selected_cases(parser, args):
        budget(case, args.top, args.per_tensor_samples)


if __name__ == "__main__":
    main()
