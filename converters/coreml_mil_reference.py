"""A NumPy reference executor of Core ML ML programs: what parity checks run on machines without Core ML.

Core ML itself runs only on Apple systems. This executor reads the program saved in an .mlpackage (through
coremltools' MIL proto loader) and runs it op by op with one small NumPy function per MIL op, registered by name
like coremltools' own op registry. It is a reference of the MIL op definitions, not of Core ML's kernels:

- each op follows the formula coremltools uses for the op's value inference (the tests compare every op with it),
  in the dtypes the program declares: elementwise ops and int8 ``quantize``/``dequantize`` compute in the tensor's
  dtype like those formulas (NumPy rounds fp16 after each step; ``quantize`` rounds half to even and saturates);
  ``conv``, ``linear`` and ``reduce_mean`` accumulate in fp32 and round their output once to the declared dtype;
- constexpr weights (``constexpr_affine_dequantize``, ``constexpr_blockwise_shift_scale``) are decompressed once
  at load time, as Core ML does at model load;
- an op without an implementation stops the run with :class:`UnsupportedMilOpError` naming it, never a skip.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.errors import BadInputError, UnsupportedOpError, first_line
from mdeploy.converters.coreml_mil_attention import ATTENTION_MIL_OPS
from mdeploy.converters.coreml_mil_dense import DENSE_MIL_OPS
from mdeploy.converters.coreml_mil_structure import STRUCTURE_MIL_OPS

RUNTIME_NAME = "MIL reference (not Core ML)"
MilOpFn = Callable[..., Any]
MIL_OPS: dict[str, MilOpFn] = {}
_INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255)}


class UnsupportedMilOpError(UnsupportedOpError):
    """The program uses a MIL op the reference executor does not implement."""


def mil_op(*names: str) -> Callable[[MilOpFn], MilOpFn]:
    def register(fn: MilOpFn) -> MilOpFn:
        for name in names:
            MIL_OPS[name] = fn
        return fn

    return register


# -- quantisation ------------------------------------------------------------------------------------------------
def _per_axis(param: np.ndarray, rank: int, axis: int | None) -> np.ndarray:
    """A scalar, or a vector along ``axis`` reshaped to broadcast against a tensor of ``rank``."""
    param = np.asarray(param)
    if param.ndim == 0 or param.ndim == rank:
        return param
    if axis is None:
        raise ValueError("a vector quantisation parameter needs an axis")
    shape = [1] * rank
    shape[int(axis) % rank] = param.size
    return param.reshape(shape)


@mil_op("quantize")
def quantize(input: np.ndarray, scale: np.ndarray, output_dtype: str,  # noqa: A002  # MIL's input names
             zero_point: np.ndarray | None = None, axis: int | None = None) -> np.ndarray:
    """clip(round(input / scale) + zero_point): the division in the input's dtype, round half to even."""
    dtype = np.dtype(str(output_dtype))
    q = np.around(input / _per_axis(scale, input.ndim, axis))
    if zero_point is not None:
        q = q + _per_axis(zero_point, input.ndim, axis).astype(np.float32)
    low, high = _INT_RANGES[dtype]
    return np.clip(q, low, high).astype(dtype)


@mil_op("dequantize")
def dequantize(input: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None = None,  # noqa: A002
               axis: int | None = None) -> np.ndarray:
    """scale * (input - zero_point), computed in fp32 and returned in the scale's dtype."""
    x = input.astype(np.float32)
    if zero_point is not None:
        x = x - _per_axis(zero_point, input.ndim, axis).astype(np.float32)
    scale = _per_axis(scale, input.ndim, axis)
    return (x * scale).astype(scale.dtype)


@mil_op("constexpr_affine_dequantize")
def constexpr_affine_dequantize(quantized_data: np.ndarray, zero_point: np.ndarray, scale: np.ndarray,
                                axis: int) -> np.ndarray:
    return dequantize(quantized_data, scale, zero_point, axis)


