"""How an ExecuTorch program writes the IR's ops so that XNNPACK takes them whole: one small function per op where
the IR's own computation (``graph/execute.py``) would leave work outside the delegate or compute it wrong there.

Each form gets the node, its inputs (float: dequantized in an int8 program), its parameters as the program holds
them (``program_params``) and ``hold(value, tensor)``: in an int8 program the value through a quantize/dequantize
pair on the grid of the IR tensor ``tensor`` (what XNNPACK's partitioner needs to see around an intermediate it is
to keep in int8), in an fp32 program the value itself. A form returns None where the IR's op is already right.

Found by tests/op_harness.py (every op model as a program, fp32 and int8, one delegate with nothing outside):

- XNNPACK's convolution and linear patterns take ``hardtanh(0, 6)`` as their fused activation, not ``clamp``;
- hard-swish is ``F.hardswish`` (XNNPACK's own); hard-sigmoid of a map is a 1x1 depthwise convolution (weight
  1/6, bias 1/2, clamped to [0, 1]): ExecuTorch's decomposition of ``F.hardsigmoid`` leaves a dtype copy of each
  scalar constant outside (18 on MobileNetV3-Small), and any elementwise op with a scalar puts a transpose to NCHW
  and back around itself inside the delegate (56 on the fp32 V3-Small when both were spelled with scalars: 6.0 ms
  against 5.2 ms with XNNPACK's hard-swish); of other tensors it is ``hardtanh(x + 3, 0, 6) * (1/6)``;
- GELU's tanh form is spelled out: ExecuTorch hands XNNPACK ``gelu`` without its ``approximate`` (erf form, 7e-5 off);
- a softmax over another axis than the last runs on a 2-d view with that axis last: XNNPACK's softmax is over the
  last axis, and inside the delegate a map is channels-last, which ExecuTorch 1.5.1 hands over as it is (0.08 off
  over W or H of a convolution's output; over dim 1 of (N, C, A) it stays outside);
- PReLU is ``F.prelu`` on a map (the IR's ``where`` form is not delegated), of (N, C) features on a (N, C, 1, 1) view;
- a batched matmul is one ``bmm`` (``torch.matmul`` leaves an ``expand`` outside), multi-query attention's with a
  key or value shared by every head with the heads folded into the rows (17 delegates on MobileNetV4-Hybrid);
- a transposed convolution reads its weight in PyTorch's layout as a buffer (the IR's layout, permuted in the
  program, is no static weight to XNNPACK: the convolution stayed outside);
- an average pool with padding, ``ceil_mode`` or a divisor is XNNPACK's pool (padding not counted) times a
  correction to PyTorch's divisor;
- nearest upsampling by whole factors is copies joined and reshaped (XNNPACK has no nearest resize), each copy
  moving values, or int8 codes, exactly;
- a channel shuffle's reshapes and transpose each hold the int8 grid (else XNNPACK moves the values in float);
- a transpose is a contiguous copy (``permute_copy``): a reshape of a permuted view exports a ``clone``, which the
  partitioner takes in fp32 only (in int8, a float conversion before and after it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from mdeploy.graph.conv_transpose import to_torch_layout
from mdeploy.graph.execute import OPS, node_params
from mdeploy.graph.ir import (Activation, ConvTransposeAttrs, GeluAttrs, Node, Op, OpRegistry, PoolAttrs,
                              ResizeAttrs, ShuffleAttrs, TransposeAttrs, softmax_axis)
from mdeploy.graph.pooling import pool_geometry
from mdeploy.graph.resize import repeats

Hold = Callable[[torch.Tensor, str], torch.Tensor]
Form = Callable[[Node, list[torch.Tensor], Mapping[str, torch.Tensor], Hold], "torch.Tensor | None"]
FORMS: OpRegistry[Form] = OpRegistry()
GELU_TANH_SCALE = float(np.sqrt(2.0 / np.pi))


def unheld(value: torch.Tensor, _tensor: str) -> torch.Tensor:
    """``hold`` of an fp32 program."""
    return value


def run_node(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
             hold: Hold = unheld) -> torch.Tensor:
    """``node`` as the program computes it: its form where it has one, else ``graph/execute.py``'s op."""
    written = FORMS[node.op](node, inputs, params, hold) if node.op in FORMS else None
    return written if written is not None else OPS[node.op](node, inputs, params)


