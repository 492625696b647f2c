"""TFLite emitters of SILU, GELU, LEAKY_RELU, PRELU and AFFINE. ``tflite_ops`` merges ``ACTIVATION_EMITTERS`` (and the
operator versions) into its tables; each function takes that module's ``Translator`` as ``t``.

Forms chosen so that XNNPACK (LiteRT's CPU delegate) keeps int8 graphs in one partition (measured with
``tflite_report.xnnpack_partitions`` in tests/test_ops_activations.py; ai-edge-litert 2.3 delegates int8 LOGISTIC,
MUL, ADD, DEPTHWISE_CONV_2D, RESHAPE and LEAKY_RELU, but not int8 PRELU):

- SILU is LOGISTIC -> MUL(x, .), as TensorFlow's converter writes it (TFLite has no SiLU op); in int8 the LOGISTIC
  writes the fixed grid its kernel demands (scale 1/256, zero point -128, ``policy.PROBABILITY_GRID``);
- GELU is GELU (``GeluOptions.approximate`` for the tanh form; versions 1 fp32, 2 int8, as TensorFlow 2.21 writes
  them) in fp32, which XNNPACK takes. XNNPACK refuses int8 GELU (a partition on each side, measured), so in int8
  it is ``x * sigmoid(z)``, z = 2 sqrt(2 / pi) (x + 0.044715 x^3) (the tanh form, within 5e-4 of the erf form),
  written as MUL, MUL, ADD, MUL, LOGISTIC, MUL on int8 grids (``_gelu_int8``; about 1 dB below one rounding);
- LEAKY_RELU is LEAKY_RELU. XNNPACK takes it in int8 when input/output scale ratios stay within its limits
  (``slope * s_in / s_out >= 1/256``: a slope of 0.01 with an output grid 4x coarser than the input's is refused);
- PRELU is PRELU in fp32, LEAKY_RELU when every channel has the same slope, else, in int8,
  ``slope[c] * x + relu((1 - slope[c]) * x)`` as two 1x1 DEPTHWISE_CONV_2D (the second with a fused RELU) and an
  ADD: exact per-channel weights (one tap per channel), each intermediate on its own grid (when a slope exceeds 1,
  ``(1 - slope) * relu(x)`` takes an ADD(x, 0; RELU) first);
- AFFINE (``x * scale[c] + shift[c]``) is a 1x1 DEPTHWISE_CONV_2D: int8 per-channel weights that hold each scale
  exactly and an int32 bias (``rounding.affine_weight_quant``). On an (N, C) tensor it runs between two RESHAPEs
  to (N, 1, 1, C) and back; on tensors of other ranks (attention's, in PyTorch's order) likewise with the channels
  moved last, or as stored when every channel has the same scale and shift (``q * scale``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.converters.tflite_attention import channels_last_operand, declare
from mdeploy.converters.tflite_flatbuffer import Quant, fb
from mdeploy.graph.ir import GeluAttrs, LeakyReluAttrs, Node, Op, OpRegistry
from mdeploy.quantize.params import TensorQuant
from mdeploy.quantize.policy import PROBABILITY_GRID
from mdeploy.quantize.rounding import affine_weight_quant

B = fb.BuiltinOperator
O = fb.BuiltinOptions
ACT = fb.ActivationFunctionType

# Operator versions (fp32, int8) as TensorFlow's converter writes them.
ACTIVATION_VERSIONS: dict[int, tuple[int, int]] = {B.LEAKY_RELU: (1, 2), B.PRELU: (1, 1), B.GELU: (1, 2)}
Translator = Any  # mdeploy.converters.tflite_ops.Translator (which imports this module)
ACTIVATION_EMITTERS: OpRegistry[Callable[[Translator, Node], None]] = OpRegistry()
emits = ACTIVATION_EMITTERS.register


@emits(Op.SILU)
def silu(t: Translator, node: Node) -> None:
    x = t.input(node)
    gate = t.op(B.LOGISTIC, [x], t.temp(node, "sigmoid", t.b.shape(x), PROBABILITY_GRID if t.is_int8(node) else None))
    t.op(B.MUL, [x, gate], t.output(node), fb.MulOptionsT(), O.MulOptions)


GELU_K = 2.0 * np.sqrt(2.0 / np.pi)  # 0.5 (1 + tanh(a)) = sigmoid(2 a): gelu(x) ~ x sigmoid(K (x + 0.044715 x^3))
GELU_SQUARE_LIMIT = 4.0  # |x| beyond which the int8 form saturates x^2 (sigmoid(K 4 (1 + 0.044715 16)) ~ 1 - 2e-5)
GELU_Z_LIMIT = 8.0  # the sigmoid's argument saturates at +-8 (sigmoid(8) = 1 - 3.4e-4)


@emits(Op.GELU)
def gelu(t: Translator, node: Node) -> None:
    assert isinstance(node.attrs, GeluAttrs)
    x = t.input(node)
    if t.is_int8(node):
        _gelu_int8(t, node, x)
        return
    options = fb.GeluOptionsT()
    options.approximate = node.attrs.approximate == "tanh"
    t.op(B.GELU, [x], t.output(node), options, O.GeluOptions)


def _gelu_int8(t: Translator, node: Node, x: str) -> None:
    """x * sigmoid(z), z = x (K + c^2 x^2), c^2 = 0.044715 K: MUL(x, c) -> MUL(u, u) -> ADD(., K) -> MUL(x, .) ->
    LOGISTIC -> MUL(x, .), every step an op XNNPACK takes in int8. The tanh form exactly (the erf form within 5e-4,
    far below an int8 step); u and z saturate on their grids (|x| <= 4, |z| <= 8), where the sigmoid is flat."""
    shape = t.b.shape(x)
    low, high = t.tq(node.inputs[0]).range
    c = float(np.sqrt(0.044715 * GELU_K))
    u_low, u_high = c * max(low, -GELU_SQUARE_LIMIT), c * min(high, GELU_SQUARE_LIMIT)
    v_high = max(u_low * u_low, u_high * u_high)
    mul = fb.MulOptionsT()
    u = t.op(B.MUL, [x, t.scalar(node, "c", c)], t.temp(node, "cx", shape, TensorQuant.from_range(u_low, u_high)),
             mul, O.MulOptions)
    v = t.op(B.MUL, [u, u], t.temp(node, "cx_squared", shape, TensorQuant.from_range(0.0, v_high)), mul,
             O.MulOptions)
    w_grid = TensorQuant.from_range(GELU_K, GELU_K + v_high)
    w = t.op(B.ADD, [v, t.scalar(node, "k", GELU_K)], t.temp(node, "slope", shape, w_grid), fb.AddOptionsT(),
             O.AddOptions)
    w_high = w_grid.range[1]
    z_grid = TensorQuant.from_range(max(low * w_high, -GELU_Z_LIMIT), min(high * w_high, GELU_Z_LIMIT))
    z = t.op(B.MUL, [x, w], t.temp(node, "z", shape, z_grid), mul, O.MulOptions)
    gate = t.op(B.LOGISTIC, [z], t.temp(node, "sigmoid", shape, PROBABILITY_GRID))
    t.op(B.MUL, [x, gate], t.output(node), mul, O.MulOptions)


def _leaky(t: Translator, node: Node, x: str, slope: float) -> None:
    options = fb.LeakyReluOptionsT()
    options.alpha = slope
    t.op(B.LEAKY_RELU, [x], t.output(node), options, O.LeakyReluOptions)


@emits(Op.LEAKY_RELU)
def leaky_relu(t: Translator, node: Node) -> None:
    assert isinstance(node.attrs, LeakyReluAttrs)
    _leaky(t, node, t.input(node), node.attrs.negative_slope)


def _grid(t: Translator, node: Node, low: np.ndarray, high: np.ndarray) -> TensorQuant | None:
    """int8 grid over every channel's [low, high] (None for a float node)."""
    return TensorQuant.from_range(float(np.min(low)), float(np.max(high))) if t.is_int8(node) else None