@mil_op("constexpr_blockwise_shift_scale")
def constexpr_blockwise_shift_scale(data: np.ndarray, scale: np.ndarray,
                                    offset: np.ndarray | None = None) -> np.ndarray:
    """scale * (data - offset), each scale covering a block of data; in the scale's dtype."""
    x = data.astype(scale.dtype)
    for axis, (size, blocks) in enumerate(zip(data.shape, scale.shape, strict=True)):
        if blocks != size:
            scale = np.repeat(scale, size // blocks, axis)
            offset = None if offset is None else np.repeat(offset, size // blocks, axis)
    if offset is not None:
        x = x - offset
    return scale * x


@mil_op("cast")
def cast(x: np.ndarray, dtype: str) -> np.ndarray:
    names = {"fp16": np.float16, "fp32": np.float32, "int32": np.int32, "int16": np.int16, "int8": np.int8,
             "uint8": np.uint8, "bool": np.bool_}
    return np.asarray(x).astype(names[str(dtype)])


# -- convolution and linear (fp32 accumulation) -------------------------------------------------------------
def _conv_padding(pad_type: str, pad: np.ndarray | None, spatial: tuple[int, int], kernel: tuple[int, int],
                  strides: tuple[int, int], dilations: tuple[int, int]) -> list[int]:
    if pad_type == "custom":
        return [int(p) for p in (pad if pad is not None else (0, 0, 0, 0))]
    if pad_type == "valid":
        return [0, 0, 0, 0]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, large = total // 2, total - total // 2
            pads += [small, large] if pad_type == "same" else [large, small]
        return pads
    raise UnsupportedMilOpError(f"MIL conv pad_type {pad_type!r} is not implemented by the {RUNTIME_NAME}")


def _windows(x: np.ndarray, kernel: tuple[int, int], strides: tuple[int, int], dilations: tuple[int, int],
             out: tuple[int, int]) -> list[np.ndarray]:
    """The (N, C, Ho, Wo) input slices that each kernel tap (i, j) multiplies, in row-major tap order."""
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, strides, dilations, out
    return [x[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw]
            for i in range(kh) for j in range(kw)]


@mil_op("conv")
def conv(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, strides: Any = None,
         pad_type: str = "valid", pad: Any = None, dilations: Any = None, groups: int = 1) -> np.ndarray:
    """2-D cross-correlation (N, C, H, W) * (O, C/groups, kh, kw), accumulated in fp32."""
    if x.ndim != 4:
        raise UnsupportedMilOpError(f"MIL conv of rank {x.ndim} is not implemented by the {RUNTIME_NAME}")
    x, w = x.astype(np.float32, copy=False), weight.astype(np.float32, copy=False)
    kernel = (w.shape[2], w.shape[3])
    strides = tuple(int(s) for s in (strides if strides is not None else (1, 1)))
    dilations = tuple(int(d) for d in (dilations if dilations is not None else (1, 1)))
    top, bottom, left, right = _conv_padding(str(pad_type), pad, x.shape[2:], kernel, strides, dilations)
    if top or bottom or left or right:
        x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    out = tuple((size - d * (k - 1) - 1) // s + 1 for size, k, s, d in zip(x.shape[2:], kernel, strides, dilations))
    n, channels, groups = x.shape[0], x.shape[1], int(groups)
    taps = _windows(x, kernel, strides, dilations, out)
    if groups == channels and w.shape[1] == 1:  # depthwise (channel multiplier w.shape[0] // channels)
        multiplier = w.shape[0] // channels
        y = np.zeros((n, w.shape[0], *out), np.float32)
        product = np.empty_like(y)
        for t, tap in enumerate(taps):
            tap = np.repeat(tap, multiplier, axis=1) if multiplier > 1 else tap
            np.multiply(tap, w[:, 0].reshape(w.shape[0], -1)[:, t].reshape(1, -1, 1, 1), out=product)
            y += product
    elif groups == 1 and len(taps) == 1:  # pointwise: one matrix product
        cols = np.ascontiguousarray(taps[0]).reshape(n, channels, out[0] * out[1])
        y = np.matmul(w.reshape(w.shape[0], channels), cols).reshape(n, w.shape[0], *out)
    else:
        per_group, outs = channels // groups, w.shape[0] // groups
        ys = []
        for g in range(groups):
            cols = np.stack([tap[:, g * per_group : (g + 1) * per_group] for tap in taps], axis=2)
            cols = cols.reshape(n, per_group * len(taps), out[0] * out[1])
            wg = w[g * outs : (g + 1) * outs].reshape(outs, -1)
            ys.append(np.matmul(wg, cols).reshape(n, outs, *out))
        y = ys[0] if groups == 1 else np.concatenate(ys, axis=1)
    if bias is not None:
        y += bias.astype(np.float32).reshape(1, -1, 1, 1)
    return y


@mil_op("linear")
def linear(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    y = np.matmul(x.astype(np.float32), weight.astype(np.float32).T)
    return y if bias is None else y + bias.astype(np.float32)


@mil_op("reduce_mean")
def reduce_mean(x: np.ndarray, axes: Any = None, keep_dims: bool = False) -> np.ndarray:
    axes = None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))
    return np.mean(x.astype(np.float32), axis=axes, keepdims=bool(keep_dims))


# -- elementwise (in the tensor's dtype, as coremltools' value inference) ----------------------------------------
@mil_op("relu")
def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0)


@mil_op("clip")
def clip(x: np.ndarray, alpha: Any, beta: Any) -> np.ndarray:
    return np.minimum(np.maximum(x, alpha), beta)


@mil_op("thresholded_relu")
def thresholded_relu(x: np.ndarray, alpha: Any = 1.0) -> np.ndarray:
    return np.where(x < alpha, np.zeros_like(x), x)


@mil_op("sigmoid_hard")
def sigmoid_hard(x: np.ndarray, alpha: Any = 0.2, beta: Any = 0.5) -> np.ndarray:
    return np.minimum(np.maximum(alpha * x + beta, 0), 1)


@mil_op("sigmoid")
def sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1 / (1 + np.exp(-x))


@mil_op("silu")
def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


_ERF = np.frompyfunc(math.erf, 1, 1)  # math.erf, as coremltools' value inference (a vectorised erf differs in ulps)


@mil_op("gelu")
def gelu(x: np.ndarray, mode: Any = "EXACT") -> np.ndarray:
    """coremltools' formulas: EXACT 0.5 x (1 + erf(x / sqrt(2))) in float64 (math.erf), rounded once;
    TANH_APPROXIMATION 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))), the cube in the tensor's dtype, the rest
    in float64."""
    mode = str(mode)
    if mode == "TANH_APPROXIMATION":
        a = np.sqrt(2 / np.pi) * (x + 0.044715 * np.power(x, 3))
        return (0.5 * x * (1 + np.tanh(a))).astype(x.dtype)
    if mode != "EXACT":
        raise UnsupportedMilOpError(f"MIL gelu mode {mode!r} is not implemented by the {RUNTIME_NAME}")
    x64 = np.asarray(x).astype(np.float64)
    return (0.5 * x64 * (1 + _ERF(x64 / np.sqrt(2)).astype(np.float64))).astype(x.dtype)


@mil_op("leaky_relu")
def leaky_relu(x: np.ndarray, alpha: Any) -> np.ndarray:
    y = np.array(x, copy=True)
    y[y < 0] *= alpha
    return y


@mil_op("prelu")
def prelu(x: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """max(x, 0) + min(x, 0) * alpha[c], alpha along axis 1."""
    shape = [1] * x.ndim
    shape[1] = -1
    return np.maximum(x, 0) + np.minimum(x, 0) * np.asarray(alpha).reshape(shape)


@mil_op("softmax")
def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=int(axis), keepdims=True))
    return e / np.sum(e, axis=int(axis), keepdims=True)


