"""IR -> TFLite operators in NHWC, one small function per IR op, for fp32 and full-int8 graphs.

The flatbuffer is written directly (no Keras, no TFLiteConverter), so the int8 graph carries exactly the
quantiser's decisions: its rounded int8 weights, int32 biases, and every activation's scale and zero point. TFLite
tensors are named after the IR tensors they hold; helper tensors get ``<node>/<role>`` names.

Layout: activations are NHWC, conv filters OHWI, depthwise filters 1HWO, fully-connected weights (O, I). No
TRANSPOSE is emitted except for flattening a map larger than 1x1 that does not feed a LINEAR (a LINEAR reads the
NHWC-ordered flatten by permuting its weight columns instead), and around attention's ops, whose tensors are in
PyTorch's order (``tflite_attention``: where they are stored otherwise, ``Translator.order``).

int8 patterns chosen so that XNNPACK (LiteRT's CPU delegate) runs the whole graph in one partition. XNNPACK in
ai-edge-litert 2.3 refuses int8 HARD_SWISH, RELU, RELU6, RELU_N1_TO_1, MAXIMUM, MINIMUM, LEAKY_RELU,
AVERAGE_POOL_2D, SOFTMAX and uint8<->int8 QUANTIZE (each breaks the graph into separate partitions; see
``bench/tflite_latency.py --probe``), and takes int8 CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED (per-channel), ADD,
MUL (with broadcasting and fused activations), MEAN, PAD, RESHAPE, LOGISTIC, QUANTIZE and DEQUANTIZE. Hence:

- hardswish(x) = x * relu6(x + 3) / 6 is ADD(x, 3; fused RELU6) -> MUL(x, .) -> MUL(., 1/6): the product is kept
  at 6x the output's scale with the output's zero point, so the last MUL maps codes to themselves; the only new
  rounding is relu6(x + 3) on an int8 grid over [0, min(6, max(x) + 3)];
- hardsigmoid(x) = relu6(x + 3) / 6 is ADD(x, 3; fused RELU6) at 6x the output's scale, then MUL(., 1/6): exact;
- that MUL(., 1/6) costs a pass over the tensor for nothing, so it is written only where needed: a tensor read
  only by convs and linears (directly, or through squeeze-and-excitation's pool and product) stays stored at 6x,
  and its readers divide their weight scales by 6 (``Translator.scaled``), the same integer arithmetic;
- a standalone ReLU/ReLU6/clip(-1, 1) is ADD(x, 0) with that fused activation (requantising to its own range).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mdeploy.converters.tflite_activations import ACTIVATION_EMITTERS, ACTIVATION_VERSIONS
from mdeploy.converters.tflite_attention import ATTENTION_EMITTERS, ATTENTION_VERSIONS, to_canonical
from mdeploy.converters.tflite_dense import DENSE_EMITTERS, DENSE_VERSIONS
from mdeploy.converters.tflite_options import HardSwishMode, IOType, Options
from mdeploy.converters.tflite_flatbuffer import ModelBuilder, Quant, fb
from mdeploy.converters.tflite_structure import STRUCTURE_EMITTERS, STRUCTURE_VERSIONS
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.ir import Activation, ClipAttrs, ConvAttrs, Graph, Node, Op, OpRegistry, PadAttrs
from mdeploy.quantize.params import QuantizedGraph, TensorQuant, quantize_bias
from mdeploy.quantize.policy import policy_of
from mdeploy.types import INPUT_NAME

B = fb.BuiltinOperator
O = fb.BuiltinOptions
ACT = fb.ActivationFunctionType
FUSED = {Activation.NONE: ACT.NONE, Activation.RELU: ACT.RELU, Activation.RELU6: ACT.RELU6}

# Operator versions (fp32, int8) as TensorFlow 2.21's TFLiteConverter writes them for the same ops.
VERSIONS: dict[int, tuple[int, int]] = {
    B.CONV_2D: (1, 3), B.DEPTHWISE_CONV_2D: (1, 3), B.FULLY_CONNECTED: (1, 4), B.ADD: (1, 2), B.MUL: (1, 2),
    B.HARD_SWISH: (1, 1), B.LOGISTIC: (1, 2), B.MEAN: (1, 2), B.PAD: (1, 2), B.SOFTMAX: (1, 2),
    B.RESHAPE: (1, 1), B.TRANSPOSE: (1, 2), B.MAXIMUM: (1, 2), B.MINIMUM: (1, 2), B.RELU: (1, 2), B.RELU6: (1, 2),
    B.RELU_N1_TO_1: (1, 1), B.QUANTIZE: (1, 2), B.DEQUANTIZE: (1, 2),
}
INT32_MAX = np.iinfo(np.int32).max

Emitter = Callable[["Translator", Node], None]
# IR op -> its TFLite emitter (a Translator method): one per member of Op (tests/test_ops.py checks).
EMITTERS: OpRegistry[Emitter] = OpRegistry()
emits = EMITTERS.register
EMITTERS.update(STRUCTURE_EMITTERS)  # CONCAT, MAX_POOL, AVG_POOL, CHANNEL_SHUFFLE, SLICE
VERSIONS.update(STRUCTURE_VERSIONS)
EMITTERS.update(ACTIVATION_EMITTERS)  # SILU, GELU, LEAKY_RELU, PRELU, AFFINE
VERSIONS.update(ACTIVATION_VERSIONS)
EMITTERS.update(ATTENTION_EMITTERS)  # RESHAPE, TRANSPOSE, MATMUL, SOFTMAX (any rank; tensors in PyTorch's order)
VERSIONS.update(ATTENTION_VERSIONS)
EMITTERS.update(DENSE_EMITTERS)  # RESIZE, CONV_TRANSPOSE
VERSIONS.update(DENSE_VERSIONS)


def _quant(tq: TensorQuant) -> Quant:
    return Quant.per_tensor(tq.scale, tq.zero_point)


def flattened_in_nhwc_order(graph: Graph, node: Node) -> tuple[int, int, int] | None:
    """(C, H, W) when the TFLite graph flattens this FLATTEN's H x W > 1 map in NHWC order, with no TRANSPOSE: when
    only LINEARs read it (their weight columns are permuted instead); else None. The per-layer diagnosis reads the
    tensor back through the same rule."""
    shape = graph.shapes.get(node.inputs[0], ()) if node.op is Op.FLATTEN else ()
    if len(shape) != 4:
        return None
    _, c, h, w = shape
    consumers = graph.consumers(node.output)
    if node.output in graph.outputs:  # an app reads it: in PyTorch's order
        return None
    return (c, h, w) if h * w > 1 and consumers and all(n.op is Op.LINEAR for n in consumers) else None


def _nhwc(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[3], shape[1]) if len(shape) == 4 else tuple(shape)


class Translator:
    """Builds one TFLite subgraph from an IR graph and (for int8) its :class:`QuantizedGraph`."""

    def __init__(self, graph: Graph, quantized: QuantizedGraph | None, options: Options) -> None:
        if quantized is not None:
            graph = quantized.graph  # the quantiser's copy carries its corrected biases
        self.graph = graph
        self.quantized = quantized
        self.options = options
        self.b = ModelBuilder()
        self.value: dict[str, str] = {}  # IR tensor -> TFLite tensor holding it (int8 if quantised, else float)
        self.converted: dict[tuple[str, str], str] = {}  # (TFLite tensor, "int8"/"float") -> its conversion
        self.flat_nhwc: dict[str, tuple[int, int, int]] = {}  # flattened in NHWC order: IR tensor -> (C, H, W)
        # IR tensor -> its order when stored otherwise than NHWC (rank 4) / PyTorch's order (other ranks), and the
        # transposes written to read tensors in another order (tflite_attention)
        self.order: dict[str, tuple[int, ...]] = {}
        self.arranged: dict[tuple[str, tuple[int, ...]], str] = {}
        # IR tensor -> k when its int8 TFLite tensor holds k times its value: the same codes on a grid k times
        # coarser, a constant factor the CONV/LINEAR layers reading it absorb in their weight scales (``absorbs_factor``)
        self.scaled: dict[str, float] = {}

    # -- domains: each IR tensor lives in int8 (quantised graphs) or float ---------------------------------------
    def is_int8(self, node: Node) -> bool:
        return self.quantized is not None and node.name not in self.quantized.float_nodes

    def tq(self, tensor: str) -> TensorQuant:
        assert self.quantized is not None
        try:
            return self.quantized.activations[tensor]
        except KeyError:
            raise UnsupportedOpError(f"the int8 parameters have no scale for tensor {tensor!r}") from None

    def input(self, node: Node, i: int = 0) -> str:
        """The TFLite tensor holding ``node``'s i-th input in the node's own domain (converted if needed), in the
        canonical layout (NHWC for rank 4)."""
        name = node.inputs[i]
        return self.in_domain(node, name, self.canonical(name))

    def canonical(self, name: str) -> str:
        """IR tensor ``name`` stored as NHWC (rank 4) or in PyTorch's order (other ranks): a tensor that attention
        ops left in another order is transposed (``tflite_attention``)."""
        return self.value[name] if name not in self.order else to_canonical(self, name)

    def in_domain(self, node: Node, name: str, have: str) -> str:
        """``have`` (holding IR tensor ``name``) in ``node``'s domain: int8 or float, converted if needed."""
        want_int8 = self.is_int8(node)
        if (self.b.dtype(have) == np.int8) == want_int8:
            return have
        key = (have, "int8" if want_int8 else "float")
        if key not in self.converted:
            label = name if have == self.value[name] else have
            out = self.b.tensor(f"{label}/{key[1]}", self.b.shape(have), np.int8 if want_int8 else np.float32,
                                _quant(self.tq(name)) if want_int8 else None)
            self.op(B.QUANTIZE if want_int8 else B.DEQUANTIZE, [have], out, int8=not want_int8)
            self.converted[key] = out
        return self.converted[key]

    def output(self, node: Node, quant: TensorQuant | None = None, shape: tuple[int, ...] | None = None,
               name: str | None = None) -> str:
        """Declares the TFLite tensor for ``node``'s output (in the node's domain, with its IR quantisation), named
        after it unless ``name`` is given (a tensor stored in another order, ``tflite_attention.declare``)."""
        shape = shape or _nhwc(self.graph.shapes[node.output])
        if self.is_int8(node):
            name = self.b.tensor(name or node.output, shape, np.int8, _quant(quant or self.tq(node.output)))
        else:
            name = self.b.tensor(name or node.output, shape, np.float32)
        self.value[node.output] = name
        return name

    def temp(self, node: Node, role: str, shape: tuple[int, ...], quant: TensorQuant | None) -> str:
        if self.is_int8(node):
            assert quant is not None
            return self.b.tensor(f"{node.name}/{role}", shape, np.int8, _quant(quant))
        return self.b.tensor(f"{node.name}/{role}", shape, np.float32)

    def scalar(self, node: Node, role: str, value: float, zero_scale: float = 1.0) -> str:
        """A constant scalar operand: int8 with an exact grid (value = 127 * scale) or float. A zero takes
        ``zero_scale``: XNNPACK refuses an int8 ADD whose input scale is 256 times its output's or more."""
        if self.is_int8(node):
            if value == 0.0:
                return self.b.constant(f"{node.name}/{role}", np.array(0, np.int8), Quant.per_tensor(zero_scale, 0))
            scale = abs(value) / 127.0
            return self.b.constant(f"{node.name}/{role}", np.array(127 if value > 0 else -127, np.int8),
                                   Quant.per_tensor(scale, 0))
        return self.b.constant(f"{node.name}/{role}", np.array(value, np.float32))

    def op(self, code: int, inputs: list[str], output: str, options: object = None, options_type: int = 0,
           int8: bool | None = None, version: int | None = None) -> str:
        if int8 is None:
            int8 = self.b.dtype(inputs[0]) in (np.int8, np.uint8)
        self.b.op(code, version or VERSIONS[code][int8], inputs, [output], options, options_type)
        return output

    # -- one function per IR op (registered in EMITTERS) ---------------------------------------------------------
    @emits(Op.CONV)
    def conv(self, node: Node) -> None:
        attrs = node.attrs
        assert isinstance(attrs, ConvAttrs)
        x = self.input(node)
        _, c_in, h, w = self.graph.shapes[node.inputs[0]]
        c_out, per_group, kh, kw = node.weight.shape
        depthwise = attrs.groups == c_in and per_group == 1 and c_out % c_in == 0
        # other groups: CONV_2D reads them from the filter's depth (c_in / per_group); version 6 (TF 2.9+), which
        # LiteRT 2.3's builtin kernels and XNNPACK run in fp32 and int8 (tests/test_ops_structure.py)
        grouped = attrs.groups != 1 and not depthwise
        padding, explicit = _conv_padding(attrs, (h, w), (kh, kw))
        if explicit is not None:
            x = self.pad_op(node, x, explicit)
        weight, bias = self.weight_and_bias(node, depthwise)
        if depthwise:
            options: object = fb.DepthwiseConv2DOptionsT()
            options.depthMultiplier = c_out // c_in
            code, options_type = B.DEPTHWISE_CONV_2D, O.DepthwiseConv2DOptions
        else:
            options = fb.Conv2DOptionsT()
            code, options_type = B.CONV_2D, O.Conv2DOptions
        options.padding = padding
        options.strideH, options.strideW = attrs.stride
        options.dilationHFactor, options.dilationWFactor = attrs.dilation
        options.fusedActivationFunction = FUSED[node.activation]
        dilated_float = depthwise and not self.is_int8(node) and attrs.dilation != (1, 1)
        version = 6 if grouped else 2 if dilated_float else None
        self.op(code, [x, weight, bias], self.output(node), options, options_type, version=version)

    def weight_and_bias(self, node: Node, depthwise: bool = False) -> tuple[str, str]:
        """Filter in TFLite's layout and bias: int8 per-channel + int32, or float32."""
        weight = node.weight
        if node.op is Op.LINEAR:
            weight = self._linear_columns(node, weight)
        layout = (1, 2, 3, 0) if depthwise else (0, 2, 3, 1)  # OIHW -> 1HWO (depthwise) or OHWI
        axis = 3 if depthwise else 0
        if not self.is_int8(node):
            w = np.transpose(weight, layout) if weight.ndim == 4 else weight
            return (self.b.constant(f"{node.name}/weight", w.astype(np.float32)),
                    self.b.constant(f"{node.name}/bias", node.bias.astype(np.float32)))
        assert self.quantized is not None
        wq = self.quantized.weights[node.name]
        values = wq.values if node.op is Op.CONV else self._linear_columns(node, wq.values)
        values = np.transpose(values, layout) if values.ndim == 4 else values
        factor = self.scaled.get(node.inputs[0], 1.0)  # the input holds factor x its value: weights 1 / factor
        scale = (wq.scale.astype(np.float64) / factor).astype(np.float32)
        if not np.all(np.isfinite(scale) & (scale > 0)):
            raise UnsupportedOpError(f"weight scales of {node.source or node.name} must be positive and finite")
        zeros = (0,) * len(scale)
        w = self.b.constant(f"{node.name}/weight", values.astype(np.int8), Quant(tuple(scale), zeros, axis))
        s_in = self.tq(node.inputs[0]).scale  # the bias grid, s_in x weight scale, is the same either way
        bias_q = quantize_bias(node.bias, s_in, wq.scale)
        if np.abs(bias_q.astype(np.int64)).max(initial=0) >= INT32_MAX:
            raise UnsupportedOpError(f"the int32 bias of {node.source or node.name} overflows: weight scales too small")
        bias_scale = (np.float64(s_in) * wq.scale.astype(np.float64)).astype(np.float32)
        b = self.b.constant(f"{node.name}/bias", bias_q.astype(np.int32), Quant(tuple(bias_scale), zeros, 0))
        return w, b

    def _linear_columns(self, node: Node, weight: np.ndarray) -> np.ndarray:
        """A LINEAR reading a flatten kept in NHWC order gets its columns permuted from NCHW order to match."""
        if node.inputs[0] not in self.flat_nhwc:
            return weight
        c, h, w = self.flat_nhwc[node.inputs[0]]
        return weight.reshape(-1, c, h, w).transpose(0, 2, 3, 1).reshape(weight.shape[0], -1)

    @emits(Op.LINEAR)
    def linear(self, node: Node) -> None:
        x = self.input(node)
        if len(self.b.shape(x)) != 2:
            raise UnsupportedOpError(f"linear layer on a rank-{len(self.b.shape(x))} tensor at "
                                     f"{node.source or node.name}: the TFLite target supports (N, features) inputs")
        weight, bias = self.weight_and_bias(node)
        options = fb.FullyConnectedOptionsT()
        options.fusedActivationFunction = FUSED[node.activation]
        self.op(B.FULLY_CONNECTED, [x, weight, bias], self.output(node), options, O.FullyConnectedOptions)

    @emits(Op.ADD)
    def add(self, node: Node) -> None:
        self.op(B.ADD, [self.input(node, 0), self.input(node, 1)], self.output(node), fb.AddOptionsT(), O.AddOptions)

    @emits(Op.MUL)
    def mul(self, node: Node) -> None:
        self.op(B.MUL, [self.input(node, 0), self.input(node, 1)], self.factored_output(node), fb.MulOptionsT(),
                O.MulOptions)

    @emits(Op.RELU)
    def relu(self, node: Node) -> None:
        self.clamp(node, 0.0, np.inf)

    @emits(Op.CLIP)
    def clip(self, node: Node) -> None:
        self.clamp(node, *_clip_bounds(node.attrs))

    def clamp(self, node: Node, low: float, high: float) -> None:
        fused = {(0.0, np.inf): ACT.RELU, (0.0, 6.0): ACT.RELU6, (-1.0, 1.0): ACT.RELU_N1_TO_1}.get((low, high))
        if fused is None and low == 0.0 and self.is_int8(node) and self.tq(node.output).range[1] <= high:
            fused = ACT.RELU  # clip(0, high) whose int8 grid ends at or below high: saturating at 127 clips the top
        x = self.input(node)
        if fused is not None and self.is_int8(node):  # XNNPACK takes int8 ADD with a fused clamp, not RELU*
            options = fb.AddOptionsT()
            options.fusedActivationFunction = fused
            zero = self.scalar(node, "zero", 0.0, self.tq(node.inputs[0]).scale)  # the other input's ratio
            self.op(B.ADD, [x, zero], self.output(node), options, O.AddOptions)
        elif fused is not None:
            code = {ACT.RELU: B.RELU, ACT.RELU6: B.RELU6, ACT.RELU_N1_TO_1: B.RELU_N1_TO_1}[fused]
            self.op(code, [x], self.output(node))
        else:  # MAXIMUM/MINIMUM compare codes on the input's grid in int8; requantise to the output's afterwards
            quant = self._input_quant(node)
            steps = [(code, role, value) for code, role, value in ((B.MAXIMUM, "low", low), (B.MINIMUM, "high", high))
                     if np.isfinite(value)]
            if not steps:
                raise UnsupportedOpError(f"clip without bounds at {node.source or node.name}")
            for i, (code, role, value) in enumerate(steps):
                last = i == len(steps) - 1 and quant is None
                out = self.output(node) if last else self.temp(node, f"{role}_clamped", self.b.shape(x), quant)
                x = self.op(code, [x, self._bound(node, role, value, quant)], out)
            if quant is not None:
                self.op(B.QUANTIZE, [x], self.output(node))

    def _bound(self, node: Node, role: str, value: float, quant: TensorQuant | None) -> str:
        if quant is None:
            return self.b.constant(f"{node.name}/{role}", np.array(value, np.float32))
        return self.b.constant(f"{node.name}/{role}", quant.quantize(np.array(value, np.float32)), _quant(quant))

    @emits(Op.HARDSWISH)
    def hardswish(self, node: Node) -> None:
        x = self.input(node)
        if not self.is_int8(node) or self.options.hardswish is HardSwishMode.builtin:
            self.op(B.HARD_SWISH, [x], self.output(node))
            return
        shape = self.b.shape(x)
        low, high = self.tq(node.inputs[0]).range
        gate = self.add_relu6(node, x, "relu6", TensorQuant.from_range(0.0, min(6.0, max(high + 3.0, 0.0))))
        if self.absorbs_factor(node.output):  # x * relu6(x + 3) is 6 x the output: the readers take the 1/6
            self.op(B.MUL, [x, gate], self.scaled_output(node, 6.0, "x_relu6"), fb.MulOptionsT(), O.MulOptions)
            return
        out = self.tq(node.output)
        product = self.temp(node, "x_relu6", shape, TensorQuant(6.0 * out.scale, out.zero_point))
        self.op(B.MUL, [x, gate], product, fb.MulOptionsT(), O.MulOptions)
        self.op(B.MUL, [product, self.scalar(node, "sixth", 1.0 / 6.0)], self.output(node), fb.MulOptionsT(),
                O.MulOptions)

    @emits(Op.HARDSIGMOID)
    def hardsigmoid(self, node: Node) -> None:
        x = self.input(node)
        quant = None
        if self.is_int8(node):
            out = self.tq(node.output)
            quant = TensorQuant(6.0 * out.scale, out.zero_point)  # relu6(x + 3) on the output's codes
            if self.absorbs_factor(node.output) and self.add_relu6_grid(node, quant) == quant:  # 6 x the output
                self.scaled[node.output] = 6.0
                self.add_relu6(node, x, "relu6", quant, self.output(node, quant, name=f"{node.name}/relu6"))
                return
        gate = self.add_relu6(node, x, "relu6", quant)
        self.op(B.MUL, [gate, self.scalar(node, "sixth", 1.0 / 6.0)], self.output(node), fb.MulOptionsT(),
                O.MulOptions)

    def add_relu6_grid(self, node: Node, quant: TensorQuant) -> TensorQuant:
        """The grid of relu6(x + 3) asked on ``quant``. XNNPACK runs an int8 ADD only while input scale / output
        scale < 256 (else the op leaves the delegate and splits the graph): an input that coarse (scale > 6/255 *
        256, a range of hundreds) cannot resolve [-3, 3] anyway, so the grid is coarsened to scale_in / 255 at no
        cost in precision."""
        coarsest = self.tq(node.inputs[0]).scale / 255.0
        return TensorQuant(coarsest, -128) if quant.scale < coarsest else quant  # [0, 255 * scale] holds [0, 6]

    def add_relu6(self, node: Node, x: str, role: str, quant: TensorQuant | None, out: str | None = None) -> str:
        """relu6(x + 3) on ``quant`` (``add_relu6_grid``), into ``out`` when given."""
        if quant is not None:
            quant = self.add_relu6_grid(node, quant)
        options = fb.AddOptionsT()
        options.fusedActivationFunction = ACT.RELU6
        out = out or self.temp(node, role, self.b.shape(x), quant)
        return self.op(B.ADD, [x, self.scalar(node, "three", 3.0)], out, options, O.AddOptions)

    @emits(Op.SIGMOID)
    def sigmoid(self, node: Node) -> None:
        self.fixed_grid_op(node, B.LOGISTIC)

    def fixed_grid_op(self, node: Node, code: int) -> None:
        """An op whose int8 kernel needs a fixed output grid (LOGISTIC: scale 1/256, zero point -128, from the op's
        int8 policy); requantised to the quantiser's grid after the op if that differs."""
        x = self.input(node)
        if self.is_int8(node):
            fixed = policy_of(node.op).fixed_grid("tflite")
            if fixed is None:
                raise UnsupportedOpError(f"IR op {node.op.value}: its int8 policy names no fixed TFLite output grid")
            if self.tq(node.output) != fixed:
                y = self.op(code, [x], self.temp(node, "fixed", self.b.shape(x), fixed))
                self.op(B.QUANTIZE, [y], self.output(node))
                return
        self.op(code, [x], self.output(node))

    @emits(Op.GLOBAL_AVG_POOL)
    def global_avg_pool(self, node: Node) -> None:
        x = self.input(node)
        options = fb.ReducerOptionsT()
        options.keepDims = True
        n, h, w, c = self.b.shape(x)
        if not self.is_int8(node) and h > 1 and w > 1:  # fp32: over W, then H. XNNPACK's one MEAN over a 40 x 40 map
            # measured 11-18 dB noisier than ONNX Runtime's, which squeeze-and-excitation gates amplify (random-weight
            # LR-ASPP at 320: 0.79 off PyTorch at a peak of 471 with one MEAN, 0.021 with two; still one partition)
            axis = self.b.constant(f"{node.name}/axis_w", np.array([2], np.int32))
            x = self.op(B.MEAN, [x, axis], self.temp(node, "row_means", (n, h, 1, c), None), options,
                        O.ReducerOptions)
            axes = self.b.constant(f"{node.name}/axis_h", np.array([1], np.int32))
        else:
            axes = self.b.constant(f"{node.name}/axes", np.array([1, 2], np.int32))
        self.op(B.MEAN, [x, axes], self.factored_output(node), options, O.ReducerOptions)

    @emits(Op.FLATTEN)
    def flatten(self, node: Node) -> None:
        x = self.input(node)
        shape = self.graph.shapes[node.inputs[0]]
        if len(shape) != 4:
            raise UnsupportedOpError(f"flatten of a rank-{len(shape)} tensor at {node.source or node.name}")
        _, c, h, w = shape
        quant = self.tq(node.inputs[0]) if self.is_int8(node) else None
        nhwc = flattened_in_nhwc_order(self.graph, node)
        if nhwc is not None:
            self.flat_nhwc[node.output] = nhwc
        elif h * w > 1:
            x = self.op(B.TRANSPOSE, [x, self.b.constant(f"{node.name}/perm", np.array([0, 3, 1, 2], np.int32))],
                        self.temp(node, "nchw", (shape[0], c, h, w), quant))
        new_shape = np.array([-1, c * h * w], np.int32)
        options = fb.ReshapeOptionsT()
        options.newShape = new_shape
        self.op(B.RESHAPE, [x, self.b.constant(f"{node.name}/shape", new_shape)],
                self.output(node, quant, (shape[0], c * h * w)), options, O.ReshapeOptions)

    @emits(Op.PAD)
    def pad(self, node: Node) -> None:
        attrs = node.attrs
        assert isinstance(attrs, PadAttrs)
        x = self.input(node)
        self.value[node.output] = self.pad_op(node, x, attrs.pads, self.output(node, self._input_quant(node)))

    def _input_quant(self, node: Node) -> TensorQuant | None:
        """The grid of ``node``'s first input as stored (``scaled``) in an int8 graph, else None."""
        if not self.is_int8(node):
            return None
        quant, factor = self.tq(node.inputs[0]), self.scaled.get(node.inputs[0], 1.0)
        return quant if factor == 1.0 else TensorQuant(quant.scale * factor, quant.zero_point)

    def absorbs_factor(self, tensor: str) -> bool:
        """Whether int8 ``tensor`` may be stored times a constant factor (``scaled``): it is no graph output and
        only int8 CONV and LINEAR layers read it as their input (linear in it: a factor on the input is a factor on
        each weight scale, the same integer arithmetic), or int8 MULs and GLOBAL_AVG_POOLs (a squeeze-and-excitation
        block's) whose outputs may be stored so in turn (``factored_output``)."""
        readers = self.graph.consumers(tensor)
        return bool(readers) and tensor not in self.graph.outputs and all(
            self.is_int8(n) and (n.op in (Op.CONV, Op.LINEAR) and n.inputs == [tensor]
                                 or n.op is Op.MUL and self.absorbs_factor(n.output)
                                 or n.op is Op.GLOBAL_AVG_POOL and self.absorbs_factor(n.output))
            for n in readers)

    def factored_output(self, node: Node) -> str:
        """``node``'s output (a MUL or GLOBAL_AVG_POOL, linear in each input), stored times the product of its
        inputs' factors (``scaled``)."""
        factor = float(np.prod([self.scaled.get(x, 1.0) for x in node.inputs]))
        return self.output(node) if factor == 1.0 else self.scaled_output(node, factor, f"x{factor:g}")

    def scaled_output(self, node: Node, factor: float, role: str) -> str:
        """``node``'s int8 output stored times ``factor`` (``absorbs_factor`` must hold): a tensor named
        ``<node>/<role>`` (the per-layer taps read only tensors named after IR tensors, which hold their values)."""
        out = self.tq(node.output)
        self.scaled[node.output] = factor
        return self.output(node, TensorQuant(out.scale * factor, out.zero_point), name=f"{node.name}/{role}")

    def pad_op(self, node: Node, x: str, pads: tuple[int, int, int, int], out: str | None = None) -> str:
        top, bottom, left, right = pads
        n, h, w, c = self.b.shape(x)
        if out is None:
            out = self.temp(node, "pad", (n, h + top + bottom, w + left + right, c), self._input_quant(node))
        paddings = self.b.constant(f"{node.name}/paddings",
                                   np.array([[0, 0], [top, bottom], [left, right], [0, 0]], np.int32))
        return self.op(B.PAD, [x, paddings], out)

    # -- the whole graph -----------------------------------------------------------------------------------------
    def translate(self, input_name: str = INPUT_NAME) -> ModelBuilder:
        """The subgraph: its outputs, in the model's order, carry the artifact's names (``Graph.artifact_names``)."""
        graph, b, io = self.graph, self.b, self.options.io
        shape = _nhwc(graph.input_shape)
        if self.quantized is None or graph.input_name not in self.quantized.activations:  # mixed: a float input
            if self.quantized is not None and io is not IOType.float:
                raise UnsupportedOpError(f"the mixed-precision model reads its input in float: it needs float I/O "
                                         f"(--tflite-io float), not {io}")
            self.value[graph.input_name] = b.tensor(input_name, shape, np.float32)
            b.inputs = [input_name]
        else:
            q_in = _quant(self.tq(graph.input_name))
            if io is IOType.int8:
                self.value[graph.input_name] = b.tensor(input_name, shape, np.int8, q_in)
            else:
                outer = b.tensor(input_name, shape, *_io_type(io, q_in))
                self.value[graph.input_name] = self.op(B.QUANTIZE, [outer],
                                                       b.tensor(f"{graph.input_name}/int8", shape, np.int8, q_in))
            b.inputs = [input_name]
        for node in graph.nodes:
            emitter = EMITTERS.get(node.op)
            if emitter is None:
                raise UnsupportedOpError(f"IR op {node.op.value} at {node.source or node.name} has no TFLite emitter")
            emitter(self, node)
        for tensor, name in graph.artifact_names.items():
            self.output_tensor(tensor, name)
        b.outputs = list(graph.artifact_names.values())
        return b

    def output_tensor(self, tensor: str, name: str) -> None:
        """The IR output ``tensor`` as the artifact's output ``name``, of the I/O type the options ask for."""
        b, io = self.b, self.options.io
        final = self.canonical(tensor)
        final_is_float = b.dtype(final) == np.float32
        if self.quantized is None or (final_is_float and io is IOType.float) or (
                not final_is_float and io is IOType.int8):
            b.rename(final, name)  # ops already emitted refer to tensors by index: consumers keep reading it
        else:
            q_out = _quant(self.tq(tensor))
            out = b.tensor(name, b.shape(final), *_io_type(io, q_out))
            self.op(B.DEQUANTIZE if io is IOType.float else B.QUANTIZE, [final], out)


