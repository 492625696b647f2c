"""Run an IR graph in PyTorch: the reference that quantisation simulates and converters are checked against."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from mdeploy.graph.ir import Activation, ClipAttrs, ConvAttrs, Graph, Node, Op, OpRegistry, PadAttrs
from mdeploy.graph.ir import GeluAttrs, LeakyReluAttrs, PoolAttrs, ReshapeAttrs, ShuffleAttrs, SliceAttrs
from mdeploy.graph.ir import ConvTransposeAttrs, ResizeAttrs, TransposeAttrs, concat_axis, softmax_axis
from mdeploy.graph.conv_transpose import to_torch_layout

# Called with (tensor name, value) for the graph input and every node output; returns the value to propagate.
TensorHook = Callable[[str, torch.Tensor], torch.Tensor]
OpFn = Callable[[Node, list[torch.Tensor], Mapping[str, torch.Tensor]], torch.Tensor]

OPS: OpRegistry[OpFn] = OpRegistry()
op = OPS.register


def activate(x: torch.Tensor, activation: Activation) -> torch.Tensor:
    if activation is Activation.RELU:
        return torch.relu(x)
    if activation is Activation.RELU6:
        return torch.clamp(x, 0.0, 6.0)
    return x


@op(Op.CONV)
def _conv(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    attrs = node.attrs
    assert isinstance(attrs, ConvAttrs)
    x = xs[0]
    top, bottom, left, right = attrs.padding
    if attrs.symmetric_padding is None:
        x = F.pad(x, (left, right, top, bottom))
        padding: tuple[int, int] = (0, 0)
    else:
        padding = attrs.symmetric_padding
    y = F.conv2d(x, params["weight"], params["bias"], attrs.stride, padding, attrs.dilation, attrs.groups)
    return activate(y, node.activation)


@op(Op.LINEAR)
def _linear(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return activate(F.linear(xs[0], params["weight"], params["bias"]), node.activation)


@op(Op.ADD)
def _add(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return xs[0] + xs[1]


@op(Op.MUL)
def _mul(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return xs[0] * xs[1]


@op(Op.RELU)
def _relu(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.relu(xs[0])


@op(Op.CLIP)
def _clip(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    attrs = node.attrs
    assert isinstance(attrs, ClipAttrs)
    return torch.clamp(xs[0], attrs.min, attrs.max)


@op(Op.HARDSWISH)
def _hardswish(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.hardswish(xs[0])


@op(Op.HARDSIGMOID)
def _hardsigmoid(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.hardsigmoid(xs[0])


@op(Op.SIGMOID)
def _sigmoid(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.sigmoid(xs[0])


@op(Op.SILU)
def _silu(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return F.silu(xs[0])


@op(Op.GELU)
def _gelu(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    assert isinstance(node.attrs, GeluAttrs)
    return F.gelu(xs[0], approximate=node.attrs.approximate)


@op(Op.LEAKY_RELU)
def _leaky_relu(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    assert isinstance(node.attrs, LeakyReluAttrs)
    return F.leaky_relu(xs[0], node.attrs.negative_slope)


def _along_channels(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A (C,) parameter shaped to broadcast along axis 1 of ``x``."""
    return value.reshape((1, -1) + (1,) * (x.dim() - 2))


