"""ExecuTorch probe (issue 17, before the `--to pte` target exists): mdeploy's own int8 decisions written as an
ExecuTorch program lowered to XNNPACK (``converters/pte_program.py``), on the real MobileNetV2 and the demo's
held-out crops.

    .venv/bin/python bench/pte_probe.py [--arch mobilenet_v2] [--calib 200] [--eval 64] [--runs 60]

Prints the delegates, the float/int8 conversions inside them and the ops left outside, file size, the int8
program's distance from mdeploy's int8 simulation in output steps, SNR and top-1 agreement against PyTorch next to
the simulation's, and fp32 vs int8 latency on ExecuTorch's runtime, interleaved, 1 thread. Architectures other than
V2 use random weights (the structure is what matters for delegation; their accuracy figures then mean nothing).
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
from mdeploy.calibration.dataset import SampleSet  # noqa: E402
from mdeploy.calibration.preprocess import Preprocess  # noqa: E402
from mdeploy.converters.pte_program import program_runner, write_program  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import Simulator  # noqa: E402
from mdeploy.zoo import Arch, ModelConfig, build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=Arch, default=Arch.mobilenet_v2, choices=list(Arch))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    assets = prepare_demo_assets(ROOT / ".cache" / "mdeploy-demo")
    model = build_model(ModelConfig(args.arch)).eval()
    if args.arch is Arch.mobilenet_v2:
        model.load_state_dict(torch.load(assets.weights, weights_only=True))
    preprocess = Preprocess.imagenet(224)
    calib = SampleSet.from_folder(assets.calib_dir, preprocess, limit=args.calib).to_array()
    evaluation = SampleSet.from_folder(assets.eval_dir, preprocess, limit=args.eval).to_array()
    graph = graph_from_torch(model, (1, 3, 224, 224))
    qgraph = quantize(graph, calib)
    reference = model(torch.from_numpy(evaluation)).detach().numpy()
    simulated = Simulator(qgraph)(evaluation)
    print(f"CPU: {cpu_line()}\n{args.arch.value}, {len(calib)} calibration / {len(evaluation)} held-out crops\n")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for precision, quantized in (("fp32", None), ("int8", qgraph)):
            path = Path(tmp) / f"{args.arch.value}.{precision}.pte"
            started = time.perf_counter()
            lowered = write_program(graph, quantized, path)
            seconds = time.perf_counter() - started
            run = runs[precision] = program_runner(path)
            got = np.concatenate([run(evaluation[i:i + 1])[0] for i in range(len(evaluation))])
            m = compare(reference, got)
            conversions = lowered.inside.get("XNNConvert", 0)
            line = (f"{precision}: {path.stat().st_size / 1e6:.1f} MB, lowered in {seconds:.0f} s, {lowered.delegates} "
                    f"XNNPACK delegate(s) ({conversions} float/int8 conversions inside), ops outside "
                    f"{lowered.outside}; SNR {m.snr_db:.1f} dB, top-1 {m.top1_agreement:.1%}")
            if precision == "int8":
                step = qgraph.activations[graph.outputs[0]].scale
                sim = compare(reference, simulated)
                line += (f" (mdeploy's simulation {sim.snr_db:.1f} dB, {sim.top1_agreement:.1%}; max distance from "
                         f"it {np.abs(got - simulated).max() / step:.1f} output steps)")
            print(line, flush=True)
        x = evaluation[:1]
        times: dict[str, list[float]] = {key: [] for key in runs}
        for run in runs.values():
            for _ in range(5):
                run(x)
        for _ in range(5):  # interleaved rounds
            for key, run in runs.items():
                for _ in range(-(-args.runs // 5)):
                    start = time.perf_counter()
                    run(x)
                    times[key].append((time.perf_counter() - start) * 1000)
        fp32, int8 = (float(np.median(times[k])) for k in ("fp32", "int8"))
        print(f"\nExecuTorch runtime, XNNPACK, 1 thread, median of {args.runs} runs interleaved: fp32 {fp32:.2f} ms, "
              f"int8 {int8:.2f} ms ({fp32 / int8:.2f}x)")


if __name__ == "__main__":
    main()
