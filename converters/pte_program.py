"""IR graphs as ExecuTorch programs lowered to XNNPACK: what the `.pte` target (`pte.py`) writes.

The graph runs as a torch module through ``graph/execute.py``'s ops, the reference every converter is checked
against, and is exported with ``torch.export`` and lowered with ExecuTorch's ``XnnpackPartitioner``:

- fp32: the graph as it is;
- int8: a ``quantized_decomposed`` quantize after every grid the quantiser chose and a dequantize in front of each
  reader (one dequantize shared by two readers makes the partitioner refuse: "dependency cycles"), the int8 weight
  codes with their per-channel scales, and each bias as the integer model applies it (its int32 code times the
  input and weight scales). No fp32 weight is left in the program.

How each op is written so that XNNPACK takes it whole is ``pte_forms``' business (one function per op). In int8, a
concatenation input on another grid than the output's is requantised by a 1x1 depthwise convolution of weight 1
(XNNPACK's int8 concatenate wants one grid; a quantize after a dequantize would be two float conversions), and a
transposed convolution takes its weight as XNNPACK wants it: (I, O, kh, kw) with scales along O, one group (a
grouped one as its dense equivalent). Hard-swish and sigmoid are int8 as XNNPACK's lookup tables (``pte_partition``:
each code mapped exactly as the quantiser simulates it); SiLU is its input times that sigmoid held on ``GATE_GRID``
(one rounding more than the simulation: 1 output step on a convolution after it). Hard-sigmoid has no int8 form in
XNNPACK, and ExecuTorch splits it into float ops: in an int8 program (on 4-d and 2-d tensors) it is a 1x1 depthwise
convolution, weight 1/6 and bias 1/2 per channel, clamped to [0, 1] (a fused ``hardtanh``), as exact as any int8
convolution. Still computed in float inside the delegate (bench/pte_families.py counts the conversions): softmax
and average pooling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mdeploy.converters.pte_forms import fused, program_params, run_node
from mdeploy.converters.pte_partition import xnnpack_partitioner
from mdeploy.graph.conv_transpose import dense, to_torch_layout
from mdeploy.graph.ir import ConvTransposeAttrs, Graph, Node, Op
from mdeploy.quantize.params import QMAX, QMIN, WEIGHT_QMAX, QuantizedGraph, TensorQuant
from mdeploy.quantize.policy import policy_of
from mdeploy.quantize.rounding import bias_scale_floor
from mdeploy.quantize.simulate import quantized_params

METADATA_METHOD = "metadata"
GATE_GRID = TensorQuant(1.0 / (QMAX - QMIN), QMIN)  # [0, 1], both ends exact: SiLU's sigmoid in int8


class FloatProgram(torch.nn.Module):
    """The graph in fp32, its parameters as buffers."""

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph = graph
        self.buffer_names: dict[str, dict[str, str]] = {}
        for i, node in enumerate(graph.nodes):
            self.buffer_names[node.name] = {}
            for key, value in program_params(node, graph.shapes).items():
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
    """Every grid of ``qgraph`` as a quantize/dequantize pair, its int8 layers' weights as int8 codes. Layers kept
    in float (mixed precision) compute in float from the tensors they read: dequantized where those have a grid,
    as they are where they have none."""

    def __init__(self, qgraph: QuantizedGraph) -> None:
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
            codes = wq.values.astype(np.int8)
            if node.op is Op.CONV_TRANSPOSE:  # XNNPACK: (I, O, kh, kw), scales along O (axis 1), one group
                assert isinstance(node.attrs, ConvTransposeAttrs)
                codes = to_torch_layout(dense(codes, node.attrs.groups), 1)
            self._add(node, f"n{i}_codes", "codes", torch.from_numpy(np.ascontiguousarray(codes)))
            self._add(node, f"n{i}_scales", "scales", torch.from_numpy(wq.scale.astype(np.float32)))
            self._add(node, f"n{i}_zero_points", "zero_points", torch.zeros(len(wq.scale), dtype=torch.int64))
            self._add(node, f"n{i}_bias", "bias", applied[node.name]["bias"])
        gated = gated_nodes(qgraph)
        for i, node in enumerate(qgraph.graph.nodes):
            if node.name in gated:
                for key in [k for k in self.buffer_names[node.name] if k.startswith("float_gate_")]:
                    delattr(self, self.buffer_names[node.name].pop(key))
                for key, value in self._gate_params(node).items():
                    self._add(node, f"n{i}_gate_{key}", f"gate_{key}", value)
            for position in self._moved_inputs(node):
                shape = qgraph.graph.shapes[node.inputs[position]]
                if len(shape) == 4:
                    for key, value in self._identity_params(shape[1]).items():
                        self._add(node, f"n{i}_move{position}_{key}", f"move{position}_{key}", value)

    def _gate_params(self, node: Node) -> dict[str, torch.Tensor]:
        """The depthwise convolution ``x / 6 + 1/2`` over ``node``'s input: weight code 127 per channel (1/6 exact up
        to float32), the bias as its int32 code applies it. On an input grid so fine that the code of 1/2 would
        overflow int32 (below ~2e-7: x is then far inside (-3, 3)), the weight scale grows until it fits, as the
        quantiser does for dead channels (``ptq``), and 1/6 is rounded on it."""
        channels = self.graph.shapes[node.inputs[0]][1]
        input_scale = float(self.qgraph.activations[node.inputs[0]].scale)
        floor = float(bias_scale_floor(torch.tensor([0.5]), input_scale)[0]) * (1 + 1e-6)
        weight_scale = float(np.float32(max(1.0 / (6.0 * WEIGHT_QMAX), floor)))
        bias_step = input_scale * weight_scale
        return {"codes": torch.full((channels, 1, 1, 1), round(1.0 / (6.0 * weight_scale)), dtype=torch.int8),
                "scales": torch.full((channels,), weight_scale, dtype=torch.float32),
                "zero_points": torch.zeros(channels, dtype=torch.int64),
                "bias": torch.full((channels,), round(0.5 / bias_step) * bias_step, dtype=torch.float32)}

    def _quantize(self, x: torch.Tensor, tensor: str | TensorQuant) -> torch.Tensor:
        grid = self.qgraph.activations[tensor] if isinstance(tensor, str) else tensor
        return torch.ops.quantized_decomposed.quantize_per_tensor(
            x, float(grid.scale), int(grid.zero_point), QMIN, QMAX, torch.int8)

    def _dequantize(self, codes: torch.Tensor, tensor: str | TensorQuant) -> torch.Tensor:
        grid = self.qgraph.activations[tensor] if isinstance(tensor, str) else tensor
        return torch.ops.quantized_decomposed.dequantize_per_tensor(
            codes, float(grid.scale), int(grid.zero_point), QMIN, QMAX, torch.int8)

    def params(self, node: Node) -> dict[str, torch.Tensor]:
        params = super().params(node)
        if "codes" not in params:
            return params
        return {"weight": _weight(params), "bias": params["bias"]}

    def _read(self, values: dict[str, torch.Tensor], tensor: str) -> torch.Tensor:
        """``tensor`` as a reader takes it: its codes dequantized (one dequantize per reader), or its float value."""
        if tensor in self.qgraph.activations:
            return self._dequantize(values[tensor], tensor)
        return values[tensor]

    def _write(self, value: torch.Tensor, tensor: str) -> torch.Tensor:
        return self._quantize(value, tensor) if tensor in self.qgraph.activations else value

    def _run(self, node: Node, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """``node``'s output before its quantize, from the int8 codes (or float values) of its inputs."""
        inputs = [self._read(values, name) for name in node.inputs]
        for position in self._moved_inputs(node):
            inputs[position] = self._moved_to_grid(inputs[position], node, position)
        if node.op is Op.CONV_TRANSPOSE and node.name in self.qgraph.weights:
            return self._conv_transpose(inputs[0], node)
        if node.op is Op.SILU and int8_throughout(self.qgraph, node):  # x * sigmoid(x): each reads x (own dequantize)
            return self._read(values, node.inputs[0]) * self._requantized(torch.sigmoid(inputs[0]), GATE_GRID)
        params = self.params(node)
        if "gate_codes" not in params:
            return run_node(node, inputs, params, self._held)
        x = inputs[0]
        flat = x.dim() == 2  # a classifier's (N, C): the convolution runs on (N, C, 1, 1), reshaped on its grid
        if flat:
            x = self._requantized(x.reshape(*x.shape, 1, 1), node.inputs[0])
        gate = F.hardtanh(F.conv2d(x, _weight(params, "gate_"), params["gate_bias"], groups=x.shape[1]), 0.0, 1.0)
        return self._requantized(gate, node.output).reshape(gate.shape[:2]) if flat else gate

    def _moved_inputs(self, node: Node) -> list[int]:
        """The inputs of ``node`` (by position) that must be requantised to its output's grid first: XNNPACK's int8
        concatenate takes every input on the output's grid, and the quantiser could not give it to these."""
        grids = self.qgraph.activations
        if not policy_of(node.op).inputs_take_output_grid or node.output not in grids:
            return []
        return [i for i, name in enumerate(node.inputs) if name in grids and grids[name] != grids[node.output]]

    def _conv_transpose(self, x: torch.Tensor, node: Node) -> torch.Tensor:
        """An int8 transposed convolution as XNNPACK takes one: weight codes per output channel along axis 1 and
        one group (a grouped one as its dense equivalent: zeros add exactly nothing)."""
        attrs = node.attrs
        assert isinstance(attrs, ConvTransposeAttrs)
        params = super().params(node)
        weight = torch.ops.quantized_decomposed.dequantize_per_channel(
            params["codes"], params["scales"], params["zero_points"], 1, QMIN, QMAX, torch.int8)
        y = F.conv_transpose2d(x, weight, params["bias"], attrs.stride, attrs.padding, attrs.output_padding, 1,
                               attrs.dilation)
        return fused(y, node.activation)

    def _identity_params(self, channels: int) -> dict[str, torch.Tensor]:
        """A 1x1 depthwise convolution of weight 1 (code 127, scale 1/127) and no bias: requantises a (N, C, H, W)
        tensor in int8, where a quantize right after a dequantize would be two float conversions in the delegate."""
        return {"codes": torch.full((channels, 1, 1, 1), WEIGHT_QMAX, dtype=torch.int8),
                "scales": torch.full((channels,), 1.0 / WEIGHT_QMAX, dtype=torch.float32),
                "zero_points": torch.zeros(channels, dtype=torch.int64),
                "bias": torch.zeros(channels, dtype=torch.float32)}

    def _moved_to_grid(self, x: torch.Tensor, node: Node, position: int) -> torch.Tensor:
        """Input ``position`` of ``node`` (dequantized int8) requantised to the output's grid (see
        ``_identity_params``; tensors of other ranks take the quantize/dequantize pair)."""
        params = super().params(node)
        prefix = f"move{position}_"
        if f"{prefix}codes" in params:
            x = F.conv2d(x, _weight(params, prefix), params[f"{prefix}bias"], groups=x.shape[1])
        return self._requantized(x, node.output)

    def _held(self, x: torch.Tensor, tensor: str) -> torch.Tensor:
        """``pte_forms``' hold: ``x`` requantised on ``tensor``'s grid where it has one."""
        return self._requantized(x, tensor) if tensor in self.qgraph.activations else x

    def _requantized(self, x: torch.Tensor, grid: str | TensorQuant) -> torch.Tensor:
        """``x`` through a quantize/dequantize pair: how XNNPACK's partitioner sees a tensor held in int8."""
        return self._dequantize(self._quantize(x, grid), grid)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        graph = self.graph
        values = {graph.input_name: self._write(x, graph.input_name)}
        for node in graph.nodes:
            values[node.output] = self._write(self._run(node, values), node.output)
        return tuple(self._read(values, name) for name in graph.outputs)