def _io_type(io: IOType, quant: Quant) -> tuple[type, Quant | None]:
    if io is IOType.float:
        return np.float32, None
    if io is IOType.uint8:
        return np.uint8, Quant.per_tensor(quant.scale[0], quant.zero_point[0] + 128)
    return np.int8, quant


def _clip_bounds(attrs: object) -> tuple[float, float]:
    assert isinstance(attrs, ClipAttrs)
    return float(attrs.min), float(attrs.max)


def _conv_padding(attrs: ConvAttrs, size: tuple[int, int], kernel: tuple[int, int]
                  ) -> tuple[int, tuple[int, int, int, int] | None]:
    """TFLite padding for the IR's explicit pads: SAME or VALID when they compute the same, else VALID after PAD."""
    top, bottom, left, right = attrs.padding
    same = True
    for (before, after), i, k, s, d in zip(((top, bottom), (left, right)), size, kernel, attrs.stride,
                                           attrs.dilation):
        k_eff = d * (k - 1) + 1
        out_torch = (i + before + after - k_eff) // s + 1
        out_same = -(-i // s)
        total = max((out_same - 1) * s + k_eff - i, 0)
        same &= out_torch == out_same and (before, after) == (total // 2, total - total // 2)
    if attrs.padding == (0, 0, 0, 0):
        return fb.Padding.VALID, None
    if same:
        return fb.Padding.SAME, None
    return fb.Padding.VALID, attrs.padding