def _depthwise(t: Translator, node: Node, role: str, x: str, x_grid: TensorQuant | None, scale: np.ndarray,
               shift: np.ndarray, out: str, activation: int = ACT.NONE) -> str:
    """``x * scale[c] + shift[c]`` (then ``activation``) as a 1x1 DEPTHWISE_CONV_2D on an NHWC map ``x`` (int8:
    on ``x_grid``)."""
    channels = scale.size
    if x_grid is not None:
        s_in = x_grid.scale
        wq, bias_q = affine_weight_quant(scale, shift, s_in)
        zeros = (0,) * channels
        weight = t.b.constant(f"{node.name}/{role}_weight", wq.values.reshape(1, 1, 1, channels),
                              Quant(tuple(wq.scale.astype(np.float32)), zeros, 3))
        bias_scale = (np.float64(s_in) * wq.scale.astype(np.float64)).astype(np.float32)
        bias = t.b.constant(f"{node.name}/{role}_bias", bias_q.astype(np.int32), Quant(tuple(bias_scale), zeros, 0))
    else:
        weight = t.b.constant(f"{node.name}/{role}_weight", scale.astype(np.float32).reshape(1, 1, 1, channels))
        bias = t.b.constant(f"{node.name}/{role}_bias", shift.astype(np.float32))
    options = fb.DepthwiseConv2DOptionsT()
    options.padding = fb.Padding.VALID
    options.strideH = options.strideW = options.dilationHFactor = options.dilationWFactor = 1
    options.depthMultiplier = 1
    options.fusedActivationFunction = activation
    return t.op(B.DEPTHWISE_CONV_2D, [x, weight, bias], out, options, O.DepthwiseConv2DOptions)


