"""IR graphs as ExecuTorch programs lowered to XNNPACK: the writer of the coming `.pte` target (issue 17).

The graph runs as a torch module through ``graph/execute.py``'s ops, the reference every converter is checked
against, and is exported with ``torch.export`` and lowered with ExecuTorch's ``XnnpackPartitioner``:

- fp32: the graph as it is;
- int8: a ``quantized_decomposed`` quantize after every grid the quantiser chose and a dequantize in front of each
  reader (one dequantize shared by two readers makes the partitioner refuse: "dependency cycles"), the int8 weight
  codes with their per-channel scales, and each bias as the integer model applies it (its int32 code times the
  input and weight scales). No fp32 weight is left in the program.

XNNPACK's convolution and linear patterns take ``hardtanh(0, 6)`` as their fused activation, not ``clamp``: a fused
ReLU6 is written that way (the same function), else every int8 convolution falls out of the delegate. Hard-swish and
hard-sigmoid are written as ``x * hardtanh(x + 3, 0, 6) * (1/6)``: ExecuTorch's own decomposition of
``F.hardswish`` leaves a dtype copy of each of its scalar constants outside the delegate (18 on MobileNetV3-Small).
In int8 the inner tensors of that form have no grid yet (issue 17: int8 forms XNNPACK keeps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mdeploy.graph.execute import OPS, node_params
from mdeploy.graph.ir import Activation, Graph, Node, Op
from mdeploy.quantize.params import QMAX, QMIN, QuantizedGraph
from mdeploy.quantize.simulate import quantized_params

FUSED_RELU6_OPS = (Op.CONV, Op.LINEAR)


def run_node(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``node`` as ``graph/execute.py`` computes it, with a fused ReLU6 as ``hardtanh`` and hard-swish and
    hard-sigmoid spelled out (see the module's doc)."""
    if node.op in FUSED_RELU6_OPS and node.activation is Activation.RELU6:
        linear = OPS[node.op](dataclasses.replace(node, activation=Activation.NONE), inputs, params)
        return F.hardtanh(linear, 0.0, 6.0)
    if node.op is Op.HARDSIGMOID:
        return F.hardtanh(inputs[0] + 3.0, 0.0, 6.0) * (1.0 / 6.0)
    if node.op is Op.HARDSWISH:
        return inputs[0] * (F.hardtanh(inputs[0] + 3.0, 0.0, 6.0) * (1.0 / 6.0))
    return OPS[node.op](node, inputs, params)


