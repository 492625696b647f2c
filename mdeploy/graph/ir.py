"""A small inference graph of the ops MobileNets use, with BatchNorm folded and activations fused.

Every target (ONNX, TFLite, CoreML) and the int8 quantiser read this one graph, so they agree on what the model
is. Tensors are named; parameters are float32 numpy arrays in PyTorch's layout (NCHW, OIHW).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from mdeploy.errors import BadInputError
from mdeploy.types import output_names

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


class Op(str, Enum):
    CONV = "conv"  # params: weight (O, I/groups, kh, kw), bias (O,); attrs: ConvAttrs; fused activation
    LINEAR = "linear"  # params: weight (O, I), bias (O,); fused activation
    ADD = "add"
    MUL = "mul"  # elementwise with broadcasting (squeeze-and-excitation scales an (N,C,H,W) map by (N,C,1,1))
    RELU = "relu"
    CLIP = "clip"  # attrs: ClipAttrs (ReLU6 is clip 0..6)
    HARDSWISH = "hardswish"
    HARDSIGMOID = "hardsigmoid"
    SIGMOID = "sigmoid"
    GLOBAL_AVG_POOL = "global_avg_pool"  # (N,C,H,W) -> (N,C,1,1)
    FLATTEN = "flatten"  # (N,C,H,W) -> (N, C*H*W) in PyTorch's element order
    PAD = "pad"  # zero padding; attrs: PadAttrs
    SOFTMAX = "softmax"  # attrs: AxisAttrs (None: the last axis); any rank
    CONCAT = "concat"  # attrs: AxisAttrs (None: the channel axis, dim 1); inputs of one rank joined in order
    MAX_POOL = "max_pool"  # attrs: PoolAttrs (padding never wins: it is -inf)
    AVG_POOL = "avg_pool"  # attrs: PoolAttrs (PyTorch's divisor: count_include_pad, ceil_mode, divisor_override)
    CHANNEL_SHUFFLE = "channel_shuffle"  # attrs: ShuffleAttrs; (N, g*k, H, W): out channel i*g + j = in j*k + i
    SLICE = "slice"  # attrs: SliceAttrs; channels [start, end) of an (N, C, H, W) map
    SILU = "silu"  # x * sigmoid(x) (Swish)
    GELU = "gelu"  # attrs: GeluAttrs; x * Phi(x) (approximate "none": erf form) or its tanh approximation
    LEAKY_RELU = "leaky_relu"  # attrs: LeakyReluAttrs; x if x >= 0 else slope * x
    PRELU = "prelu"  # params: slope (C,) learned per channel (a single learned slope is repeated C times)
    AFFINE = "affine"  # params: scale (C,), shift (C,): x * scale[c] + shift[c] along axis 1 (constant operands)
    RESHAPE = "reshape"  # attrs: ReshapeAttrs; any rank to a static shape, in PyTorch's element order
    TRANSPOSE = "transpose"  # attrs: TransposeAttrs; axes permuted, any rank (the batch axis stays first)
    MATMUL = "matmul"  # two activations of one rank >= 3: (N, ..., M, K) @ (N, ..., K, P), leading axes broadcast
    RESIZE = "resize"  # attrs: ResizeAttrs; (N, C, H, W) -> (N, C, *size), sampled as F.interpolate samples
    # params: weight (O, I/groups, kh, kw) (CONV's layout: PyTorch's (I, O/groups, kh, kw) regrouped so that axis 0
    # is the output channel, as BatchNorm folding and per-channel int8 weights want), bias (O,); attrs:
    # ConvTransposeAttrs; fused activation
    CONV_TRANSPOSE = "conv_transpose"


# Ops with a weight whose axis 0 is the output channel (int8 per output channel, BatchNorm and scales fold into it).
WEIGHTED_OPS = (Op.CONV, Op.CONV_TRANSPOSE, Op.LINEAR)


class OpRegistry(dict["Op", F]):
    """One backend's handlers keyed by ``Op``, one small function per op, filled by the ``register`` decorator
    (tests/test_ops.py checks that every backend's registry covers the whole enum)."""

    def register(self, *ops: Op) -> Callable[[F], F]:
        def add(fn: F) -> F:
            for op in ops:
                self[op] = fn
            return fn

        return add


class Activation(str, Enum):
    """An activation fused into the output of a CONV or LINEAR."""

    NONE = "none"
    RELU = "relu"
    RELU6 = "relu6"

    @property
    def output_range(self) -> tuple[float, float]:
        return {Activation.NONE: (-np.inf, np.inf), Activation.RELU: (0.0, np.inf), Activation.RELU6: (0.0, 6.0)}[self]


@dataclass(frozen=True)
class ConvAttrs:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, bottom, left, right (may be asymmetric)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1

    @property
    def symmetric_padding(self) -> tuple[int, int] | None:
        top, bottom, left, right = self.padding
        return (top, left) if (top, left) == (bottom, right) else None


@dataclass(frozen=True)
class ClipAttrs:
    min: float
    max: float


@dataclass(frozen=True)
class PadAttrs:
    pads: tuple[int, int, int, int]  # top, bottom, left, right


@dataclass(frozen=True)
class PoolAttrs:
    """nn.MaxPool2d / nn.AvgPool2d as PyTorch defines them (mdeploy.graph.pooling computes the windows)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)  # each side of H, of W
    ceil_mode: bool = False
    count_include_pad: bool = True  # AVG_POOL only
    divisor_override: int | None = None  # AVG_POOL only


@dataclass(frozen=True)
class ShuffleAttrs:
    groups: int


@dataclass(frozen=True)
class LeakyReluAttrs:
    negative_slope: float


@dataclass(frozen=True)
class GeluAttrs:
    """nn.GELU's ``approximate``: "none", 0.5 x (1 + erf(x / sqrt(2))), or "tanh",
    0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""

    approximate: str = "none"


@dataclass(frozen=True)
class SliceAttrs:
    start: int  # channel range [start, end), step 1
    end: int


@dataclass(frozen=True)
class AxisAttrs:
    """The axis CONCAT joins along or SOFTMAX normalises over, as a PyTorch dim >= 0; the tracer writes it only where
    it is not the op's default (CONCAT: 1, the channels; SOFTMAX: the last axis), so ``attrs`` None is that."""

    axis: int


def concat_axis(node: Node) -> int:
    """The PyTorch axis a CONCAT joins along."""
    return node.attrs.axis if isinstance(node.attrs, AxisAttrs) else 1


def softmax_axis(node: Node, rank: int) -> int:
    """The PyTorch axis a SOFTMAX of a rank-``rank`` tensor normalises over."""
    return node.attrs.axis if isinstance(node.attrs, AxisAttrs) else rank - 1


@dataclass(frozen=True)
class ReshapeAttrs:
    shape: tuple[int, ...]  # the output's shape at batch 1 (its first axis is the batch: 1)


@dataclass(frozen=True)
class TransposeAttrs:
    perm: tuple[int, ...]  # output axis i is input axis perm[i]; perm[0] == 0 (the batch axis stays first)


@dataclass(frozen=True)
class ResizeAttrs:
    """F.interpolate / nn.Upsample at a static input size (``mdeploy.graph.resize`` computes the sampling)."""

    size: tuple[int, int]  # the output's (H, W)
    mode: str  # "nearest" (PyTorch's floor(dst * in / out)), "nearest-exact" or "bilinear"
    align_corners: bool = False  # bilinear only
    # PyTorch's scale_factor where it, not the sizes, sets the sampling (recompute_scale_factor off and in * scale
    # not an integer); None when the sizes give the same sampling (the tracer drops such scales)
    scales: tuple[float, float] | None = None


@dataclass(frozen=True)
class ConvTransposeAttrs:
    """nn.ConvTranspose2d: output size (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1."""

    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)  # removed from both sides of H, of W
    output_padding: tuple[int, int] = (0, 0)  # added after the last row, column
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1


