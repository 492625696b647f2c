"""Writing and reading TFLite flatbuffers with the schema's object API (shipped by ai-edge-litert: no TensorFlow).

:class:`ModelBuilder` collects tensors, constant buffers and operators of one subgraph and serialises them into a
``.tflite`` file: weights aligned to 16 bytes as TensorFlow's converter does, metadata entries, one signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as fb

FILE_IDENTIFIER = b"TFL3"
SCHEMA_VERSION = 3
SIGNATURE_KEY = "serving_default"

TENSOR_TYPES: dict[np.dtype, int] = {
    np.dtype(np.float32): fb.TensorType.FLOAT32,
    np.dtype(np.int8): fb.TensorType.INT8,
    np.dtype(np.uint8): fb.TensorType.UINT8,
    np.dtype(np.int32): fb.TensorType.INT32,
    np.dtype(np.int64): fb.TensorType.INT64,
}
TYPE_NAMES = {value: np.dtype(key).name for key, value in TENSOR_TYPES.items()}
OP_NAMES = {value: name for name, value in vars(fb.BuiltinOperator).items() if not name.startswith("_")}


class _AlignedBuffer(fb.BufferT):
    """A buffer whose bytes start on a 16-byte boundary (the schema's ``force_align: 16``; Pack ignores it)."""

    def Pack(self, builder: flatbuffers.Builder) -> int:  # noqa: N802 (the schema's naming)
        data = None
        if self.data is not None and len(self.data):
            payload = np.ascontiguousarray(self.data).view(np.uint8).tobytes()
            builder.StartVector(1, len(payload), 16)
            builder.head -= len(payload)
            builder.Bytes[builder.head : builder.head + len(payload)] = payload
            data = builder.EndVector(len(payload))
        fb.BufferStart(builder)
        if data is not None:
            fb.BufferAddData(builder, data)
        return fb.BufferEnd(builder)


@dataclass(frozen=True)
class Quant:
    """TFLite quantisation of one tensor: per-tensor (one scale) or per-channel along ``axis``."""

    scale: tuple[float, ...]
    zero_point: tuple[int, ...]
    axis: int = 0

    @classmethod
    def per_tensor(cls, scale: float, zero_point: int) -> Quant:
        return cls((float(scale),), (int(zero_point),))

    def to_fb(self) -> fb.QuantizationParametersT:
        q = fb.QuantizationParametersT()
        q.scale = np.asarray(self.scale, np.float32)
        q.zeroPoint = np.asarray(self.zero_point, np.int64)
        q.quantizedDimension = self.axis
        return q


class ModelBuilder:
    """One subgraph built tensor by tensor and operator by operator, in execution order."""

    def __init__(self) -> None:
        self.tensors: list[fb.TensorT] = []
        self.tensor_index: dict[str, int] = {}
        self.buffers: list[fb.BufferT] = [_AlignedBuffer()]  # buffer 0 is the empty sentinel
        self.operators: list[fb.OperatorT] = []
        self.opcodes: list[fb.OperatorCodeT] = []
        self.opcode_index: dict[tuple[int, int], int] = {}
        self.inputs: list[int] = []
        self.outputs: list[int] = []

    # -- tensors ---------------------------------------------------------------------------------------------
    def tensor(self, name: str, shape: tuple[int, ...], dtype: Any, quant: Quant | None = None,
               data: np.ndarray | None = None) -> str:
        if name in self.tensor_index:
            raise ValueError(f"tensor {name!r} defined twice")
        t = fb.TensorT()
        t.name = name
        t.shape = np.asarray(shape, np.int32)
        t.type = TENSOR_TYPES[np.dtype(dtype)]
        if quant is not None:
            t.quantization = quant.to_fb()
        if data is not None:
            data = np.array(data, dtype=dtype, order="C")
            if tuple(data.shape) != tuple(shape):
                raise ValueError(f"constant {name!r}: data shape {data.shape} != {shape}")
            buffer = _AlignedBuffer()
            buffer.data = data.reshape(-1)
            self.buffers.append(buffer)
            t.buffer = len(self.buffers) - 1
        self.tensor_index[name] = len(self.tensors)
        self.tensors.append(t)
        return name

    def constant(self, name: str, data: np.ndarray, quant: Quant | None = None) -> str:
        return self.tensor(name, tuple(data.shape), data.dtype, quant, data)

    def rename(self, old: str, new: str) -> str:
        index = self.tensor_index.pop(old)
        self.tensor_index[new] = index
        self.tensors[index].name = new
        return new

    def has(self, name: str) -> bool:
        return name in self.tensor_index

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensors[self.tensor_index[name]].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(TYPE_NAMES[self.tensors[self.tensor_index[name]].type])

    # -- operators -------------------------------------------------------------------------------------------
    def op(self, code: int, version: int, inputs: list[str], outputs: list[str], options: Any = None,
           options_type: int = 0) -> None:
        key = (code, version)
        if key not in self.opcode_index:
            opcode = fb.OperatorCodeT()
            opcode.builtinCode = code
            opcode.deprecatedBuiltinCode = min(code, fb.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
            opcode.version = version
            self.opcode_index[key] = len(self.opcodes)
            self.opcodes.append(opcode)
        operator = fb.OperatorT()
        operator.opcodeIndex = self.opcode_index[key]
        operator.inputs = np.asarray([self.tensor_index[n] if n else -1 for n in inputs], np.int32)
        operator.outputs = np.asarray([self.tensor_index[n] for n in outputs], np.int32)
        if options is not None:
            operator.builtinOptionsType = options_type
            operator.builtinOptions = options
        self.operators.append(operator)

    # -- the file --------------------------------------------------------------------------------------------
    def serialize(self, name: str, metadata: dict[str, str], description: str,
                  binary_metadata: dict[str, bytes] | None = None) -> bytes:
        """``metadata``: text entries (UTF-8); ``binary_metadata``: entries whose buffers are bytes as given (e.g.
        ``TFLITE_METADATA``), after the text ones."""
        subgraph = fb.SubGraphT()
        subgraph.name = name
        subgraph.tensors = self.tensors
        subgraph.inputs = np.asarray([self.tensor_index[n] for n in self.inputs], np.int32)
        subgraph.outputs = np.asarray([self.tensor_index[n] for n in self.outputs], np.int32)
        subgraph.operators = self.operators
        buffers = list(self.buffers)
        entries = []
        payloads = {key: value.encode("utf-8") for key, value in metadata.items()}
        payloads.update(binary_metadata or {})
        for key, value in payloads.items():
            buffer = _AlignedBuffer()
            buffer.data = np.frombuffer(value, np.uint8)
            buffers.append(buffer)
            entry = fb.MetadataT()
            entry.name = key
            entry.buffer = len(buffers) - 1
            entries.append(entry)
        signature = fb.SignatureDefT()
        signature.signatureKey = SIGNATURE_KEY
        signature.subgraphIndex = 0
        signature.inputs = [_tensor_map(self.tensors[self.tensor_index[n]].name, self.tensor_index[n])
                            for n in self.inputs]
        signature.outputs = [_tensor_map(self.tensors[self.tensor_index[n]].name, self.tensor_index[n])
                             for n in self.outputs]
        model = fb.ModelT()
        model.version = SCHEMA_VERSION
        model.description = description
        model.operatorCodes = self.opcodes
        model.subgraphs = [subgraph]
        model.buffers = buffers
        model.metadata = entries
        model.signatureDefs = [signature]
        builder = flatbuffers.Builder(1 << 20)
        builder.Finish(model.Pack(builder), file_identifier=FILE_IDENTIFIER)
        return bytes(builder.Output())


def _tensor_map(name: str, index: int) -> fb.TensorMapT:
    entry = fb.TensorMapT()
    entry.name = name
    entry.tensorIndex = index
    return entry


def read_model(data: bytes) -> fb.ModelT:
    return fb.ModelT.InitFromObj(fb.Model.GetRootAs(data, 0))


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``Model.metadata`` entries whose buffers hold text, decoded. Binary ones (not UTF-8, or holding a NUL
    byte, which text never has and a flatbuffer such as ``TFLITE_METADATA`` always has) are skipped."""
    model = fb.Model.GetRootAs(data, 0)
    found = {}
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        raw = model.Buffers(entry.Buffer()).DataAsNumpy()
        if isinstance(raw, np.ndarray):
            payload = raw.tobytes()
            if b"\x00" in payload:
                continue
            try:
                found[entry.Name().decode()] = payload.decode("utf-8")
            except UnicodeDecodeError:
                continue
    return found