def program_params(node: Node, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """``node``'s parameters as the program holds them: a transposed convolution's weight in PyTorch's layout, a
    hard-sigmoid of a map with its depthwise convolution's (``float_gate_*``)."""
    params = node_params(node)
    if node.op is Op.CONV_TRANSPOSE:
        assert isinstance(node.attrs, ConvTransposeAttrs)
        params["weight"] = to_torch_layout(params["weight"], node.attrs.groups).contiguous()
    if node.op is Op.HARDSIGMOID and len(shapes[node.inputs[0]]) == 4:
        channels = shapes[node.inputs[0]][1]
        params["float_gate_weight"] = torch.full((channels, 1, 1, 1), 1.0 / 6.0)
        params["float_gate_bias"] = torch.full((channels,), 0.5)
    return params


def fused(y: torch.Tensor, activation: Activation) -> torch.Tensor:
    """``y`` through a fused activation as XNNPACK's patterns take it (ReLU6 as ``hardtanh``)."""
    if activation is Activation.RELU6:
        return F.hardtanh(y, 0.0, 6.0)
    return torch.relu(y) if activation is Activation.RELU else y


@FORMS.register(Op.CONV, Op.LINEAR)
def _relu6_as_hardtanh(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                       hold: Hold) -> torch.Tensor | None:
    if node.activation is not Activation.RELU6:
        return None
    return fused(OPS[node.op](dataclasses.replace(node, activation=Activation.NONE), inputs, params), node.activation)


@FORMS.register(Op.HARDSIGMOID)
def _hard_sigmoid(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                  hold: Hold) -> torch.Tensor:
    x = inputs[0]
    if "float_gate_weight" not in params:
        return F.hardtanh(x + 3.0, 0.0, 6.0) * (1.0 / 6.0)
    gate = F.conv2d(x, params["float_gate_weight"], params["float_gate_bias"], groups=x.shape[1])
    return F.hardtanh(gate, 0.0, 1.0)


@FORMS.register(Op.HARDSWISH)
def _hard_swish(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                hold: Hold) -> torch.Tensor:
    return F.hardswish(inputs[0])


@FORMS.register(Op.GELU)
def _gelu_tanh(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
               hold: Hold) -> torch.Tensor | None:
    if not (isinstance(node.attrs, GeluAttrs) and node.attrs.approximate == "tanh"):
        return None
    x = inputs[0]
    return 0.5 * x * (1.0 + torch.tanh(GELU_TANH_SCALE * (x + 0.044715 * x * x * x)))


@FORMS.register(Op.SOFTMAX)
def _softmax_last_axis(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                       hold: Hold) -> torch.Tensor | None:
    x = inputs[0]
    axis = softmax_axis(node, x.dim()) % x.dim()
    last = axis == x.dim() - 1
    if x.dim() <= 2 and last:
        return None
    moved = x if last else x.transpose(axis, -1)
    flat = torch.softmax(moved.reshape(-1, moved.shape[-1]), dim=-1).reshape(moved.shape)
    return flat if last else flat.transpose(axis, -1)


@FORMS.register(Op.PRELU)
def _prelu(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
           hold: Hold) -> torch.Tensor | None:
    x = inputs[0]
    if x.dim() == 4:
        return F.prelu(x, params["slope"])
    if x.dim() != 2:
        return None
    y = F.prelu(hold(x.reshape(*x.shape, 1, 1), node.inputs[0]), params["slope"])
    return hold(y, node.output).reshape(x.shape)


@FORMS.register(Op.MATMUL)
def _matmul_as_bmm(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                   hold: Hold) -> torch.Tensor | None:
    """A batched ``a @ b`` as one ``bmm`` on (batch, rows, k) @ (batch, k, cols): ``torch.matmul`` on rank 3 and
    more adds an ``expand`` (even one that changes nothing), which XNNPACK does not take. Multi-query attention's
    key and value, (N, 1, k, cols) shared by every head of ``a`` (N, heads, rows, k), fold the heads into the rows
    instead (17 delegates on MobileNetV4-Hybrid without). In int8 each reshaped operand and the product keep their
    grids."""
    a, b = inputs
    if a.dim() < 3 or a.dim() != b.dim():
        return None
    rows, cols = a.shape[-2], b.shape[-1]
    if a.shape[:-2] == b.shape[:-2]:
        a3, b3 = a.reshape(-1, rows, a.shape[-1]), b.reshape(-1, *b.shape[-2:])
        out_shape = (*a.shape[:-2], rows, cols)
    elif a.dim() == 4 and b.shape[1] == 1 and a.shape[0] == b.shape[0]:
        a3, b3 = a.reshape(a.shape[0], a.shape[1] * rows, a.shape[-1]), b.reshape(b.shape[0], *b.shape[-2:])
        out_shape = (*a.shape[:2], rows, cols)
    else:
        return None
    product = torch.bmm(a3 if a.dim() == 3 else hold(a3, node.inputs[0]),
                        b3 if b.dim() == 3 else hold(b3, node.inputs[1]))
    return product if a.dim() == 3 else hold(product, node.output).reshape(out_shape)


@FORMS.register(Op.AVG_POOL)
def _avg_pool_delegated(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                        hold: Hold) -> torch.Tensor | None:
    """An average pool with padding, ``ceil_mode`` or a divisor, none of which XNNPACK's average pooling takes
    (ExecuTorch's portable kernel ran it outside): XNNPACK's own pool, which leaves padding out of the count, times
    the per-position ratio of that count to PyTorch's divisor. ``ceil_mode``'s extra windows need padding at the
    end: in fp32 zeros padded explicitly, pooled, times ``graph/pooling``'s correction; an int8 program keeps the
    IR's op there (XNNPACK failed to load a constant pad between int8 tensors)."""
    x, attrs = inputs[0], node.attrs
    assert isinstance(attrs, PoolAttrs)
    size = (x.shape[2], x.shape[3])
    wanted = pool_geometry(attrs, size, average=True)
    if not wanted.padded and wanted.correction is None:
        return None
    if not attrs.ceil_mode:
        counted = pool_geometry(dataclasses.replace(attrs, count_include_pad=False, divisor_override=None), size,
                                average=True)
        ratio = _ones(wanted.out, wanted.correction) / _ones(wanted.out, counted.correction)
        y = F.avg_pool2d(x, attrs.kernel, attrs.stride, attrs.padding, count_include_pad=False)
    elif hold is unheld:
        top, bottom, left, right = wanted.pads
        y = F.avg_pool2d(F.pad(x, (left, right, top, bottom)), attrs.kernel, attrs.stride)
        ratio = _ones(wanted.out, wanted.correction)
    else:
        return None
    return y if np.all(ratio == 1.0) else y * torch.from_numpy(ratio.reshape(1, 1, *ratio.shape).astype(np.float32))


def _ones(shape: tuple[int, int], correction: np.ndarray | None) -> np.ndarray:
    """``graph/pooling``'s correction (kh * kw / divisor per position), ones where it is None."""
    return np.ones(shape) if correction is None else correction


@FORMS.register(Op.CONV_TRANSPOSE)
def _conv_transpose(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                    hold: Hold) -> torch.Tensor:
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    y = F.conv_transpose2d(inputs[0], params["weight"], params["bias"], a.stride, a.padding, a.output_padding,
                           a.groups, a.dilation)
    return fused(y, node.activation)


@FORMS.register(Op.RESIZE)
def _nearest_repeat(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                    hold: Hold) -> torch.Tensor | None:
    """Each sample repeated fh x fw times: fw copies joined on a new last axis read as fw times the width, then
    fh copies of each row joined read as fh times the height. In int8 every step keeps the input's grid (a
    nearest RESIZE's output grid is its input's; the program quantizes the result)."""
    x = inputs[0]
    assert isinstance(node.attrs, ResizeAttrs)
    factors = repeats(node.attrs, (x.shape[2], x.shape[3]))
    if factors is None:
        return None
    fh, fw = factors
    n, c, h, w = x.shape
    steps = [(fw, (n, c, h, w, 1), 4, (n, c, h, w * fw))] if fw > 1 else []
    steps += [(fh, (n, c, h, 1, w * fw), 3, (n, c, h * fh, w * fw))] if fh > 1 else []
    for i, (copies, single, axis, joined) in enumerate(steps):
        x = hold(x, node.output) if i else x
        views = [hold(x.reshape(single), node.output) for _ in range(copies)]  # one node each: cat wants >= 2
        x = hold(torch.cat(views, dim=axis), node.output).reshape(joined)
    return x


@FORMS.register(Op.CHANNEL_SHUFFLE)
def _channel_shuffle(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                     hold: Hold) -> torch.Tensor:
    """(N, g, C/g, H, W), its two channel axes swapped, read back as (N, C, H, W): in int8 each step on the
    input's grid (which the output shares), so that XNNPACK moves int8 codes instead of converting to float and
    back around the shuffle (32 conversions in ShuffleNetV2 x0.5). ``permute_copy`` as for ``Op.TRANSPOSE``."""
    x = inputs[0]
    assert isinstance(node.attrs, ShuffleAttrs)
    n, c, h, w = x.shape
    split = hold(x.reshape(n, node.attrs.groups, c // node.attrs.groups, h, w), node.output)
    return hold(torch.permute_copy(split, (0, 2, 1, 3, 4)), node.output).reshape(n, c, h, w)


@FORMS.register(Op.TRANSPOSE)
def _transpose_copy(node: Node, inputs: list[torch.Tensor], params: Mapping[str, torch.Tensor],
                    hold: Hold) -> torch.Tensor:
    assert isinstance(node.attrs, TransposeAttrs)
    return torch.permute_copy(inputs[0], node.attrs.perm)