@dataclass
class Node:
    name: str
    op: Op
    inputs: list[str]
    output: str
    attrs: (ConvAttrs | ClipAttrs | PadAttrs | PoolAttrs | ShuffleAttrs | SliceAttrs | LeakyReluAttrs | GeluAttrs
            | ReshapeAttrs | TransposeAttrs | ResizeAttrs | ConvTransposeAttrs | AxisAttrs | None) = None
    params: dict[str, np.ndarray] = field(default_factory=dict)
    activation: Activation = Activation.NONE
    source: str = ""  # where it came from in the user's model (module path), for error messages and reports

    @property
    def weight(self) -> np.ndarray:
        return self.params["weight"]

    @property
    def bias(self) -> np.ndarray:
        return self.params["bias"]

    @property
    def is_depthwise(self) -> bool:
        return (
            self.op is Op.CONV
            and isinstance(self.attrs, ConvAttrs)
            and self.attrs.groups > 1
            and self.attrs.groups == self.weight.shape[0]
            and self.weight.shape[1] == 1
        )


@dataclass
class Graph:
    nodes: list[Node]
    input_name: str
    input_shape: tuple[int, ...]  # (1, C, H, W), PyTorch layout
    outputs: tuple[str, ...]  # the model's outputs in the order its forward() returns them (any number, any rank)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # every tensor's shape at batch 1
    output_keys: tuple[str, ...] = ()  # the keys of the dict forward() returns, in its order (else empty)

    def single_output(self, stage: str, source: str = "the model") -> str:
        """The only output, for a stage that still handles one (classifier parity, labels, the manifest's output
        spec); else a one-line BadInputError naming ``source`` (the model file) and ``stage``."""
        return only_output(self.outputs, stage, source)

    @property
    def artifact_names(self) -> dict[str, str]:
        """IR output tensor -> the artifact's name for it (``mdeploy.types.output_names``), in output order."""
        return dict(zip(self.outputs, output_names(len(self.outputs), self.output_keys), strict=True))

    def producer(self, tensor: str) -> Node | None:
        return next((n for n in self.nodes if n.output == tensor), None)

    def consumers(self, tensor: str) -> list[Node]:
        return [n for n in self.nodes if tensor in n.inputs]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def weighted_nodes(self) -> list[Node]:
        return [n for n in self.nodes if n.op in WEIGHTED_OPS]

    def op_histogram(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            key = n.op.value if n.activation is Activation.NONE else f"{n.op.value}+{n.activation.value}"
            counts[key] = counts.get(key, 0) + 1
        return dict(sorted(counts.items()))


def only_output(outputs: Sequence[T], stage: str, source: str = "the model") -> T:
    """The one element of ``outputs``; several are a bad input for ``stage`` until it handles them (issue 15)."""
    if len(outputs) != 1:
        raise BadInputError(f"{source} has {len(outputs)} outputs; {stage} handles one output so far "
                            "(multi-output models: issue 15)")
    return outputs[0]
