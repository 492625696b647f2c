"""What a .tflite graph is made of and how LiteRT runs it: op histogram, TRANSPOSE count, float ops left inside an
int8 graph, and the XNNPACK partitions.

XNNPACK partitions are read from the interpreter itself, not guessed from op lists: after the delegate is applied,
the primary subgraph holds the original M nodes followed by one node per partition, whose inputs and outputs are
the partition's boundary tensors. Walking producers back from a partition's outputs, stopping at its inputs,
gives exactly its member ops; every op that is in no partition runs on LiteRT's builtin kernels. (LiteRT 2.3 logs
"Replacing N out of M node(s) ... yielding K partitions" only at verbose level, which the Python package cannot
enable; the log is still captured at the file-descriptor level and returned when present.)
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

from mdeploy.converters.base import capture_stderr
from mdeploy.converters.tflite_flatbuffer import OP_NAMES, TYPE_NAMES, fb, read_model
from mdeploy.errors import first_line

BOUNDARY_OPS = ("QUANTIZE", "DEQUANTIZE")
_PARTITION_LOG = re.compile(r"Replacing (\d+) out of (\d+) node\(s\).*yielding (\d+) partitions")


def _name(tensor: fb.TensorT) -> str:
    name = tensor.name
    return name.decode() if isinstance(name, bytes) else str(name)


def op_list(model: fb.ModelT) -> list[tuple[str, list[int], list[int]]]:
    codes = [OP_NAMES.get(max(c.builtinCode, c.deprecatedBuiltinCode), "CUSTOM") for c in model.operatorCodes]
    return [(codes[op.opcodeIndex], [int(i) for i in (op.inputs if op.inputs is not None else [])],
             [int(i) for i in (op.outputs if op.outputs is not None else [])]) for op in model.subgraphs[0].operators]


Islands = dict[int, tuple[int, int, int]]  # {SOFTMAX op: (DEQUANTIZE, SOFTMAX, QUANTIZE) op positions}


def float_ops(model: fb.ModelT, islands: Islands | None = None) -> list[str]:
    """Ops of an int8 graph that compute in float, other than the QUANTIZE/DEQUANTIZE at the graph's boundary and
    the float softmaxes (``float_softmaxes``; ``islands``: their ``float_softmax_islands`` when known)."""
    graph = model.subgraphs[0]
    tensors = graph.tensors
    inputs, outputs = set(int(i) for i in graph.inputs), set(int(i) for i in graph.outputs)
    islands = float_softmax_islands(model) if islands is None else islands
    island = {i for members in islands.values() for i in members}

    def is_float(index: int) -> bool:
        tensor = tensors[index]
        constant = tensor.buffer and model.buffers[tensor.buffer].data is not None
        return TYPE_NAMES.get(tensor.type) == "float32" and not constant

    found = []
    for position, (op, ins, outs) in enumerate(op_list(model)):
        if position in island:
            continue
        if op == "QUANTIZE" and all(i in inputs for i in ins if i >= 0):
            continue
        if op == "DEQUANTIZE" and all(o in outputs for o in outs):
            continue
        if any(is_float(i) for i in ins + outs if i >= 0):
            found.append(f"{op} -> {_name(tensors[outs[0]])}")
    return found


def float_softmaxes(model: fb.ModelT, islands: Islands | None = None) -> list[str]:
    """The SOFTMAXes an int8 graph computes in float, each between a DEQUANTIZE of an int8 tensor and a QUANTIZE
    back to int8 that nothing else reads (how ``tflite_attention.softmax`` writes them: XNNPACK delegates no int8
    SOFTMAX), by their int8 output tensors."""
    tensors = model.subgraphs[0].tensors
    ops = op_list(model)
    islands = float_softmax_islands(model) if islands is None else islands
    return [_name(tensors[ops[quantize][2][0]]) for _, _, quantize in islands.values()]


def float_softmax_islands(model: fb.ModelT) -> Islands:
    """Every float softmax island of an int8 graph (``float_softmaxes``), by its SOFTMAX op's position."""
    tensors = model.subgraphs[0].tensors
    ops = op_list(model)
    producer = {out: i for i, (_, _, outs) in enumerate(ops) for out in outs}
    readers: dict[int, list[int]] = {}
    for i, (_, ins, _) in enumerate(ops):
        for tensor in ins:
            readers.setdefault(tensor, []).append(i)

    def dtype(index: int) -> str:
        return TYPE_NAMES.get(tensors[index].type, "")

    islands = {}
    for i, (op, ins, outs) in enumerate(ops):
        if op != "SOFTMAX" or dtype(outs[0]) != "float32":
            continue
        before, after = producer.get(ins[0]), readers.get(outs[0], [])
        if (before is not None and ops[before][0] == "DEQUANTIZE" and dtype(ops[before][1][0]) == "int8"
                and readers.get(ins[0]) == [i] and len(after) == 1 and ops[after[0]][0] == "QUANTIZE"
                and dtype(ops[after[0]][2][0]) == "int8"):
            islands[i] = (before, i, after[0])
    return islands