def _reshape(t: Translator, node: Node, role: str, x: str, shape: tuple[int, ...], out: str) -> str:
    new_shape = np.array([-1, *shape[1:]], np.int32)
    options = fb.ReshapeOptionsT()
    options.newShape = new_shape
    return t.op(B.RESHAPE, [x, t.b.constant(f"{node.name}/{role}_shape", new_shape)], out, options,
                O.ReshapeOptions)


def _per_channel(t: Translator, node: Node, body: Callable[[str, str, TensorQuant | None], None],
                 any_order: bool = False) -> None:
    """Runs ``body(x, out, x_grid)`` on a 4-D map whose last axis holds PyTorch's axis 1, the channels (NHWC; a
    tensor of another rank in PyTorch's order with axis 1 moved last, ``tflite_attention``); any rank but 4 is
    reshaped to (M, 1, 1, C) and back. ``any_order``: every channel is treated alike, the input is read as stored."""
    x, order = channels_last_operand(t, node, any_order)
    shape = t.b.shape(x)
    x_grid = t.tq(node.inputs[0]) if t.is_int8(node) else None
    if len(shape) == 4:
        body(x, declare(t, node, shape, order), x_grid)
        return
    map_shape = (shape[0], 1, 1, shape[-1]) if len(shape) == 2 else (int(np.prod(shape[:-1])), 1, 1, shape[-1])
    x_map = _reshape(t, node, "as_map", x, map_shape, t.temp(node, "as_map", map_shape, x_grid))
    out_map = t.temp(node, "map", map_shape, t.tq(node.output) if t.is_int8(node) else None)
    body(x_map, out_map, x_grid)
    _reshape(t, node, "from_map", out_map, shape, declare(t, node, shape, order))


@emits(Op.AFFINE)
def affine(t: Translator, node: Node) -> None:
    scale, shift = node.params["scale"], node.params["shift"]
    uniform = bool(np.all(scale == scale[0]) and np.all(shift == shift[0]))  # attention's q * scale, in any order

    def body(x: str, out: str, grid: TensorQuant | None) -> None:
        channels = t.b.shape(x)[-1]
        if channels != scale.size:  # uniform: one tap per stored channel
            _depthwise(t, node, "affine", x, grid, np.full(channels, scale[0]), np.full(channels, shift[0]), out)
        else:
            _depthwise(t, node, "affine", x, grid, scale, shift, out)

    _per_channel(t, node, body, any_order=uniform)


@emits(Op.PRELU)
def prelu(t: Translator, node: Node) -> None:
    slope = node.params["slope"].astype(np.float64)
    if np.all(slope == slope[0]):
        _leaky(t, node, t.input(node), float(slope[0]))
    elif not t.is_int8(node):
        x, order = channels_last_operand(t, node)
        shape = t.b.shape(x)
        alpha = slope.astype(np.float32).reshape((1,) * (len(shape) - 2) + (-1,))  # along the last axis
        t.op(B.PRELU, [x, t.b.constant(f"{node.name}/slope", alpha)], declare(t, node, shape, order))
    else:
        _per_channel(t, node, lambda x, out, grid: _prelu_int8(t, node, slope, x, out, grid))


def _prelu_int8(t: Translator, node: Node, slope: np.ndarray, x: str, out: str, grid: TensorQuant | None) -> None:
    assert grid is not None
    low, high = grid.range
    shape = t.b.shape(x)
    zero = np.zeros_like(slope)
    linear = t.temp(node, "slope_x", shape, _grid(t, node, np.minimum(slope * low, slope * high),
                                                   np.maximum(slope * low, slope * high)))
    _depthwise(t, node, "slope", x, grid, slope, zero, linear)
    rest = 1.0 - slope  # (1 - slope) * relu(x)
    rest_grid = _grid(t, node, np.minimum(rest * max(high, 0.0), 0.0), np.maximum(rest * max(high, 0.0), 0.0))
    positive = t.temp(node, "rest_relu", shape, rest_grid)
    if np.all(rest >= 0):  # relu((1 - slope) x) = (1 - slope) relu(x)
        _depthwise(t, node, "rest", x, grid, rest, zero, positive, ACT.RELU)
    else:
        options = fb.AddOptionsT()
        options.fusedActivationFunction = ACT.RELU
        relu_grid = TensorQuant.from_range(0.0, max(high, 0.0))
        relu = t.temp(node, "relu", shape, relu_grid)
        t.op(B.ADD, [x, t.scalar(node, "zero", 0.0, grid.scale)], relu, options, O.AddOptions)
        _depthwise(t, node, "rest", relu, relu_grid, rest, zero, positive)
    t.op(B.ADD, [linear, positive], out, fb.AddOptionsT(), O.AddOptions)
