"""TFLite emitters of RESIZE and CONV_TRANSPOSE. ``tflite_ops`` merges ``DENSE_EMITTERS`` (and the operator
versions) into its tables; each function takes that module's ``Translator`` as ``t``.

Forms chosen to match PyTorch exactly and for XNNPACK (LiteRT 2.3's CPU delegate; tests/test_ops_dense.py counts
partitions):

- bilinear RESIZE is RESIZE_BILINEAR, ``half_pixel_centers`` for align_corners=False (PyTorch's clamped half-pixel
  sampling) or ``align_corners``; XNNPACK takes it in fp32 and int8 (input and output on one grid, as the policy
  gives them). A scale factor that sets the sampling (not recomputed, and in * scale not whole) cannot be written:
  TFLite samples by the sizes;
- nearest RESIZE by whole factors (FPN's 2x) is CONCATENATION of copies on the channel axis + RESHAPE (width),
  then on the width axis + RESHAPE (height): XNNPACK refuses RESIZE_NEAREST_NEIGHBOR (fp32 and int8: a partition
  boundary on each side, measured) and takes these, moving codes exactly; it takes CONCATENATION of up to 4 inputs
  (5 and more: outside), so a factor is applied as its prime factors up to 4. Other nearest sampling is
  RESIZE_NEAREST_NEIGHBOR (``half_pixel_centers`` for nearest-exact), whose float32 arithmetic is PyTorch's, outside
  XNNPACK; where PyTorch's scale factor sets the sampling, GATHERs of PyTorch's indices;
- CONV_TRANSPOSE is TRANSPOSE_CONV (weights OHWI, bias, fused ReLU/ReLU6; XNNPACK takes it in fp32 and with int8
  per-channel weights). TFLite has no groups or dilation: grouped weights are written dense (zero blocks) and
  dilated kernels with zeros between taps, both exact. PyTorch's padding is TFLite's SAME where they coincide
  (output_padding 0 and 0 < k - 2 * padding <= stride), VALID where padding is 0 (output_padding as the output's
  extra rows), else VALID and a SLICE of PyTorch's window.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.converters.tflite_flatbuffer import Quant, fb
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.conv_transpose import dense, dilated
from mdeploy.graph.ir import Activation, ConvTransposeAttrs, Node, Op, OpRegistry, ResizeAttrs
from mdeploy.graph.resize import repeats, source_indices
from mdeploy.quantize.params import quantize_bias

B = fb.BuiltinOperator
O = fb.BuiltinOptions
ACT = fb.ActivationFunctionType

# Operator versions (fp32, int8) as TensorFlow's converter writes them; RESIZE_BILINEAR with half-pixel centres and
# RESIZE_NEAREST_NEIGHBOR with half-pixel centres or aligned corners are version 3, TRANSPOSE_CONV with a bias 3, with
# a fused activation 4 (``version`` at the call).
DENSE_VERSIONS: dict[int, tuple[int, int]] = {
    B.RESIZE_BILINEAR: (1, 2), B.RESIZE_NEAREST_NEIGHBOR: (1, 2), B.CONCATENATION: (1, 2), B.GATHER: (1, 2),
    B.SLICE: (1, 2), B.TRANSPOSE_CONV: (3, 3),
}
CONCAT_MAX_INPUTS = 4  # XNNPACK (LiteRT 2.3) delegates a CONCATENATION of at most 4 inputs
Translator = Any  # mdeploy.converters.tflite_ops.Translator (which imports this module)
DENSE_EMITTERS: OpRegistry[Callable[[Translator, Node], None]] = OpRegistry()
emits = DENSE_EMITTERS.register


def _where(node: Node) -> str:
    return node.source or node.name


# -- resize --------------------------------------------------------------------------------------------------
@emits(Op.RESIZE)
def resize(t: Translator, node: Node) -> None:
    a = node.attrs
    assert isinstance(a, ResizeAttrs)
    x = t.input(node)
    in_size = t.b.shape(x)[1:3]
    quant = t._input_quant(node)
    factors = repeats(a, in_size)
    if a.mode == "bilinear":
        if a.scales is not None:
            raise UnsupportedOpError(
                f"the TFLite target cannot resize {in_size} -> {a.size} at {_where(node)} as PyTorch does: "
                f"F.interpolate samples with scale_factor {a.scales} (not recomputed; in * scale is not a whole "
                "size) and TFLite's RESIZE_BILINEAR by the sizes: pass size=... or recompute_scale_factor=True")
        _resize_op(t, node, x, B.RESIZE_BILINEAR, a.align_corners, not a.align_corners)
    elif factors is not None and _repeatable(factors):
        _repeat(t, node, x, factors, quant)
    elif a.scales is None:
        _resize_op(t, node, x, B.RESIZE_NEAREST_NEIGHBOR, False, a.mode == "nearest-exact")
    else:
        rows, columns = source_indices(a, in_size)
        n, _, w, c = t.b.shape(x)
        y = _gather(t, node, x, rows, 1, t.temp(node, "rows", (n, len(rows), w, c), quant))
        _gather(t, node, y, columns, 2, t.output(node, quant))


def _resize_op(t: Translator, node: Node, x: str, code: int, align_corners: bool, half_pixel: bool) -> None:
    a = node.attrs
    options = fb.ResizeBilinearOptionsT() if code == B.RESIZE_BILINEAR else fb.ResizeNearestNeighborOptionsT()
    options.alignCorners, options.halfPixelCenters = align_corners, half_pixel
    options_type = O.ResizeBilinearOptions if code == B.RESIZE_BILINEAR else O.ResizeNearestNeighborOptions
    size = t.b.constant(f"{node.name}/size", np.array(a.size, np.int32))
    flagged = half_pixel or (align_corners and code == B.RESIZE_NEAREST_NEIGHBOR)
    t.op(code, [x, size], t.output(node, t._input_quant(node)), options, options_type, version=3 if flagged else None)


def _repeatable(factors: tuple[int, int]) -> bool:
    """Whether the repetition is CONCATENATIONs of at most CONCAT_MAX_INPUTS copies (what XNNPACK takes)."""
    return factors != (1, 1) and max(_small_factors(factors[0]) + _small_factors(factors[1])) <= CONCAT_MAX_INPUTS


def _small_factors(factor: int) -> list[int]:
    """``factor`` as a product of factors up to CONCAT_MAX_INPUTS where it can be (4s first), else its primes."""
    parts, rest = [], factor
    for p in (4, 3, 2):
        while rest % p == 0:
            parts.append(p)
            rest //= p
    return parts + ([rest] if rest > 1 else []) or [1]


def _repeat(t: Translator, node: Node, x: str, factors: tuple[int, int], quant: Any) -> None:
    """Each sample repeated fh x fw times: per factor f of the width, f copies joined on the channels read as f times
    the width; per factor of the height, f copies joined on the width read as f times the height."""
    steps = [(f, True) for f in _small_factors(factors[1]) if f > 1]
    steps += [(f, False) for f in _small_factors(factors[0]) if f > 1]
    for i, (f, width) in enumerate(steps):
        n, h, w, c = t.b.shape(x)
        options = fb.ConcatenationOptionsT()
        options.axis = 3 if width else 2  # NHWC: copies side by side on the channels, or on the width
        joined = (n, h, w, f * c) if width else (n, h, f * w, c)
        y = t.op(B.CONCATENATION, [x] * f, t.temp(node, f"copies{i}", joined, quant), options,
                 O.ConcatenationOptions)
        shape = (n, h, w * f, c) if width else (n, h * f, w, c)
        last = i == len(steps) - 1
        x = _reshape(t, node, y, shape, t.output(node, quant) if last else t.temp(node, f"repeated{i}", shape, quant))


def _reshape(t: Translator, node: Node, x: str, shape: tuple[int, ...], out: str) -> str:
    options = fb.ReshapeOptionsT()
    options.newShape = np.array(shape, np.int32)
    return t.op(B.RESHAPE, [x, t.b.constant(f"{out}/shape", np.array(shape, np.int32))], out, options,
                O.ReshapeOptions)


def _gather(t: Translator, node: Node, x: str, indices: np.ndarray, axis: int, out: str) -> str:
    options = fb.GatherOptionsT()
    options.axis = axis
    index = t.b.constant(f"{out}/indices", indices.astype(np.int32))
    return t.op(B.GATHER, [x, index], out, options, O.GatherOptions)


# -- transposed convolution ------------------------------------------------------------------------------------
@emits(Op.CONV_TRANSPOSE)
def conv_transpose(t: Translator, node: Node) -> None:
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    x = t.input(node)
    n, h, w, _ = t.b.shape(x)
    weight, bias = _weight_and_bias(t, node)
    kernel = t.b.shape(weight)[1:3]
    full = [(size - 1) * s + k for size, s, k in zip((h, w), a.stride, kernel)]  # VALID's output
    out = list(t.graph.shapes[node.output][2:])
    channels = t.graph.shapes[node.output][1]
    options = fb.TransposeConvOptionsT()
    options.strideH, options.strideW = a.stride
    options.fusedActivationFunction = {Activation.NONE: ACT.NONE, Activation.RELU: ACT.RELU,
                                       Activation.RELU6: ACT.RELU6}[node.activation]
    version = 3 if node.activation is Activation.NONE else 4
    crop = None
    if a.padding == (0, 0):  # output_padding: VALID's extra rows (bias only)
        options.padding, shape = fb.Padding.VALID, out
    elif a.output_padding == (0, 0) and all(0 < k - 2 * p <= s for k, p, s in zip(kernel, a.padding, a.stride)):
        options.padding, shape = fb.Padding.SAME, out  # SAME's pad before: ((in - 1) * s + k - out) // 2 = padding
    else:
        options.padding = fb.Padding.VALID
        shape = [f + max(op - p, 0) for f, op, p in zip(full, a.output_padding, a.padding)]
        crop = a.padding
    quant = t.tq(node.output) if t.is_int8(node) else None
    output_shape = t.b.constant(f"{node.name}/output_shape", np.array([n, *shape, channels], np.int32))
    y = t.output(node) if crop is None else t.temp(node, "uncropped", (n, *shape, channels), quant)
    t.op(B.TRANSPOSE_CONV, [output_shape, weight, x, bias], y, options, O.TransposeConvOptions, version=version)
    if crop is not None:
        begin = t.b.constant(f"{node.name}/begin", np.array([0, *crop, 0], np.int32))
        size = t.b.constant(f"{node.name}/size", np.array([n, *out, channels], np.int32))
        t.op(B.SLICE, [y, begin, size], t.output(node))


def _weight_and_bias(t: Translator, node: Node) -> tuple[str, str]:
    """Filter (O, KH, KW, I), one group, dilation 1, and bias: int8 per output channel + int32, or float32."""
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)

    def layout(values: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(dilated(dense(values, a.groups), a.dilation).transpose(0, 2, 3, 1))

    if not t.is_int8(node):
        return (t.b.constant(f"{node.name}/weight", layout(node.weight).astype(np.float32)),
                t.b.constant(f"{node.name}/bias", node.bias.astype(np.float32)))
    wq = t.quantized.weights[node.name]
    scale = wq.scale.astype(np.float32)
    if not np.all(np.isfinite(scale) & (scale > 0)):
        raise UnsupportedOpError(f"weight scales of {_where(node)} must be positive and finite")
    zeros = (0,) * len(scale)
    weight = t.b.constant(f"{node.name}/weight", layout(wq.values.astype(np.int8)), Quant(tuple(scale), zeros, 0))
    s_in = t.tq(node.inputs[0]).scale
    codes = quantize_bias(node.bias, s_in, wq.scale)
    if np.abs(codes.astype(np.int64)).max(initial=0) >= np.iinfo(np.int32).max:
        raise UnsupportedOpError(f"the int32 bias of {_where(node)} overflows: weight scales too small")
    bias_scale = (np.float64(s_in) * wq.scale.astype(np.float64)).astype(np.float32)
    bias = t.b.constant(f"{node.name}/bias", codes.astype(np.int32), Quant(tuple(bias_scale), zeros, 0))
    return weight, bias
