"""ExecuTorch probe (issue 17, before the `--to pte` target exists): mdeploy's own int8 decisions written as an
ExecuTorch program and lowered to XNNPACK, on the real MobileNetV2 and the demo's held-out crops.

    .venv/bin/pip install executorch==1.5.1     # ~700 MB; keeps torch 2.13.0 (pip check stays clean)
    .venv/bin/python bench/pte_probe.py [--arch mobilenet_v2] [--calib 200] [--eval 64] [--runs 60]

The IR graph runs as a torch module through ``mdeploy.graph.execute.OPS`` (the reference every converter is checked
against): fp32 as is; int8 with a ``quantized_decomposed`` quantize after every grid and a dequantize in front of
each reader (a shared one makes XNNPACK's partitioner refuse: "dependency cycles"), int8 weight codes with their
per-channel scales and the int32 bias as the integer model applies it (no fp32 weights left in the program). A
fused ReLU6 is written as ``hardtanh(0, 6)``: XNNPACK's convolution pattern takes that as its fused activation, not
``clamp``. Prints the delegates and ops left outside, file size, the int8 program's distance from mdeploy's int8
simulation in output steps, SNR and top-1 agreement against PyTorch next to the simulation's, and fp32 vs int8
latency on ExecuTorch's runtime, interleaved, 1 thread. Architectures other than V2 use random weights (the
structure is what matters for delegation; their accuracy rows then mean nothing).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import mdeploy.graph.execute as execute  # noqa: E402
from families import cpu_line  # noqa: E402
from mdeploy.calibration.dataset import SampleSet  # noqa: E402
from mdeploy.calibration.preprocess import Preprocess  # noqa: E402
from mdeploy.demo_assets import prepare_demo_assets  # noqa: E402
from mdeploy.graph.execute import OPS, node_params  # noqa: E402
from mdeploy.graph.from_torch import graph_from_torch  # noqa: E402
from mdeploy.graph.ir import WEIGHTED_OPS, Activation, Graph  # noqa: E402
from mdeploy.metrics import compare  # noqa: E402
from mdeploy.quantize.params import QMAX, QMIN, QuantizedGraph, quantize_bias  # noqa: E402
from mdeploy.quantize.ptq import quantize  # noqa: E402
from mdeploy.quantize.simulate import Simulator  # noqa: E402
from mdeploy.zoo import Arch, ModelConfig, build_model  # noqa: E402

_activate = execute.activate


def _xnnpack_activate(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    return F.hardtanh(x, 0.0, 6.0) if activation is Activation.RELU6 else _activate(x, activation)


class FloatProgram(torch.nn.Module):
    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.params: dict[str, dict[str, str]] = {}
        for i, node in enumerate(graph.nodes):
            self.params[node.name] = {}
            for key, value in node_params(node).items():
                self.register_buffer(f"n{i}_{key}", value.clone())
                self.params[node.name][key] = f"n{i}_{key}"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {self.graph.input_name: x}
        for node in self.graph.nodes:
            params = {key: getattr(self, name) for key, name in self.params[node.name].items()}
            values[node.output] = OPS[node.op](node, [values[name] for name in node.inputs], params)
        return tuple(values[name] for name in self.graph.outputs)


class Int8Program(FloatProgram):
    """Every grid of ``qgraph`` as quantize/dequantize pairs, weights as int8 codes (full int8 models only)."""

    def __init__(self, qgraph: QuantizedGraph) -> None:
        super().__init__(qgraph.graph)
        self.qgraph = qgraph
        for i, node in enumerate(qgraph.graph.nodes):
            if node.name not in qgraph.weights:
                continue
            wq = qgraph.weights[node.name]
            s_in = np.float64(qgraph.activations[node.inputs[0]].scale)
            bias = quantize_bias(node.bias, float(s_in), wq.scale) * (s_in * wq.scale.astype(np.float64))
            for key in ("weight", "bias"):
                delattr(self, f"n{i}_{key}")
            self.register_buffer(f"n{i}_codes", torch.from_numpy(wq.values.astype(np.int8)))
            self.register_buffer(f"n{i}_scales", torch.from_numpy(wq.scale.astype(np.float32)))
            self.register_buffer(f"n{i}_zeros", torch.zeros(len(wq.scale), dtype=torch.int64))
            self.register_buffer(f"n{i}_bias", torch.from_numpy(bias.astype(np.float32)))
            self.params[node.name] = {"codes": f"n{i}_codes", "scales": f"n{i}_scales", "zeros": f"n{i}_zeros",
                                      "bias": f"n{i}_bias"}

    def _quantize(self, x: torch.Tensor, name: str) -> torch.Tensor:
        tq = self.qgraph.activations[name]
        return torch.ops.quantized_decomposed.quantize_per_tensor(x, float(tq.scale), int(tq.zero_point), QMIN, QMAX,
                                                                  torch.int8)

    def _dequantize(self, q: torch.Tensor, name: str) -> torch.Tensor:  # one per reader
        tq = self.qgraph.activations[name]
        return torch.ops.quantized_decomposed.dequantize_per_tensor(q, float(tq.scale), int(tq.zero_point), QMIN,
                                                                    QMAX, torch.int8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        graph = self.graph
        codes = {graph.input_name: self._quantize(x, graph.input_name)}
        for node in graph.nodes:
            inputs = [self._dequantize(codes[name], name) for name in node.inputs]
            params = {key: getattr(self, name) for key, name in self.params[node.name].items()}
            if node.op in WEIGHTED_OPS and "codes" in params:
                weight = torch.ops.quantized_decomposed.dequantize_per_channel(
                    params["codes"], params["scales"], params["zeros"], 0, QMIN, QMAX, torch.int8)
                params = {"weight": weight, "bias": params["bias"]}
            codes[node.output] = self._quantize(OPS[node.op](node, inputs, params), node.output)
        return tuple(self._dequantize(codes[name], name) for name in graph.outputs)


def lower(module: torch.nn.Module, example: torch.Tensor, path: Path) -> Counter:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    edge = to_edge_transform_and_lower(torch.export.export(module, (example,)), partitioner=[XnnpackPartitioner()])
    nodes = [n for n in edge.exported_program().graph_module.graph.nodes if n.op == "call_function"]
    path.write_bytes(edge.to_executorch().buffer)
    return Counter(getattr(n.target, "__name__", str(n.target)) for n in nodes if "getitem" not in str(n.target))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=Arch, default=Arch.mobilenet_v2, choices=list(Arch))
    parser.add_argument("--calib", type=int, default=200)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    import torchao.quantization.pt2e  # noqa: F401  (registers torch.ops.quantized_decomposed)
    from executorch.runtime import Runtime

    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    execute.activate = _xnnpack_activate
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
    runtime = Runtime.get()
    with tempfile.TemporaryDirectory() as tmp:
        methods = {}
        for precision, module in (("fp32", FloatProgram(graph)), ("int8", Int8Program(qgraph))):
            path = Path(tmp) / f"{args.arch.value}.{precision}.pte"
            started = time.perf_counter()
            ops = lower(module.eval(), torch.from_numpy(evaluation[:1]), path)
            seconds = time.perf_counter() - started
            method = runtime.load_program(str(path)).load_method("forward")
            methods[precision] = method
            got = np.concatenate([method.execute([torch.from_numpy(evaluation[i:i + 1])])[0].numpy()
                                  for i in range(len(evaluation))])
            m = compare(reference, got)
            line = (f"{precision}: {path.stat().st_size / 1e6:.1f} MB, lowered in {seconds:.0f} s, ops outside "
                    f"the delegates {dict(ops)}; SNR {m.snr_db:.1f} dB, top-1 {m.top1_agreement:.1%}")
            if precision == "int8":
                step = qgraph.activations[graph.outputs[0]].scale
                sim = compare(reference, simulated)
                line += (f" (mdeploy's simulation {sim.snr_db:.1f} dB, {sim.top1_agreement:.1%}; max distance from "
                         f"it {np.abs(got - simulated).max() / step:.1f} output steps)")
            print(line, flush=True)
        x = torch.from_numpy(evaluation[:1])
        times: dict[str, list[float]] = {key: [] for key in methods}
        for key, method in methods.items():
            for _ in range(5):
                method.execute([x])
        for _ in range(5):  # interleaved rounds
            for key, method in methods.items():
                for _ in range(-(-args.runs // 5)):
                    start = time.perf_counter()
                    method.execute([x])
                    times[key].append((time.perf_counter() - start) * 1000)
        fp32, int8 = (float(np.median(times[k])) for k in ("fp32", "int8"))
        print(f"\nExecuTorch runtime, XNNPACK, 1 thread, median of {args.runs} runs interleaved: fp32 {fp32:.2f} ms, "
              f"int8 {int8:.2f} ms ({fp32 / int8:.2f}x)")


if __name__ == "__main__":
    main()