def is_quantized(model: fb.ModelT) -> bool:
    graph = model.subgraphs[0]
    return any(TYPE_NAMES.get(t.type) == "int8" and t.buffer and model.buffers[t.buffer].data is not None
               and len(t.shape) > 1 for t in graph.tensors)


def xnnpack_partitions(content: bytes, threads: int = 1) -> dict[str, Any]:
    """How the XNNPACK delegate splits the graph: partition count, delegated ops and the ops left outside."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    model = read_model(content)
    ops = op_list(model)
    names = [_name(t) for t in model.subgraphs[0].tensors]

    def load() -> Any:
        interpreter = Interpreter(model_content=content, num_threads=threads,
                                  experimental_op_resolver_type=OpResolverType.AUTO)
        interpreter.allocate_tensors()
        return interpreter

    interpreter, log = capture_stderr(load)
    wrapper = interpreter._interpreter  # noqa: SLF001 (the node list is only exposed there)
    total = wrapper.NumNodes()
    producer = {out: i for i, (_, _, outs) in enumerate(ops) for out in outs}
    members: list[set[int]] = []
    for node in range(len(ops), total):
        boundary = set(int(i) for i in wrapper.NodeInputs(node))
        inside: set[int] = set()
        stack = [int(i) for i in wrapper.NodeOutputs(node)]
        while stack:
            tensor = stack.pop()
            op = producer.get(tensor)
            if tensor in boundary or op is None or op in inside:
                continue
            inside.add(op)
            stack.extend(i for i in ops[op][1] if i >= 0)
        members.append(inside)
    delegated = set().union(*members) if members else set()
    outside = [f"{ops[i][0]} -> {names[ops[i][2][0]]}" for i in range(len(ops)) if i not in delegated]
    report: dict[str, Any] = {
        "partitions": total - len(ops),
        "delegated_ops": len(delegated),
        "total_ops": len(ops),
        "ops_outside": outside,
    }
    match = _PARTITION_LOG.search(log)
    if match:
        report["log"] = match.group(0)
    return report


def graph_report(content: bytes) -> dict[str, Any]:
    model = read_model(content)
    ops = op_list(model)
    histogram = Counter(op for op, _, _ in ops)
    quantized = is_quantized(model)
    islands = float_softmax_islands(model) if quantized else {}
    report: dict[str, Any] = {
        "ops": dict(sorted(histogram.items())),
        "op_count": len(ops),
        "transposes": histogram.get("TRANSPOSE", 0),
        "int8": quantized,
        "float_ops_inside": float_ops(model, islands) if quantized else [],
        "float_softmaxes": float_softmaxes(model, islands) if quantized else [],
    }
    try:
        report["xnnpack"] = xnnpack_partitions(content)
    except (ImportError, RuntimeError, ValueError) as err:
        report["xnnpack"] = {"error": first_line(err)}
    return report


def tensor_description(model: fb.ModelT, index: int) -> dict[str, Any]:
    tensor = model.subgraphs[0].tensors[index]
    described: dict[str, Any] = {"name": _name(tensor), "dtype": TYPE_NAMES.get(tensor.type, str(tensor.type)),
                                 "shape": [int(d) for d in tensor.shape]}
    q = tensor.quantization
    if q is not None and q.scale is not None and len(q.scale) == 1:
        described["scale"] = float(np.float32(q.scale[0]))
        described["zero_point"] = int(q.zeroPoint[0])
    return described