@op(Op.PRELU)
def _prelu(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.where(xs[0] >= 0, xs[0], xs[0] * _along_channels(params["slope"], xs[0]))


@op(Op.AFFINE)
def _affine(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    x = xs[0]
    return x * _along_channels(params["scale"], x) + _along_channels(params["shift"], x)


@op(Op.GLOBAL_AVG_POOL)
def _global_avg_pool(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return xs[0].mean(dim=(2, 3), keepdim=True)


@op(Op.FLATTEN)
def _flatten(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.flatten(xs[0], 1)


@op(Op.PAD)
def _pad(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    attrs = node.attrs
    assert isinstance(attrs, PadAttrs)
    top, bottom, left, right = attrs.pads
    return F.pad(xs[0], (left, right, top, bottom))


@op(Op.CONCAT)
def _concat(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, dim=concat_axis(node))


@op(Op.MAX_POOL, Op.AVG_POOL)
def _pool(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    assert isinstance(a, PoolAttrs)
    if node.op is Op.MAX_POOL:
        return F.max_pool2d(xs[0], a.kernel, a.stride, a.padding, ceil_mode=a.ceil_mode)
    return F.avg_pool2d(xs[0], a.kernel, a.stride, a.padding, a.ceil_mode, a.count_include_pad, a.divisor_override)


@op(Op.CHANNEL_SHUFFLE)
def _channel_shuffle(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    assert isinstance(node.attrs, ShuffleAttrs)
    n, c, h, w = xs[0].shape
    return xs[0].reshape(n, node.attrs.groups, c // node.attrs.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


@op(Op.SLICE)
def _slice(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    assert isinstance(node.attrs, SliceAttrs)
    return xs[0][:, node.attrs.start : node.attrs.end]


@op(Op.SOFTMAX)
def _softmax(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.softmax(xs[0], dim=softmax_axis(node, xs[0].dim()))


@op(Op.RESHAPE)
def _reshape(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    assert isinstance(node.attrs, ReshapeAttrs)
    return xs[0].reshape(xs[0].shape[0], *node.attrs.shape[1:])  # at the batch it runs at


@op(Op.TRANSPOSE)
def _transpose(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    assert isinstance(node.attrs, TransposeAttrs)
    return xs[0].permute(node.attrs.perm)


@op(Op.MATMUL)
def _matmul(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return torch.matmul(xs[0], xs[1])


@op(Op.RESIZE)
def _resize(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    assert isinstance(a, ResizeAttrs)
    align_corners = a.align_corners if a.mode == "bilinear" else None
    if a.scales is not None:  # PyTorch's scale factor sets the sampling (mdeploy.graph.resize)
        return F.interpolate(xs[0], scale_factor=a.scales, mode=a.mode, align_corners=align_corners,
                             recompute_scale_factor=False)
    return F.interpolate(xs[0], size=a.size, mode=a.mode, align_corners=align_corners)


@op(Op.CONV_TRANSPOSE)
def _conv_transpose(node: Node, xs: list[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    weight = to_torch_layout(params["weight"], a.groups)
    y = F.conv_transpose2d(xs[0], weight, params["bias"], a.stride, a.padding, a.output_padding, a.groups,
                           a.dilation)
    return activate(y, node.activation)


def node_params(node: Node) -> dict[str, torch.Tensor]:
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in node.params.items()}


class GraphRunner:
    """Runs a graph on float32 batches (``dtype=torch.float64``: float64, to tell float32 rounding from a wrong
    translation). Parameters are converted to tensors once; ``params`` may be overridden per node (the quantiser
    swaps in rounded weights) and ``hook`` sees every tensor as it is produced."""

    def __init__(self, graph: Graph, dtype: torch.dtype = torch.float32) -> None:
        self.graph, self.dtype = graph, dtype
        self.params: dict[str, dict[str, torch.Tensor]] = {
            n.name: {key: value.to(dtype) if value.is_floating_point() else value
                     for key, value in node_params(n).items()} for n in graph.nodes}

    @torch.no_grad()
    def run(
        self, x: torch.Tensor | np.ndarray, hook: TensorHook | None = None, keep: set[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """Returns the outputs and the tensors named in ``keep``; others are freed once consumed."""
        keep = set(self.graph.outputs) | (keep or set())
        last_use = {name: i for i, node in enumerate(self.graph.nodes) for name in node.inputs}
        values: dict[str, torch.Tensor] = {}
        x = torch.as_tensor(x, dtype=self.dtype)
        values[self.graph.input_name] = hook(self.graph.input_name, x) if hook else x
        for i, node in enumerate(self.graph.nodes):
            y = OPS[node.op](node, [values[name] for name in node.inputs], self.params[node.name])
            values[node.output] = hook(node.output, y) if hook else y
            for name in node.inputs:
                if last_use[name] == i and name not in keep:
                    del values[name]
        return {name: values[name] for name in keep if name in values}

    def outputs(self, x: torch.Tensor | np.ndarray, hook: TensorHook | None = None) -> tuple[torch.Tensor, ...]:
        """Every output of the graph, in the model's order."""
        values = self.run(x, hook)
        return tuple(values[name] for name in self.graph.outputs)

    def __call__(self, x: torch.Tensor | np.ndarray, hook: TensorHook | None = None) -> torch.Tensor:
        """The output of a one-output graph (``outputs`` for any graph)."""
        return self.run(x, hook)[self.graph.single_output("running the graph for one output")]
