"""TFLite emitters of the IR ops that move channels and windows: CONCAT, MAX_POOL, AVG_POOL, CHANNEL_SHUFFLE,
SLICE. ``tflite_ops`` merges ``STRUCTURE_EMITTERS`` (and the operator versions) into its tables; each function
takes that module's ``Translator`` as ``t``.

Forms chosen for XNNPACK (LiteRT's CPU delegate; tests/test_ops_structure.py counts partitions):

- CONCAT is CONCATENATION on its axis as stored (NHWC's 3 for the channels of a map; inputs that RESHAPE/TRANSPOSE
  left in another order are joined in that order when they share it); above CONCAT_MAX_INPUTS inputs (SSD's six
  heads), which XNNPACK refuses in one, a chain of them. int8 kernels want every input on the output's grid: the
  quantiser gives inputs that grid where it can (``policy.inputs_take_output_grid``); any other input is
  requantised with an int8 -> int8 QUANTIZE first, the rounding the quantiser simulates.
- MAX_POOL is MAX_POOL_2D: VALID; SAME when PyTorch's windows are SAME's (TFLite's SAME max pool ignores the
  padding); after a PAD where the input cannot be negative (a ReLU before it; in int8 a zero point of -128), as
  zero is then the lowest value; else after a PADV2 with the lowest value (-128 in int8, float32's lowest in fp32),
  so padding never wins. XNNPACK (LiteRT 2.3) does not take PADV2: that last form costs a second partition.
- AVG_POOL is a DEPTHWISE_CONV_2D with every weight 1 / (kh * kw) over the zero-padded input (int8: weight code 127
  per channel, an exact mean) - XNNPACK refuses int8 AVERAGE_POOL_2D - and, where PyTorch divides by something else
  (``count_include_pad=False``, ``ceil_mode``, ``divisor_override``), a MUL by the constant correction map of
  ``mdeploy.graph.pooling`` (int8: codes on a power-of-two grid, so a correction of 1 is exact).
- CHANNEL_SHUFFLE is RESHAPE (.., g, C/g) -> TRANSPOSE -> RESHAPE; SLICE is SLICE on the channel axis. Both move
  int8 codes on the input's grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.converters.tflite_attention import arrange, canonical_order, declare, operand, stored_shape
from mdeploy.converters.tflite_dense import CONCAT_MAX_INPUTS
from mdeploy.converters.tflite_flatbuffer import Quant, fb
from mdeploy.graph.ir import Graph, Node, Op, OpRegistry, PoolAttrs, ShuffleAttrs, SliceAttrs, concat_axis
from mdeploy.graph.pooling import pool_geometry
from mdeploy.quantize.params import TensorQuant
from mdeploy.quantize.policy import policy_of

B = fb.BuiltinOperator
O = fb.BuiltinOptions

# Operator versions (fp32, int8) as TensorFlow's converter writes them (TRANSPOSE of rank 5: version 4).
STRUCTURE_VERSIONS: dict[int, tuple[int, int]] = {
    B.CONCATENATION: (1, 2), B.MAX_POOL_2D: (1, 2), B.PADV2: (1, 2), B.SLICE: (1, 2),
}
Translator = Any  # mdeploy.converters.tflite_ops.Translator (which imports this module)
STRUCTURE_EMITTERS: OpRegistry[Callable[[Translator, Node], None]] = OpRegistry()
emits = STRUCTURE_EMITTERS.register


@emits(Op.CONCAT)
def concat(t: Translator, node: Node) -> None:
    shape = t.graph.shapes[node.output]
    order = _concat_order(t, node)
    canonical = order == canonical_order(len(shape))
    if canonical:
        xs = [t.input(node, i) for i in range(len(node.inputs))]
    else:  # every input stored in one other order (rank 3 and up, left by RESHAPE/TRANSPOSE): joined as stored
        xs = [arrange(t, *operand(t, node, i), order, node.inputs[i]) for i in range(len(node.inputs))]
    if t.is_int8(node):
        grid = t.tq(node.output)
        for i, name in enumerate(node.inputs):
            if t.tq(name) != grid:  # an input that could not take the concat's grid: requantised to it
                xs[i] = t.op(B.QUANTIZE, [xs[i]], t.temp(node, f"input{i}_requantized", t.b.shape(xs[i]), grid))
    out = (lambda: t.output(node)) if canonical else (lambda: declare(t, node, stored_shape(shape, order), order))
    _concatenation(t, node, xs, out, order[concat_axis(node)])  # a map's channels in NHWC: axis 3


def _concat_order(t: Translator, node: Node) -> tuple[int, ...]:
    """The order to join ``node``'s inputs in: the one they are all stored in, else the canonical layout."""
    rank = len(t.graph.shapes[node.output])
    orders = {t.order.get(name, canonical_order(rank)) for name in node.inputs}
    return orders.pop() if len(orders) == 1 else canonical_order(rank)