class FloatProgram(torch.nn.Module):
    """The graph in fp32, its parameters as buffers."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.buffer_names: dict[str, dict[str, str]] = {}
        for i, node in enumerate(graph.nodes):
            self.buffer_names[node.name] = {}
            for key, value in node_params(node).items():
                self._add(node, f"n{i}_{key}", key, value.clone())

    def _add(self, node: Node, buffer: str, key: str, value: torch.Tensor) -> None:
        self.register_buffer(buffer, value)
        self.buffer_names[node.name][key] = buffer

    def params(self, node: Node) -> dict[str, torch.Tensor]:
        return {key: getattr(self, buffer) for key, buffer in self.buffer_names[node.name].items()}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = {self.graph.input_name: x}
        for node in self.graph.nodes:
            values[node.output] = run_node(node, [values[name] for name in node.inputs], self.params(node))
        return tuple(values[name] for name in self.graph.outputs)


class Int8Program(FloatProgram):
    """Every grid of a full-int8 ``qgraph`` as a quantize/dequantize pair, its weights as int8 codes."""

    def __init__(self, qgraph: QuantizedGraph) -> None:
        if qgraph.float_nodes:
            raise NotImplementedError("mixed precision (layers kept in float) is not written to ExecuTorch yet")
        super().__init__(qgraph.graph)
        self.qgraph = qgraph
        applied = quantized_params(qgraph)  # each bias as the integer model applies it
        for i, node in enumerate(qgraph.graph.nodes):
            wq = qgraph.weights.get(node.name)
            if wq is None:
                continue
            for buffer in self.buffer_names[node.name].values():
                delattr(self, buffer)
            self.buffer_names[node.name] = {}
            self._add(node, f"n{i}_codes", "codes", torch.from_numpy(wq.values.astype(np.int8)))
            self._add(node, f"n{i}_scales", "scales", torch.from_numpy(wq.scale.astype(np.float32)))
            self._add(node, f"n{i}_zero_points", "zero_points", torch.zeros(len(wq.scale), dtype=torch.int64))
            self._add(node, f"n{i}_bias", "bias", applied[node.name]["bias"])

    def _quantize(self, x: torch.Tensor, tensor: str) -> torch.Tensor:
        grid = self.qgraph.activations[tensor]
        return torch.ops.quantized_decomposed.quantize_per_tensor(
            x, float(grid.scale), int(grid.zero_point), QMIN, QMAX, torch.int8)

    def _dequantize(self, codes: torch.Tensor, tensor: str) -> torch.Tensor:
        grid = self.qgraph.activations[tensor]
        return torch.ops.quantized_decomposed.dequantize_per_tensor(
            codes, float(grid.scale), int(grid.zero_point), QMIN, QMAX, torch.int8)

    def params(self, node: Node) -> dict[str, torch.Tensor]:
        params = super().params(node)
        if "codes" not in params:
            return params
        weight = torch.ops.quantized_decomposed.dequantize_per_channel(
            params["codes"], params["scales"], params["zero_points"], 0, QMIN, QMAX, torch.int8)
        return {"weight": weight, "bias": params["bias"]}

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        graph = self.graph
        codes = {graph.input_name: self._quantize(x, graph.input_name)}
        for node in graph.nodes:
            inputs = [self._dequantize(codes[name], name) for name in node.inputs]  # one dequantize per reader
            codes[node.output] = self._quantize(run_node(node, inputs, self.params(node)), node.output)
        return tuple(self._dequantize(codes[name], name) for name in graph.outputs)


@dataclasses.dataclass(frozen=True)
class Lowered:
    """What lowering made: the XNNPACK delegates, the XNNPACK nodes inside them by kind (``XNNConvert``: a float <->
    int8 conversion), and every other op the program runs, by name."""

    delegates: int
    inside: dict[str, int]
    outside: dict[str, int]


@contextlib.contextmanager
def xnnpack_node_kinds() -> Iterator[Counter[str]]:
    """Counts the nodes of every XNNPACK graph serialised meanwhile, by kind. ExecuTorch keeps no readable copy of
    a delegate's graph, so the serialiser its XNNPACK backend calls is wrapped for the duration."""
    with quiet_imports():
        from executorch.backends.xnnpack import xnnpack_preprocess

    kinds: Counter[str] = Counter()
    serialize = xnnpack_preprocess.serialize_xnnpack_binary

    def counting(graph: Any, *args: Any, **kwargs: Any) -> Any:
        kinds.update(type(node.xnode_union).__name__ for node in graph.xnodes)
        return serialize(graph, *args, **kwargs)

    xnnpack_preprocess.serialize_xnnpack_binary = counting
    try:
        yield kinds
    finally:
        xnnpack_preprocess.serialize_xnnpack_binary = serialize


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """ExecuTorch and torchao log warnings when imported (native libraries for other GPUs, a deprecated torch
    API), which are not the user's business: logging is off meanwhile."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def write_program(graph: Graph, quantized: QuantizedGraph | None, path: Path) -> Lowered:
    """``graph`` (fp32) or ``quantized`` (int8) as an XNNPACK-lowered ExecuTorch program at ``path``."""
    with quiet_imports():
        import torchao.quantization.pt2e  # noqa: F401  (registers torch.ops.quantized_decomposed)
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower

    module = (FloatProgram(graph) if quantized is None else Int8Program(quantized)).eval()
    example = torch.zeros(tuple(graph.input_shape), dtype=torch.float32)
    with warnings.catch_warnings(), xnnpack_node_kinds() as inside:
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices (pytree LeafSpec)
        exported = torch.export.export(module, (example,))
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
    calls = [n for n in edge.exported_program().graph_module.graph.nodes if n.op == "call_function"]
    names = Counter(_op_name(n.target) for n in calls)
    delegates = names.pop("executorch_call_delegate", 0)
    names.pop("getitem", None)
    path.write_bytes(edge.to_executorch().buffer)
    return Lowered(delegates, dict(inside), dict(names))


def _op_name(target: Callable[..., object] | str) -> str:
    name = getattr(target, "__name__", str(target))
    return name.removesuffix(".default")


def program_runner(path: Path) -> Callable[[np.ndarray], tuple[np.ndarray, ...]]:
    """The program at ``path`` on ExecuTorch's runtime: a (1, C, H, W) float32 batch in, its outputs out."""
    with quiet_imports():
        from executorch.runtime import Runtime

    method = Runtime.get().load_program(str(path)).load_method("forward")

    def run(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(t.numpy() for t in method.execute([torch.from_numpy(np.ascontiguousarray(batch))]))

    return run
