"""CONV_TRANSPOSE's geometry and weight layouts, shared by the tracer, the quantiser and the writers.

The IR keeps the weight as ``(O, I/groups, kh, kw)`` (axis 0 the output channel, as CONV's), PyTorch's
``(I, O/groups, kh, kw)`` regrouped. A transposed convolution is the convolution, stride 1, of its input with
``stride - 1`` zeros between samples (``stuffed``), padded by ``dilation * (k - 1) - padding`` before and that plus
``output_padding`` after, with the kernel flipped in H and W (``equivalent_conv``): the quantiser accumulates its
statistics and rounds its weights on that convolution.
"""

from __future__ import annotations

import numpy as np
import torch

from mdeploy.graph.ir import ConvAttrs, ConvTransposeAttrs, Node, Op


def output_size(attrs: ConvTransposeAttrs, in_size: tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
    return tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1  # type: ignore[return-value]
                 for n, s, p, d, k, op in zip(in_size, attrs.stride, attrs.padding, attrs.dilation, kernel,
                                              attrs.output_padding, strict=True))


def from_torch_layout(weight: np.ndarray, groups: int) -> np.ndarray:
    """PyTorch's (I, O/g, kh, kw) -> the IR's (O, I/g, kh, kw)."""
    i, per_group_out, kh, kw = weight.shape
    grouped = weight.reshape(groups, i // groups, per_group_out, kh, kw).transpose(0, 2, 1, 3, 4)
    return np.ascontiguousarray(grouped.reshape(groups * per_group_out, i // groups, kh, kw))


def to_torch_layout(weight: np.ndarray | torch.Tensor, groups: int) -> np.ndarray | torch.Tensor:
    """The IR's (O, I/g, kh, kw) -> PyTorch's, ONNX's and Core ML's (I, O/g, kh, kw)."""
    o, per_group_in, kh, kw = weight.shape
    grouped = weight.reshape(groups, o // groups, per_group_in, kh, kw)
    if isinstance(grouped, np.ndarray):
        return np.ascontiguousarray(grouped.swapaxes(1, 2).reshape(groups * per_group_in, o // groups, kh, kw))
    return grouped.transpose(1, 2).reshape(groups * per_group_in, o // groups, kh, kw)


def dense(weight: np.ndarray, groups: int) -> np.ndarray:
    """The IR weight of the same transposed convolution with one group: (O, I, kh, kw), zero outside each group's
    block (for targets without grouped transposed convolutions; zeros add exactly nothing, also in int8)."""
    if groups == 1:
        return weight
    o, per_group_in, kh, kw = weight.shape
    per_group_out = o // groups
    full = np.zeros((o, per_group_in * groups, kh, kw), weight.dtype)
    for g in range(groups):
        rows = slice(g * per_group_out, (g + 1) * per_group_out)
        full[rows, g * per_group_in:(g + 1) * per_group_in] = weight[rows]
    return full


def dilated(weight: np.ndarray, dilation: tuple[int, int]) -> np.ndarray:
    """The kernel with dilation - 1 zeros between taps (for targets without dilated transposed convolutions)."""
    if dilation == (1, 1):
        return weight
    dh, dw = dilation
    o, i, kh, kw = weight.shape
    full = np.zeros((o, i, dh * (kh - 1) + 1, dw * (kw - 1) + 1), weight.dtype)
    full[:, :, ::dh, ::dw] = weight
    return full


def stuffed(x: torch.Tensor, stride: tuple[int, int]) -> torch.Tensor:
    """``x`` with stride - 1 zeros between its samples in H and W."""
    if stride == (1, 1):
        return x
    n, c, h, w = x.shape
    out = x.new_zeros((n, c, (h - 1) * stride[0] + 1, (w - 1) * stride[1] + 1))
    out[:, :, ::stride[0], ::stride[1]] = x
    return out


def equivalent_conv(node: Node) -> Node:
    """The CONV (stride 1, on the ``stuffed`` input) computing ``node``'s output: kernel flipped in H and W, padded
    by dilation * (k - 1) - padding (negative: cropped) and output_padding more after."""
    attrs = node.attrs
    assert isinstance(attrs, ConvTransposeAttrs)
    kh, kw = node.weight.shape[2:]
    (dh, dw), (ph, pw), (oh, ow) = attrs.dilation, attrs.padding, attrs.output_padding
    top, left = dh * (kh - 1) - ph, dw * (kw - 1) - pw
    conv_attrs = ConvAttrs((1, 1), (top, top + oh, left, left + ow), attrs.dilation, attrs.groups)
    params = {"weight": np.ascontiguousarray(node.weight[:, :, ::-1, ::-1]), "bias": node.bias}
    return Node(node.name, Op.CONV, list(node.inputs), node.output, conv_attrs, params, node.activation, node.source)