def _concatenation(t: Translator, node: Node, xs: list[str], out: Callable[[], str], axis: int) -> None:
    """CONCATENATION along stored ``axis`` into ``out()`` (declared last); more than CONCAT_MAX_INPUTS inputs (SSD's
    six heads), which XNNPACK refuses in one, as a chain of CONCATENATIONs of at most that many (int8: the pieces
    on the output's grid, codes moved)."""
    options = fb.ConcatenationOptionsT()
    options.axis = axis
    step = 0
    while len(xs) > CONCAT_MAX_INPUTS:  # the first inputs joined into one, until few enough remain
        group = xs[:CONCAT_MAX_INPUTS]
        shape = list(t.b.shape(group[0]))
        shape[axis] = sum(t.b.shape(x)[axis] for x in group)
        quant = t.tq(node.output) if t.is_int8(node) else None
        piece = t.temp(node, f"joined{step}", tuple(shape), quant)
        joined = t.op(B.CONCATENATION, group, piece, options, O.ConcatenationOptions)
        xs, step = [joined, *xs[CONCAT_MAX_INPUTS:]], step + 1
    t.op(B.CONCATENATION, xs, out(), options, O.ConcatenationOptions)


def _pool_options(attrs: PoolAttrs, padding: int) -> Any:
    options = fb.Pool2DOptionsT()
    options.padding = padding
    options.strideH, options.strideW = attrs.stride
    options.filterHeight, options.filterWidth = attrs.kernel
    return options