@mil_op("add")
def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.add(x, y)


@mil_op("sub")
def sub(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.subtract(x, y)


@mil_op("mul")
def mul(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.multiply(x, y)


@mil_op("real_div")
def real_div(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.divide(x, y)


# -- shapes --------------------------------------------------------------------------------------------------
@mil_op("reshape")
def reshape(x: np.ndarray, shape: Any) -> np.ndarray:
    shape = [int(s) for s in np.atleast_1d(shape)]
    if len(shape) == x.ndim:  # 0 copies the input's dimension
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return np.reshape(x, shape)


@mil_op("pad")
def pad(x: np.ndarray, pad: Any, mode: str = "constant", constant_val: Any = 0.0) -> np.ndarray:  # noqa: A002
    pads = [int(p) for p in np.atleast_1d(pad)]
    widths = [(0, 0)] * (x.ndim - len(pads) // 2) + [(pads[i], pads[i + 1]) for i in range(0, len(pads), 2)]
    if str(mode) == "constant":
        return np.pad(x, widths, mode="constant", constant_values=np.asarray(constant_val, x.dtype))
    numpy_mode = {"reflect": "reflect", "replicate": "edge"}.get(str(mode))
    if numpy_mode is None:
        raise UnsupportedMilOpError(f"MIL pad mode {mode!r} is not implemented by the {RUNTIME_NAME}")
    return np.pad(x, widths, mode=numpy_mode)


@mil_op("classify")
def classify(probabilities: np.ndarray, classes: Any) -> tuple[Any, np.ndarray]:
    """(top class label, the per-class scores as given): a classifier's outputs, scores kept as an array."""
    labels = list(classes)
    return labels[int(np.argmax(probabilities.reshape(-1)))], probabilities


MIL_OPS.update(STRUCTURE_MIL_OPS)  # concat, max_pool, avg_pool, transpose, slice_by_index
MIL_OPS.update(ATTENTION_MIL_OPS)  # matmul
MIL_OPS.update(DENSE_MIL_OPS)  # resize_bilinear, upsample_nearest_neighbor, gather, conv_transpose


# -- the executor --------------------------------------------------------------------------------------------
def _value(val: Any) -> Any:
    if isinstance(val, np.ndarray) and val.ndim == 0 and val.dtype.kind in "biuU":
        return val.item() if val.dtype.kind != "U" else str(val)
    if isinstance(val, np.ndarray) and val.dtype.kind == "U":
        return [str(v) for v in val]
    return val


def _declared_dtype(var: Any) -> np.dtype | None:
    from coremltools.converters.mil.mil import types

    try:
        dtype = var.dtype
        return np.dtype(types.nptype_from_builtin(dtype)) if types.is_float(dtype) or types.is_int(dtype) else None
    except (ValueError, TypeError, AttributeError):  # strings, dictionaries, lists
        return None


@dataclass
class _Step:
    op_type: str
    name: str
    inputs: dict[str, Any]  # MIL input name -> a var name (str) or a tuple of var names
    outputs: list[tuple[str, np.dtype | None]]


@dataclass
class MilExecutor:
    """Runs the ``main`` function of a MIL program (``coremltools.converters.mil.Program``) on NumPy arrays."""

    input_names: list[str]
    output_names: list[str]
    steps: list[_Step] = field(default_factory=list)
    constants: dict[str, Any] = field(default_factory=dict)
    op_types: dict[str, int] = field(default_factory=dict)

    @classmethod
    def from_program(cls, program: Any) -> MilExecutor:
        function = program.functions["main"]
        executor = cls(list(function.inputs), [v.name for v in function.outputs])
        for op in function.operations:
            executor.op_types[op.op_type] = executor.op_types.get(op.op_type, 0) + 1
            if op.blocks:
                raise UnsupportedMilOpError(f"MIL op {op.op_type!r} ({op.name}) has nested blocks (control flow), "
                                            f"which the {RUNTIME_NAME} does not implement")
            if op.op_type == "const":
                executor.constants[op.outputs[0].name] = _value(op.outputs[0].val)
                continue
            inputs = {key: tuple(v.name for v in var) if isinstance(var, (list, tuple)) else var.name
                      for key, var in op.inputs.items()}
            step = _Step(op.op_type, op.name, inputs, [(v.name, _declared_dtype(v)) for v in op.outputs])
            if op.op_type.startswith("constexpr_"):  # decompressed once, as at model load
                executor.execute(step, executor.constants)
            else:
                executor.steps.append(step)
        return executor

    def execute(self, step: _Step, values: dict[str, Any]) -> None:
        fn = MIL_OPS.get(step.op_type)
        if fn is None:
            raise UnsupportedMilOpError(
                f"MIL op {step.op_type!r} (producing {step.outputs[0][0]!r}) is not implemented by the "
                f"{RUNTIME_NAME}; it implements: {', '.join(sorted(MIL_OPS))}")
        kwargs = {key: tuple(values[n] for n in ref) if isinstance(ref, tuple) else values[ref]
                  for key, ref in step.inputs.items()}
        results = fn(**kwargs)
        results = results if isinstance(results, tuple) else (results,)
        for (name, dtype), result in zip(step.outputs, results, strict=True):
            values[name] = np.asarray(result).astype(dtype, copy=False) if dtype is not None else result

    def run(self, feeds: dict[str, np.ndarray], keep: set[str] | None = None) -> dict[str, Any]:
        """The program's outputs (and the tensors named in ``keep``) for one set of inputs."""
        values: dict[str, Any] = dict(self.constants)
        missing = set(self.input_names) - set(feeds)
        if missing:
            raise ValueError(f"missing program inputs: {sorted(missing)}")
        values.update(feeds)
        for step in self.steps:
            self.execute(step, values)
        wanted = set(self.output_names) | (keep or set())
        return {name: values[name] for name in wanted if name in values}

    def classifier_scores(self) -> str | None:
        """The tensor a ``classify`` op turns into its class dictionary, if the program is a classifier."""
        for step in self.steps:
            if step.op_type == "classify":
                return step.inputs["probabilities"]
        return None


WEIGHTS_ITEM = ("weights", "com.apple.CoreML")  # (name, author) of the weights folder item in Manifest.json


@dataclass(frozen=True)
class PackageItems:
    """What an .mlpackage's ``Manifest.json`` points at, every path checked to stay inside the package."""

    spec: Path  # the root model's specification (model.mlmodel)
    weights: Path | None  # the folder of weight blobs, None for a program without one


def package_items(path: Path) -> PackageItems:
    """Reads ``path/Manifest.json`` (as coremltools' ModelPackage would, but refusing what it follows blindly): every
    item path must resolve inside the package's ``Data`` folder, no symlink in the package may lead outside it."""
    from mdeploy.paths import check_tree_inside, resolve_inside

    fix = "the package is damaged or half-written: convert again"
    if not path.is_dir():
        raise BadInputError(f"{path} is not an .mlpackage folder: {fix}")
    manifest_path = path / "Manifest.json"
    if not manifest_path.is_file():
        raise BadInputError(f"{path} has no Manifest.json: {fix}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise BadInputError(f"{manifest_path} is not valid JSON ({err.msg} at line {err.lineno}, column "
                            f"{err.colno}): {fix}") from None
    except UnicodeDecodeError:
        raise BadInputError(f"{manifest_path} is not UTF-8 text: {fix}") from None
    entries = manifest.get("itemInfoEntries") if isinstance(manifest, dict) else None
    root_id = manifest.get("rootModelIdentifier") if isinstance(manifest, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(item, dict) for item in entries.values()):
        raise BadInputError(f"{manifest_path} has no valid itemInfoEntries: {fix}")
    check_tree_inside(path, str(path))
    data = path / "Data"
    items = {identifier: resolve_inside(data, item.get("path"), f"the path of item {identifier} in {manifest_path}")
             for identifier, item in entries.items()}
    if root_id not in items:
        raise BadInputError(f"{manifest_path}: rootModelIdentifier {root_id!r} names no item of itemInfoEntries: {fix}")
    if not items[root_id].is_file():
        raise BadInputError(f"{manifest_path}: the root model {entries[root_id]['path']!r} is missing from {data}: "
                            f"{fix}")
    weights = next((items[identifier] for identifier, item in entries.items()
                    if (item.get("name"), item.get("author")) == WEIGHTS_ITEM), None)
    return PackageItems(items[root_id], weights)


def _blob_files(message: Any) -> list[str]:
    """Every ``blobFileValue.fileName`` in a protobuf message (the weight files a program reads)."""
    from google.protobuf.message import Message

    found = []
    for field_descriptor, value in message.ListFields():
        if field_descriptor.message_type is None:
            continue
        if isinstance(value, Message):
            values = [value]
        elif hasattr(value, "values"):  # a map field
            values = list(value.values())
        else:  # a repeated field
            values = list(value)
        for item in values:
            if field_descriptor.name == "blobFileValue":
                found.append(item.fileName)
            elif isinstance(item, Message):
                found += _blob_files(item)
    return found


def load_program(path: Path) -> tuple[Any, Any]:
    """(the model spec, the MIL program) of a saved .mlpackage, through coremltools' MIL proto loader. The package's
    Manifest.json and the program's weight file names are checked first: nothing outside the package is read."""
    from google.protobuf.message import DecodeError

    from mdeploy.converters.coreml_program import import_coremltools
    from mdeploy.paths import resolve_inside

    items = package_items(path)
    import_coremltools()
    from coremltools.converters.mil.frontend.milproto import load as milproto  # private: pinned by a test
    from coremltools.proto import Model_pb2

    spec = Model_pb2.Model()
    try:
        spec.ParseFromString(items.spec.read_bytes())
    except DecodeError as err:
        raise BadInputError(f"{items.spec} is not a Core ML model specification ({first_line(err)}): the package "
                            f"{path} is damaged; convert again") from None
    if spec.WhichOneof("Type") != "mlProgram":
        raise UnsupportedOpError(f"{path} is a Core ML {spec.WhichOneof('Type')} model, not an ML program: the "
                                 f"{RUNTIME_NAME} runs ML programs only")
    for name in sorted(set(_blob_files(spec.mlProgram))):
        if items.weights is None:
            raise BadInputError(f"{path}: the program reads weights from {name!r} but Manifest.json lists no weights "
                                f"item: the package is damaged; convert again")
        # coremltools reads WEIGHTS_FOLDER/<last part of the name>
        blob = resolve_inside(items.weights, name.split("/")[-1], f"weight file {name!r} of {items.spec}")
        if not blob.is_file():
            raise BadInputError(f"{path}: weight file {name!r} is missing from {items.weights}: the package is "
                                f"damaged; convert again")
    return spec, milproto.load(spec, spec.specificationVersion, str(items.weights) if items.weights else "")
