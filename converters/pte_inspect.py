"""What an ExecuTorch program holds, read back from the file: its methods, I/O, the ops it runs outside delegates,
and inside each XNNPACK delegate the nodes by kind and the int8 grids (``PteConverter.inspect``).

A program keeps no readable copy of a delegate's graph: XNNPACK's payload is its own flatbuffer (a header, then the
graph), read here field by field with the slots of the XNNPACK schema ExecuTorch ships."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import flatbuffers
import numpy as np

from mdeploy.converters.pte_program import METADATA_METHOD, quiet_imports
from mdeploy.errors import BadInputError

XNNPACK_BACKEND = "XnnpackBackend"
DTYPES = {6: "float32", 1: "int8", 0: "uint8", 3: "int32", 4: "int64"}  # ExecuTorch ScalarType codes


def read_program(path: Path) -> dict[str, Any]:
    """The program at ``path`` as a plain report (see the module's doc); BadInputError if it is not one."""
    with quiet_imports():
        from executorch.exir._serialize._program import deserialize_pte_binary

    data = Path(path).read_bytes()
    try:
        program = deserialize_pte_binary(data).program
    except Exception as error:  # the flatbuffer and header parsers raise many kinds; all mean "not a program"
        raise BadInputError(f"{path} is not an ExecuTorch program (.pte): {str(error).splitlines()[0][:160]}; "
                            "pass a .pte written by ExecuTorch, or convert again") from None
    plans = {plan.name: plan for plan in program.execution_plan}
    if "forward" not in plans:
        raise BadInputError(f"{path} is an ExecuTorch program without a 'forward' method (it has "
                            f"{', '.join(plans) or 'none'}): pass a model's program")
    forward = plans["forward"]
    metadata = _metadata(plans.get(METADATA_METHOD))
    names = output_names(metadata, len(forward.outputs))
    outside = Counter(op.name for op in forward.operators)
    kinds: Counter[str] = Counter()
    grids: list[dict[str, Any]] = []
    per_channel = 0
    backends = [delegate.id for delegate in forward.delegates]
    for index, backend in enumerate(backends):
        if backend == XNNPACK_BACKEND:
            graph = _xnnpack_graph(data, sum(b == XNNPACK_BACKEND for b in backends[:index]))
            kinds.update(node["xnode_union_type"] for node in graph.get("xnodes", []))
            per_channel += _per_channel_weights(graph)
            grids += _activation_grids(graph)
    return {
        "format": "ExecuTorch",
        "methods": sorted(plans),
        "inputs": [_tensor(forward.values[i].val, "input") for i in forward.inputs],
        "outputs": [_tensor(forward.values[i].val, name) for i, name in zip(forward.outputs, names, strict=True)],
        "ops": dict(sorted(outside.items())),
        "delegates": dict(Counter(backends)),
        "xnnpack_nodes": dict(sorted(kinds.items())),
        "float_int8_conversions": kinds.get("XNNConvert", 0),
        "size_bytes": len(data),
        "per_channel_int8_tensors": per_channel,
        "activation_quantization": grids,
        "metadata": metadata,
    }


def output_names(metadata: dict[str, str], count: int) -> list[str]:
    """The outputs' names from the program's ``mdeploy.io`` metadata (``output_i`` for a program without it)."""
    io = json.loads(metadata.get("mdeploy.io", "{}"))
    described = io.get("outputs") or ([io["output"]] if "output" in io else [])
    names = [entry["name"] for entry in described]
    return names if len(names) == count else [f"output_{i}" for i in range(count)]


def _metadata(plan: Any) -> dict[str, str]:
    if plan is None or len(plan.values) != 1:
        return {}
    value = getattr(plan.values[0].val, "string_val", None)
    return dict(json.loads(value)) if isinstance(value, str) else {}


def _tensor(value: Any, name: str) -> dict[str, Any]:
    return {"name": name, "dtype": DTYPES.get(int(value.scalar_type), str(value.scalar_type)),
            "shape": [int(d) for d in value.sizes]}


def _xnnpack_graph(data: bytes, index: int) -> dict[str, Any]:
    """The ``index``-th XNNPACK delegate's nodes (by kind) and values (tensor fields, and quantisation parameters
    where quantised), read from its flatbuffer with the schema's field slots (``flatc --json`` would print scales
    with six decimals: 1.8e-05 for 1.78498e-05)."""
    with quiet_imports():
        from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader, _get_schema_bytes
        from executorch.exir._serialize._program import _extract_delegate_payload

    payload = _extract_delegate_payload(data, "xnnpack", index)
    if payload is None:
        return {}
    header = XNNHeader.from_bytes(payload[:XNNHeader.EXPECTED_LENGTH])
    buffer = bytearray(payload[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size])
    schema = _get_schema_bytes().decode()
    node_kinds, value_kinds = _union_members(schema, "XNodeUnion"), _union_members(schema, "XValueUnion")
    quant_kinds = _union_members(schema, "XNNQuantParams")
    root = _Table(buffer, flatbuffers.encode.Get(flatbuffers.packer.uoffset, buffer, 0))
    nodes = [{"xnode_union_type": node_kinds[node.scalar(0, _UINT8)]} for node in root.tables(1)]  # XNode
    values = []
    for value in root.tables(2):  # XValue: xvalue_union_type, xvalue_union
        kind, body = value_kinds[value.scalar(0, _UINT8)], value.union(1)
        if kind != "XNNQuantizedTensorValue":
            values.append({"xvalue_union_type": kind, "xvalue_union": _tensor_fields(body)})
            continue
        quant_kind = quant_kinds[body.scalar(1, _UINT8)]
        params = body.union(2)
        quant = ({"scale": params.scalar(0, _FLOAT32), "zero_point": params.scalar(1, _INT32)}
                 if quant_kind == "PerTensorQuant" else {})
        values.append({"xvalue_union_type": kind, "xvalue_union": {
            "tensor_value": _tensor_fields(body.table(0)), "quant_params_type": quant_kind, "quant_params": quant}})
    return {"xnodes": nodes, "xvalues": values}


def _tensor_fields(tensor: _Table) -> dict[str, Any]:
    """XNNTensorValue: datatype, num_dims, dims, constant_buffer_idx, external_id, flags, id_out, named_key."""
    return {"num_dims": tensor.scalar(1, _UINT32), "constant_buffer_idx": tensor.scalar(3, _UINT32),
            "id_out": tensor.scalar(6, _UINT32), "named_key": tensor.present(7)}


def _union_members(schema: str, union: str) -> dict[int, str]:
    """Type code -> member name of ``union`` in the flatbuffer schema (codes count from 1 in declaration order)."""
    body = re.search(r"union\s+" + union + r"\s*{([^}]*)}", schema)
    if body is None:
        raise ValueError(f"the XNNPACK schema has no union {union}")
    names = [m.split(":")[0].strip() for m in re.sub(r"//[^\n]*", "", body.group(1)).split(",") if m.strip()]
    return {i + 1: name for i, name in enumerate(names)}


class _Table(flatbuffers.table.Table):
    """A flatbuffer table read by field slot (0 = the schema's first field)."""

    def _offset(self, slot: int) -> int:
        return int(self.Offset(4 + 2 * slot))

    def present(self, slot: int) -> bool:
        return self._offset(slot) != 0

    def scalar(self, slot: int, flags: Any) -> Any:
        offset = self._offset(slot)
        return self.Get(flags, self.Pos + offset) if offset else 0

    def table(self, slot: int) -> _Table:
        return _Table(self.Bytes, self.Indirect(self.Pos + self._offset(slot)))

    def union(self, slot: int) -> _Table:
        target = flatbuffers.table.Table(bytearray(), 0)  # Table.Union accepts only that exact class
        self.Union(target, self._offset(slot))
        return _Table(target.Bytes, target.Pos)

    def tables(self, slot: int) -> list[_Table]:
        offset = self._offset(slot)
        if not offset:
            return []
        start = self.Vector(offset)
        return [_Table(self.Bytes, self.Indirect(start + 4 * j)) for j in range(self.VectorLen(offset))]


_UINT8, _UINT32 = flatbuffers.number_types.Uint8Flags, flatbuffers.number_types.Uint32Flags
_INT32, _FLOAT32 = flatbuffers.number_types.Int32Flags, flatbuffers.number_types.Float32Flags


def _quantized_values(graph: dict[str, Any]) -> list[dict[str, Any]]:
    return [v["xvalue_union"] for v in graph.get("xvalues", []) if v["xvalue_union_type"] == "XNNQuantizedTensorValue"]


def _per_channel_weights(graph: dict[str, Any]) -> int:
    """Constant int8 tensors with a scale per output channel (weights; with int8 hard-swish/hard-sigmoid also
    their gates' 1x1 depthwise weights, which the program's metadata counts: ``mdeploy.int8_gates``)."""
    return sum(1 for v in _quantized_values(graph)
               if v["quant_params_type"] == "PerChannelQuant" and v["tensor_value"]["num_dims"] > 1)


def _activation_grids(graph: dict[str, Any]) -> list[dict[str, Any]]:
    """The int8 grid of each distinct activation tensor (XNNPACK's own ids: a program names no tensors). A layout
    change (NCHW <-> NHWC) copies a tensor onto the same grid; such copies are listed once."""
    grids, seen = [], set()
    for value in _quantized_values(graph):
        tensor = value["tensor_value"]
        if value["quant_params_type"] != "PerTensorQuant" or tensor["constant_buffer_idx"] or tensor["named_key"]:
            continue
        key = (value["quant_params"]["scale"], value["quant_params"]["zero_point"])
        if key not in seen:
            seen.add(key)
            grids.append({"tensor": f"xnnpack value {tensor['id_out']}", "scale": float(np.float32(key[0])),
                          "zero_point": int(key[1])})
    return grids