def gated_nodes(qgraph: QuantizedGraph) -> frozenset[str]:
    """The hard-sigmoid nodes written in int8 as a gate convolution: not kept in float, input and output on int8
    grids, the input (N, C, H, W) or (N, C)."""
    return frozenset(node.name for node in qgraph.graph.nodes
                     if node.op is Op.HARDSIGMOID and int8_throughout(qgraph, node)
                     and len(qgraph.graph.shapes[node.inputs[0]]) in (2, 4))


def int8_throughout(qgraph: QuantizedGraph, node: Node) -> bool:
    """``node`` is int8 from its (first) input to its output: not kept in float, both on int8 grids."""
    grids = qgraph.activations
    return node.name not in qgraph.float_nodes and node.output in grids and node.inputs[0] in grids


def _weight(params: Mapping[str, torch.Tensor], prefix: str = "") -> torch.Tensor:
    """The per-channel int8 weight ``{prefix}codes`` dequantized in the program (XNNPACK takes the codes)."""
    return torch.ops.quantized_decomposed.dequantize_per_channel(
        params[f"{prefix}codes"], params[f"{prefix}scales"], params[f"{prefix}zero_points"], 0, QMIN, QMAX, torch.int8)


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


def write_program(graph: Graph, quantized: QuantizedGraph | None, path: Path,
                  metadata: Mapping[str, str] | None = None) -> Lowered:
    """``graph`` (fp32) or ``quantized`` (int8) as an XNNPACK-lowered ExecuTorch program at ``path``; with
    ``metadata``, a second method ``metadata`` returns it as one JSON string (a program has no other place for it)."""
    with quiet_imports():
        import torchao.quantization.pt2e  # noqa: F401  (registers torch.ops.quantized_decomposed)
        from executorch.exir import to_edge_transform_and_lower
        partitioner = xnnpack_partitioner()

    module = (FloatProgram(graph) if quantized is None else Int8Program(quantized)).eval()
    example = torch.zeros(tuple(graph.input_shape), dtype=torch.float32)
    with warnings.catch_warnings(), xnnpack_node_kinds() as inside:
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecation notices (pytree LeafSpec)
        exported = torch.export.export(module, (example,))
        methods = {METADATA_METHOD: json.dumps(dict(metadata), sort_keys=True)} if metadata is not None else None
        edge = to_edge_transform_and_lower(exported, partitioner=[partitioner], constant_methods=methods)
    path.write_bytes(edge.to_executorch().buffer)
    return lowered(edge, inside)


def lowered(edge: Any, inside: Counter[str]) -> Lowered:
    """What ``edge`` (an ``EdgeProgramManager`` after lowering) delegated, given the XNNPACK node kinds counted
    while it was lowered (``xnnpack_node_kinds``)."""
    calls = [n for n in edge.exported_program().graph_module.graph.nodes if n.op == "call_function"]
    names = Counter(_op_name(n.target) for n in calls)
    delegates = names.pop("executorch_call_delegate", 0)
    names.pop("getitem", None)
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