def _same_pads(size: tuple[int, int], attrs: PoolAttrs) -> tuple[int, int, int, int]:
    pads: list[int] = []
    for i, k, s in zip(size, attrs.kernel, attrs.stride, strict=True):
        total = max((-(-i // s) - 1) * s + k - i, 0)
        pads += [total // 2, total - total // 2]
    return tuple(pads)  # type: ignore[return-value]


@emits(Op.MAX_POOL)
def max_pool(t: Translator, node: Node) -> None:
    attrs = node.attrs
    assert isinstance(attrs, PoolAttrs)
    x = t.input(node)
    _, h, w, c = t.b.shape(x)
    geometry = pool_geometry(attrs, (h, w), average=False)
    padding = fb.Padding.VALID
    quant = t._input_quant(node)
    if geometry.padded and geometry.pads == _same_pads((h, w), attrs):
        padding = fb.Padding.SAME  # TFLite's SAME max pool ignores the padding, as PyTorch's -inf does
    elif geometry.padded and (quant.zero_point == -128 if quant is not None else _non_negative(t.graph, node.inputs[0])):
        x = t.pad_op(node, x, geometry.pads)  # zero is the lowest value (int8: the zero point is code -128)
    elif geometry.padded:  # PADV2 runs outside XNNPACK (LiteRT 2.3): a second partition
        top, bottom, left, right = geometry.pads
        lowest = (t.b.constant(f"{node.name}/lowest", np.array(-128, np.int8), Quant.per_tensor(quant.scale,
                                                                                                 quant.zero_point))
                  if quant is not None else t.b.constant(f"{node.name}/lowest", np.array(np.finfo(np.float32).min,
                                                                                         np.float32)))
        paddings = t.b.constant(f"{node.name}/paddings",
                                np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32))
        padded = t.temp(node, "padded", (1, h + top + bottom, w + left + right, c), quant)
        x = t.op(B.PADV2, [x, paddings, lowest], padded)
    t.op(B.MAX_POOL_2D, [x], t.output(node), _pool_options(attrs, padding), O.Pool2DOptions)


def _non_negative(graph: Graph, tensor: str) -> bool:
    """Whether ``tensor`` is >= 0 by construction (a ReLU, ReLU6, clip at >= 0, sigmoid; through ops that move values)."""
    producer = graph.producer(tensor)
    if producer is None:
        return False
    if policy_of(producer.op).shares_input_grid:
        return _non_negative(graph, producer.inputs[0])
    bounds = policy_of(producer.op).output_range(producer)
    return bounds is not None and bounds[0] >= 0


@emits(Op.AVG_POOL)
def avg_pool(t: Translator, node: Node) -> None:
    attrs = node.attrs
    assert isinstance(attrs, PoolAttrs)
    x = t.input(node)
    _, h, w, c = t.b.shape(x)
    geometry = pool_geometry(attrs, (h, w), average=True)
    if geometry.padded:
        x = t.pad_op(node, x, geometry.pads)  # zeros (the zero point in int8)
    kh, kw = attrs.kernel
    mean = 1.0 / (kh * kw)
    int8 = t.is_int8(node)
    if int8:
        s_in = t.tq(node.inputs[0]).scale
        w_scale = np.full(c, mean / 127.0, np.float32)
        zeros = (0,) * c
        weight = t.b.constant(f"{node.name}/weight", np.full((1, kh, kw, c), 127, np.int8),
                              Quant(tuple(w_scale), zeros, 3))
        bias_scale = (np.float64(s_in) * w_scale.astype(np.float64)).astype(np.float32)
        bias = t.b.constant(f"{node.name}/bias", np.zeros(c, np.int32), Quant(tuple(bias_scale), zeros, 0))
    else:
        weight = t.b.constant(f"{node.name}/weight", np.full((1, kh, kw, c), mean, np.float32))
        bias = t.b.constant(f"{node.name}/bias", np.zeros(c, np.float32))
    options = fb.DepthwiseConv2DOptionsT()
    options.padding = fb.Padding.VALID
    options.strideH, options.strideW = attrs.stride
    options.depthMultiplier = 1
    options.dilationHFactor = options.dilationWFactor = 1
    out_shape = (1, *geometry.out, c)
    quant = t.tq(node.output) if int8 else None
    summed = t.output(node) if geometry.correction is None else t.temp(node, "window_mean", out_shape, quant)
    t.op(B.DEPTHWISE_CONV_2D, [x, weight, bias], summed, options, O.DepthwiseConv2DOptions)
    if geometry.correction is None:
        return
    correction = geometry.correction.reshape(1, *geometry.out, 1)
    scale = 0.0
    if int8:  # a power-of-two scale: the interior's 1 (and halves, quarters) are exact
        scale = 2.0 ** -np.floor(np.log2(127.0 / correction.max()))
        factor = t.b.constant(f"{node.name}/correction", np.round(correction / scale).astype(np.int8),
                              Quant.per_tensor(float(scale), 0))
    else:
        factor = t.b.constant(f"{node.name}/correction", correction.astype(np.float32))
    version = 3 if int8 and scale >= 1.0 else None  # an int8 rescale of 1 or more
    t.op(B.MUL, [summed, factor], t.output(node), fb.MulOptionsT(), O.MulOptions, version=version)


def _reshape(t: Translator, node: Node, x: str, shape: tuple[int, ...], out: str) -> str:
    options = fb.ReshapeOptionsT()
    options.newShape = np.array(shape, np.int32)
    return t.op(B.RESHAPE, [x, t.b.constant(f"{out}/shape", np.array(shape, np.int32))], out, options,
                O.ReshapeOptions)


@emits(Op.CHANNEL_SHUFFLE)
def channel_shuffle(t: Translator, node: Node) -> None:
    attrs = node.attrs
    assert isinstance(attrs, ShuffleAttrs)
    x = t.input(node)
    n, h, w, c = t.b.shape(x)
    g = attrs.groups
    quant: TensorQuant | None = t._input_quant(node)
    grouped = _reshape(t, node, x, (n, h, w, g, c // g), t.temp(node, "grouped", (n, h, w, g, c // g), quant))
    perm = t.b.constant(f"{node.name}/perm", np.array([0, 1, 2, 4, 3], np.int32))
    swapped = t.op(B.TRANSPOSE, [grouped, perm], t.temp(node, "swapped", (n, h, w, c // g, g), quant),
                   version=4)  # rank 5
    _reshape(t, node, swapped, (n, h, w, c), t.output(node, quant))


@emits(Op.SLICE)
def channel_slice(t: Translator, node: Node) -> None:
    attrs = node.attrs
    assert isinstance(attrs, SliceAttrs)
    x = t.input(node)
    n, h, w, _ = t.b.shape(x)
    begin = t.b.constant(f"{node.name}/begin", np.array([0, 0, 0, attrs.start], np.int32))
    size = t.b.constant(f"{node.name}/size", np.array([n, h, w, attrs.end - attrs.start], np.int32))
    t.op(B.SLICE, [x, begin, size], t.output(node, t._input_quant(node)))
