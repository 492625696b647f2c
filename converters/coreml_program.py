"""The IR written as a Core ML ML program with coremltools' MIL Builder, one small lowering per IR op.

Writing MIL ourselves (instead of ``torch.export`` -> ``ct.convert``) lets the W8A8 program carry exactly the
parameters the quantiser chose: int8 weights per output channel as ``constexpr_affine_dequantize`` (iOS 16/17) or
``constexpr_blockwise_shift_scale`` (iOS 18+), biases with the int32 rounding the integer kernels apply, and a
``quantize`` -> ``dequantize`` pair (iOS 17 ops) with our scale and zero point on the graph input and every node
output, the same places as the ONNX QDQ graph. Ops are spelled as coremltools' own PyTorch frontend spells them
(hardswish = thresholded_relu, sigmoid_hard, mul), so Core ML's pattern matchers see familiar programs.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mdeploy.converters.coreml_mil_attention import ATTENTION_LOWERINGS  # RESHAPE, TRANSPOSE, MATMUL
from mdeploy.converters.coreml_mil_dense import DENSE_LOWERINGS  # RESIZE, CONV_TRANSPOSE
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.ir import Activation, ClipAttrs, ConvAttrs, Graph, Node, Op, PadAttrs
from mdeploy.graph.ir import GeluAttrs, LeakyReluAttrs, PoolAttrs, ShuffleAttrs, SliceAttrs, concat_axis, softmax_axis
from mdeploy.graph.pooling import pool_geometry
from mdeploy.quantize.params import QuantizedGraph, TensorQuant, quantize_bias
from mdeploy.quantize.rounding import affine_dequantized
from mdeploy.types import INPUT_NAME, OUTPUT_NAME  # OUTPUT_NAME: re-exported for coreml.py and tests


# MIL ops the program emits outside any one IR op's lowering: the activation quantize -> dequantize pairs and the
# per-channel image gain (see ImageNormalization).
PROGRAM_MIL_OPS = frozenset({"quantize", "dequantize", "mul"})
ACTIVATION_MIL_OPS = ("relu", "clip")  # a fused ReLU / ReLU6 (_Emitter.activation)
WEIGHT_MIL_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")  # int8 weights (_Emitter.weight)


@dataclass(frozen=True)
class Lowering:
    """How one IR op is written in MIL: the _Emitter method, and every MIL op it may emit (what the MIL reference
    executor must implement to run it; tests/test_ops.py checks both)."""

    fn: Callable[..., Any]
    mil_ops: frozenset[str]


# IR op -> its Core ML lowering: one per member of Op.
LOWERINGS: dict[Op, Lowering] = {}


def lowers(kind: Op, *mil_ops: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        LOWERINGS[kind] = Lowering(fn, frozenset(mil_ops))
        return fn

    return register


def import_coremltools() -> Any:
    """``import coremltools`` without importing TensorFlow when nothing else has: coremltools imports it eagerly
    for its TF frontend (2 s, hundreds of MB), which mdeploy never uses. ``import tensorflow`` works again right
    after. Its import-time warnings (untested torch version, no native Core ML on this OS) are silenced: mdeploy
    says what runs where in its own reports, and errors must stay one line."""
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    if "coremltools" in sys.modules or "tensorflow" in sys.modules:
        import coremltools

        return coremltools
    sys.modules["tensorflow"] = None  # type: ignore[assignment]  # makes `import tensorflow` raise ImportError
    try:
        import coremltools
    finally:
        del sys.modules["tensorflow"]
    return coremltools


@dataclass(frozen=True)
class ImageNormalization:
    """How ``(pixel * scale - mean[c]) / std[c]`` is split between Core ML's ImageType and the program.

    ImageType computes ``image_scale * pixel + bias[c]`` with ONE scale. With ``reference`` a std value, ImageType
    gives ``y = (pixel * scale - mean[c]) / reference``, and the model input is ``x[c] = y * gain[c]`` with
    ``gain[c] = reference / std[c]`` (1 for every channel when the std is the same for all). The gain is folded
    into the first convolution's weights (or the input quantisation's per-channel scale in int8)."""

    image_scale: float
    bias: tuple[float, ...]
    gain: tuple[float, ...]
    color_layout: str  # "RGB" or "BGR"

    @classmethod
    def from_preprocess(cls, preprocess: dict[str, Any]) -> ImageNormalization:
        mean = [float(v) for v in preprocess.get("mean", (0.0, 0.0, 0.0))]
        std = [float(v) for v in preprocess.get("std", (1.0, 1.0, 1.0))]
        scale = float(preprocess.get("scale", 1 / 255))
        reference = std[0] if len(set(std)) == 1 else float(np.exp(np.mean(np.log(std))))
        return cls(
            image_scale=scale / reference,
            bias=tuple(-m / reference for m in mean),
            gain=tuple(reference / s for s in std),
            color_layout=str(preprocess.get("channel_order", "RGB")).upper(),
        )

    @property
    def uniform(self) -> bool:
        return all(g == 1.0 for g in self.gain)

    def pixels(self, x: np.ndarray) -> np.ndarray:
        """The (unrounded) pixel values an app would pass for the preprocessed NCHW batch ``x``."""
        gain = np.asarray(self.gain, np.float64).reshape(1, -1, 1, 1)
        bias = np.asarray(self.bias, np.float64).reshape(1, -1, 1, 1)
        return ((x.astype(np.float64) / gain - bias) / self.image_scale).astype(np.float32)


@dataclass(frozen=True)
class ProgramOptions:
    opset: Any  # ct.target.iOS17, ...
    image: ImageNormalization | None = None  # None: a tensor input, preprocessed as for PyTorch
    activations: bool = True  # with a QuantizedGraph: W8A8 (True) or int8 weights only (W8, False)


class _Emitter:
    def __init__(self, ct: Any, graph: Graph, quantized: QuantizedGraph | None, options: ProgramOptions) -> None:
        from coremltools.converters.mil import Builder as mb

        self.ct, self.mb, self.graph, self.quantized, self.options = ct, mb, graph, quantized, options
        self.blockwise = options.opset >= ct.target.iOS18
        self.quantize_activations = quantized is not None and options.activations
        self.fold_gain_into: str | None = None  # the CONV whose float weights absorb the image gain

    # -- helpers ---------------------------------------------------------------------------------------------
    def is_int8(self, node: Node) -> bool:
        """int8 weights for this node (W8A8 or W8)."""
        return self.quantized is not None and node.name not in self.quantized.float_nodes

    def qdq(self, x: Any, tensor: str, name: str, gain: tuple[float, ...] | None = None) -> Any:
        """quantize -> dequantize with ``tensor``'s int8 parameters. With ``gain`` (image input), the quantize op
        reads ``x / gain[c]`` per channel and the dequantize op returns model-space values."""
        assert self.quantized is not None
        quant: TensorQuant = self.quantized.activations[tensor]
        zero_point = np.int8(quant.zero_point)
        if gain is None:
            q = self.mb.quantize(input=x, scale=np.float32(quant.scale), zero_point=zero_point, output_dtype="int8",
                                 name=tensor + "_q")
        else:
            scales = (quant.scale / np.asarray(gain, np.float64)).astype(np.float32)
            q = self.mb.quantize(input=x, scale=scales, zero_point=np.full(len(gain), zero_point, np.int8), axis=1,
                                 output_dtype="int8", name=tensor + "_q")
        return self.mb.dequantize(input=q, scale=np.float32(quant.scale), zero_point=zero_point, name=name)

    def weight(self, node: Node, weight: np.ndarray) -> Any:
        if not self.is_int8(node):
            return weight.astype(np.float32)
        assert self.quantized is not None
        wq = self.quantized.weights[node.name]
        values = wq.values.astype(np.int8)
        if self.blockwise:  # iOS 18 deprecates constexpr_affine_dequantize for this op
            shape = (-1,) + (1,) * (values.ndim - 1)
            return self.mb.constexpr_blockwise_shift_scale(
                data=values, scale=wq.scale.astype(np.float32).reshape(shape), name=node.name + "_weight")
        return self.mb.constexpr_affine_dequantize(quantized_data=values, zero_point=np.int8(0),
                                                   scale=wq.scale.astype(np.float32), axis=0,
                                                   name=node.name + "_weight")

    def bias(self, node: Node) -> np.ndarray:
        """The float bias an integer kernel effectively adds: int32-rounded at input_scale * weight_scale."""
        if not self.is_int8(node) or not self.quantize_activations:
            return node.bias.astype(np.float32)
        assert self.quantized is not None
        wq = self.quantized.weights[node.name]
        input_scale = self.quantized.activations[node.inputs[0]].scale
        bias_scale = np.float64(input_scale) * wq.scale.astype(np.float64)
        return (quantize_bias(node.bias, input_scale, wq.scale) * bias_scale).astype(np.float32)

    def activation(self, y: Any, activation: Activation, name: str) -> Any:
        if activation is Activation.RELU:
            return self.mb.relu(x=y, name=name)
        if activation is Activation.RELU6:
            return self.mb.clip(x=y, alpha=np.float32(0.0), beta=np.float32(6.0), name=name)
        return y

    # -- one lowering per IR op (registered in LOWERINGS with the MIL ops it emits) ---------------------------
    @lowers(Op.CONV, "conv", *ACTIVATION_MIL_OPS, *WEIGHT_MIL_OPS)
    def conv(self, node: Node, xs: list[Any], name: str) -> Any:
        attrs = node.attrs
        assert isinstance(attrs, ConvAttrs)
        weight = node.weight
        image = self.options.image
        if image is not None and node.name == self.fold_gain_into:  # see ImageNormalization
            weight = weight * np.asarray(image.gain, np.float32).reshape(1, -1, 1, 1)
        inner = name if node.activation is Activation.NONE else name + "_conv"
        y = self.mb.conv(x=xs[0], weight=self.weight(node, weight), bias=self.bias(node),
                         strides=list(attrs.stride), pad_type="custom", pad=list(attrs.padding),
                         dilations=list(attrs.dilation), groups=attrs.groups, name=inner)
        return self.activation(y, node.activation, name)

    @lowers(Op.LINEAR, "linear", *ACTIVATION_MIL_OPS, *WEIGHT_MIL_OPS)
    def linear(self, node: Node, xs: list[Any], name: str) -> Any:
        inner = name if node.activation is Activation.NONE else name + "_linear"
        y = self.mb.linear(x=xs[0], weight=self.weight(node, node.weight), bias=self.bias(node), name=inner)
        return self.activation(y, node.activation, name)

    @lowers(Op.ADD, "add")
    def add(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.add(x=xs[0], y=xs[1], name=name)

    @lowers(Op.MUL, "mul")
    def mul(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.mul(x=xs[0], y=xs[1], name=name)

    @lowers(Op.RELU, "relu")
    def relu(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.relu(x=xs[0], name=name)

    @lowers(Op.CLIP, "relu", "clip")
    def clip(self, node: Node, xs: list[Any], name: str) -> Any:
        attrs = node.attrs
        assert isinstance(attrs, ClipAttrs)
        if attrs.min == 0.0 and attrs.max == np.inf:
            return self.mb.relu(x=xs[0], name=name)
        return self.mb.clip(x=xs[0], alpha=np.float32(attrs.min), beta=np.float32(attrs.max), name=name)

    @lowers(Op.HARDSWISH, "thresholded_relu", "sigmoid_hard", "mul")
    def hardswish(self, node: Node, xs: list[Any], name: str) -> Any:  # as coremltools' torch frontend writes it
        w = self.mb.thresholded_relu(x=xs[0], alpha=np.float32(-3.0), name=name + "_thresholded")
        y = self.mb.sigmoid_hard(x=w, alpha=np.float32(1 / 6), beta=np.float32(0.5), name=name + "_hardsigmoid")
        return self.mb.mul(x=w, y=y, name=name)

    @lowers(Op.HARDSIGMOID, "sigmoid_hard")
    def hardsigmoid(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.sigmoid_hard(x=xs[0], alpha=np.float32(1 / 6), beta=np.float32(0.5), name=name)

    @lowers(Op.SIGMOID, "sigmoid")
    def sigmoid(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.sigmoid(x=xs[0], name=name)

    @lowers(Op.GLOBAL_AVG_POOL, "reduce_mean")
    def global_avg_pool(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.reduce_mean(x=xs[0], axes=[2, 3], keep_dims=True, name=name)

    @lowers(Op.FLATTEN, "reshape")
    def flatten(self, node: Node, xs: list[Any], name: str) -> Any:
        features = int(np.prod(self.graph.shapes[node.output][1:]))
        return self.mb.reshape(x=xs[0], shape=np.array([-1, features], np.int32), name=name)

    @lowers(Op.PAD, "pad")
    def pad(self, node: Node, xs: list[Any], name: str) -> Any:
        attrs = node.attrs
        assert isinstance(attrs, PadAttrs)
        pads = np.array([0, 0, 0, 0, *attrs.pads], np.int32)  # top, bottom, left, right on the last two axes
        return self.mb.pad(x=xs[0], pad=pads, mode="constant", constant_val=np.float32(0.0), name=name)

    @lowers(Op.SILU, "silu")
    def silu(self, node: Node, xs: list[Any], name: str) -> Any:
        return self.mb.silu(x=xs[0], name=name)

    @lowers(Op.GELU, "gelu")
    def gelu(self, node: Node, xs: list[Any], name: str) -> Any:
        assert isinstance(node.attrs, GeluAttrs)
        mode = "TANH_APPROXIMATION" if node.attrs.approximate == "tanh" else "EXACT"
        return self.mb.gelu(x=xs[0], mode=mode, name=name)

    @lowers(Op.LEAKY_RELU, "leaky_relu")
    def leaky_relu(self, node: Node, xs: list[Any], name: str) -> Any:
        assert isinstance(node.attrs, LeakyReluAttrs)
        return self.mb.leaky_relu(x=xs[0], alpha=np.float32(node.attrs.negative_slope), name=name)

    @lowers(Op.PRELU, "prelu", "reshape")
    def prelu(self, node: Node, xs: list[Any], name: str) -> Any:
        slope = node.params["slope"].astype(np.float32)
        if len(self.graph.shapes[node.output]) >= 3:
            return self.mb.prelu(x=xs[0], alpha=slope, name=name)
        x = self.mb.reshape(x=xs[0], shape=np.array([-1, slope.size, 1, 1], np.int32), name=name + "_4d")
        y = self.mb.prelu(x=x, alpha=slope, name=name + "_prelu")  # MIL prelu takes rank 3 and up
        return self.mb.reshape(x=y, shape=np.array([-1, slope.size], np.int32), name=name)

    @lowers(Op.AFFINE, "conv", "mul", "add")
    def affine(self, node: Node, xs: list[Any], name: str) -> Any:
        """A 1x1 depthwise conv on a feature map (as the TFLite target; a mul and an add would be fused by Core ML's
        optimiser into a batch_norm whose epsilon of 1e-5 changes the result), mul and add on other ranks; W8A8: the
        scale and shift the int8 kernels apply (as ``bias`` does)."""
        scale, shift = node.params["scale"], node.params["shift"]
        if self.is_int8(node) and self.quantize_activations:
            assert self.quantized is not None
            scale, shift = affine_dequantized(scale, shift, self.quantized.activations[node.inputs[0]].scale)
        scale, shift = scale.astype(np.float32), shift.astype(np.float32)
        if len(self.graph.shapes[node.output]) == 4:
            return self.mb.conv(x=xs[0], weight=scale.reshape(-1, 1, 1, 1), bias=shift, groups=scale.size, name=name)
        along = (1, -1) + (1,) * (len(self.graph.shapes[node.output]) - 2)  # axis 1 of (N, C) or (N, C, L)
        y = self.mb.mul(x=xs[0], y=scale.reshape(along), name=name + "_scaled")
        return self.mb.add(x=y, y=shift.reshape(along), name=name)

    @lowers(Op.SOFTMAX, "softmax")
    def softmax(self, node: Node, xs: list[Any], name: str) -> Any:
        rank = len(self.graph.shapes[node.output])
        axis = softmax_axis(node, rank)
        return self.mb.softmax(x=xs[0], axis=-1 if axis == rank - 1 else axis, name=name)

    @lowers(Op.CONCAT, "concat")
    def concat(self, node: Node, xs: list[Any], name: str) -> Any:  # W8A8: the output's quantize requantises
        return self.mb.concat(values=xs, axis=concat_axis(node), name=name)

    @lowers(Op.MAX_POOL, "max_pool")
    def max_pool(self, node: Node, xs: list[Any], name: str) -> Any:
        attrs, geometry = self._pool(node, average=False)
        return self.mb.max_pool(x=xs[0], kernel_sizes=list(attrs.kernel), strides=list(attrs.stride),
                                pad_type="custom", pad=list(geometry.pads), ceil_mode=False, name=name)

    @lowers(Op.AVG_POOL, "avg_pool", "mul")
    def avg_pool(self, node: Node, xs: list[Any], name: str) -> Any:
        """Sum / (kh * kw) over zero padding, times PyTorch's divisor correction (mdeploy.graph.pooling)."""
        attrs, geometry = self._pool(node, average=True)
        inner = name if geometry.correction is None else name + "_window_mean"
        y = self.mb.avg_pool(x=xs[0], kernel_sizes=list(attrs.kernel), strides=list(attrs.stride), pad_type="custom",
                             pad=list(geometry.pads), exclude_padding_from_average=False, ceil_mode=False, name=inner)
        if geometry.correction is None:
            return y
        return self.mb.mul(x=y, y=geometry.correction.reshape(1, 1, *geometry.out).astype(np.float32), name=name)

    def _pool(self, node: Node, average: bool) -> tuple[PoolAttrs, Any]:
        attrs = node.attrs
        assert isinstance(attrs, PoolAttrs)
        return attrs, pool_geometry(attrs, self.graph.shapes[node.inputs[0]][2:], average)  # type: ignore[arg-type]

    @lowers(Op.CHANNEL_SHUFFLE, "reshape", "transpose")
    def channel_shuffle(self, node: Node, xs: list[Any], name: str) -> Any:  # as coremltools' torch frontend
        assert isinstance(node.attrs, ShuffleAttrs)
        _, c, h, w = self.graph.shapes[node.inputs[0]]
        g = node.attrs.groups
        y = self.mb.reshape(x=xs[0], shape=np.array([-1, g, c // g, h, w], np.int32), name=name + "_grouped")
        y = self.mb.transpose(x=y, perm=[0, 2, 1, 3, 4], name=name + "_swapped")
        return self.mb.reshape(x=y, shape=np.array([-1, c, h, w], np.int32), name=name)

    @lowers(Op.SLICE, "slice_by_index")
    def channel_slice(self, node: Node, xs: list[Any], name: str) -> Any:
        attrs = node.attrs
        assert isinstance(attrs, SliceAttrs)
        return self.mb.slice_by_index(x=xs[0], begin=np.array([0, attrs.start, 0, 0], np.int32),
                                      end=np.array([0, attrs.end, 0, 0], np.int32),
                                      begin_mask=[True, False, True, True], end_mask=[True, False, True, True],
                                      name=name)

    def emit(self, node: Node, xs: list[Any], name: str) -> Any:
        lowering = LOWERINGS.get(node.op)
        if lowering is None:
            raise UnsupportedOpError(f"IR op {node.op.value} at {node.source or node.name} has no Core ML lowering")
        return lowering.fn(self, node, xs, name)

    def body(self, x: Any) -> Any:
        graph, quantized, image = self.graph, self.quantized, self.options.image
        emit = self.emit
        gain = image.gain if image is not None and not image.uniform else None
        consumers = graph.consumers(graph.input_name)
        if self.quantize_activations and graph.input_name in quantized.activations:  # per-channel scale: the gain
            x = self.qdq(x, graph.input_name, graph.input_name + "_dq", gain)
        elif gain is not None and len(consumers) == 1 and consumers[0].op is Op.CONV and not self.is_int8(consumers[0]):
            self.fold_gain_into = consumers[0].name
        elif gain is not None:
            x = self.mb.mul(x=x, y=np.asarray(gain, np.float32).reshape(1, -1, 1, 1), name="input_gain")
        values = {graph.input_name: x}
        names = graph.artifact_names  # MIL outputs are named after their vars
        for node in graph.nodes:
            out = names.get(node.output, node.output)
            xs = [values[name] for name in node.inputs]
            if self.quantize_activations and quantized is not None and node.output in quantized.activations:
                y = self.qdq(emit(node, xs, out + "_float"), node.output, out)
            else:
                y = emit(node, xs, out)
            values[node.output] = y
        outputs = tuple(values[name] for name in graph.outputs)
        return outputs[0] if len(outputs) == 1 else outputs  # a tuple: one program output each, in order


LOWERINGS.update({op: Lowering(fn, frozenset(mil_ops)) for op, (fn, mil_ops) in ATTENTION_LOWERINGS.items()})
LOWERINGS.update({op: Lowering(fn, frozenset(mil_ops)) for op, (fn, mil_ops) in DENSE_LOWERINGS.items()})


def build_program(graph: Graph, quantized: QuantizedGraph | None, options: ProgramOptions) -> Any:
    """The MIL program of ``graph`` (fp32 types; ``ct.convert`` adds fp16 casts when asked)."""
    if graph.input_name != INPUT_NAME:
        raise ValueError(f"the IR's input tensor must be named {INPUT_NAME!r}, not {graph.input_name!r}")
    ct = import_coremltools()
    from coremltools.converters.mil import Builder as mb

    emitter = _Emitter(ct, graph, quantized, options)
    shape = tuple(int(d) for d in graph.input_shape)

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=options.opset)
    def program(input: Any) -> Any:  # noqa: A002  # the MIL input is named after this parameter
        return emitter.body(input)

    return program
