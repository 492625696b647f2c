"""Tracer handlers for the ops of dense-prediction heads (detection, segmentation): ``F.interpolate`` /
``nn.Upsample`` / ``nn.UpsamplingNearest2d`` / ``nn.UpsamplingBilinear2d`` (RESIZE) and ``nn.ConvTranspose2d`` /
``F.conv_transpose2d`` (CONV_TRANSPOSE). ``from_torch`` merges ``DENSE_HANDLERS`` into its handler table; its
``aten.convolution`` handler passes transposed convolutions (TorchScript's spelling) to ``conv_transpose``.

The input size is static at conversion, so a RESIZE stores its output size (a size taken from another tensor's
``.shape[-2:]`` is a constant by then) and, only where it changes the sampling, PyTorch's scale factor
(``mdeploy.graph.resize.normalised``). A resize to the input's own size is no op at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.conv_transpose import from_torch_layout
from mdeploy.graph.fx_nodes import op_name, pair, source
from mdeploy.graph.ir import ConvTransposeAttrs, Node, Op, ResizeAttrs
from mdeploy.graph.resize import normalised


class Builder(Protocol):
    """What these handlers use of ``from_torch``'s graph builder."""

    shapes: dict[str, tuple[int, ...]]

    def tensor(self, arg: object) -> str: ...

    def constant(self, arg: object) -> np.ndarray | None: ...

    def emit(self, fx_node: fx.Node, op: Op, inputs: list[str], **kwargs: Any) -> Node: ...

    def bind(self, fx_node: fx.Node, tensor: str) -> None: ...


Handler = Callable[[Builder, fx.Node], None]
DENSE_HANDLERS: dict[str, Handler] = {}


def handles(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            DENSE_HANDLERS[name] = fn
        return fn

    return register


def _where(n: fx.Node) -> str:
    return source(n) or "the model's forward()"


def _arg(n: fx.Node, i: int, name: str, default: object = None) -> Any:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


# -- resize --------------------------------------------------------------------------------------------------
RESIZE_MODES = {"upsample_nearest2d": "nearest", "_upsample_nearest_exact2d": "nearest-exact",
                "upsample_bilinear2d": "bilinear"}


@handles(*RESIZE_MODES)
def _resize(b: Builder, n: fx.Node) -> None:
    """aten.upsample_*2d: ``.vec`` (input, output_size, [align_corners,] scale_factors) as F.interpolate calls it,
    ``.default`` (input, output_size, [align_corners,] scales_h, scales_w)."""
    x = b.tensor(n.args[0])
    mode = RESIZE_MODES[op_name(n.target)]
    value = n.meta.get("val")
    if len(b.shapes[x]) != 4 or not isinstance(value, torch.Tensor):
        raise UnsupportedOpError(f"resize of a rank-{len(b.shapes[x])} tensor at {_where(n)}: mdeploy resizes "
                                 "(N, C, H, W) maps")
    in_size, size = tuple(b.shapes[x][2:]), (int(value.shape[2]), int(value.shape[3]))
    bilinear = mode == "bilinear"
    first_scale = 3 if bilinear else 2  # after output_size (and align_corners)
    if getattr(n.target, "_overloadname", "vec") == "vec":
        factors = _arg(n, first_scale, "scale_factors")
        scales = None if factors is None else tuple(float(f) for f in factors)
    else:
        pair_of = (_arg(n, first_scale, "scales_h"), _arg(n, first_scale + 1, "scales_w"))
        scales = None if None in pair_of else tuple(float(s) for s in pair_of)  # type: ignore[arg-type]
    align_corners = bool(_arg(n, 2, "align_corners", False)) if bilinear else False
    attrs = normalised(ResizeAttrs(size, mode, align_corners, scales), in_size)  # type: ignore[arg-type]
    if size == in_size and attrs.scales is None:  # every mode then reads each sample where it is
        b.bind(n, x)
        return
    b.emit(n, Op.RESIZE, [x], attrs=attrs)


@handles("_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")  # plain bicubic: the tracer's unknown-op error
def _antialiased_resize(b: Builder, n: fx.Node) -> None:
    what = "bilinear" if op_name(n.target) == "_upsample_bilinear2d_aa" else "bicubic"
    raise UnsupportedOpError(f"F.interpolate(mode='{what}', antialias=True) at {_where(n)} is not supported: "
                             "mdeploy resizes with mode='nearest', 'nearest-exact' or 'bilinear' (antialias=False)")


# -- transposed convolution ------------------------------------------------------------------------------------
def conv_transpose(b: Builder, n: fx.Node, x: object, weight: object, bias: object, stride: object, padding: object,
                   output_padding: object, groups: object, dilation: object) -> None:
    w = b.constant(weight)
    assert w is not None
    if w.ndim != 4:
        raise UnsupportedOpError(f"only 2-D transposed convolutions are supported (at {_where(n)})")
    groups = int(groups or 1)  # type: ignore[call-overload]
    bias_value = b.constant(bias)
    ir_weight = from_torch_layout(w.astype(np.float32), groups)
    attrs = ConvTransposeAttrs(pair(stride, 1), pair(padding, 0), pair(output_padding, 0), pair(dilation, 1), groups)
    b.emit(n, Op.CONV_TRANSPOSE, [b.tensor(x)], attrs=attrs, params={
        "weight": ir_weight,
        "bias": (bias_value if bias_value is not None else np.zeros(ir_weight.shape[0])).astype(np.float32),
    })


@handles("conv_transpose2d")
def _conv_transpose2d(b: Builder, n: fx.Node) -> None:
    """aten.conv_transpose2d.input(input, weight, bias, stride, padding, output_padding, groups, dilation)."""
    conv_transpose(b, n, n.args[0], n.args[1], _arg(n, 2, "bias"), _arg(n, 3, "stride", 1), _arg(n, 4, "padding", 0),
                   _arg(n, 5, "output_padding", 0), _arg(n, 6, "groups", 1), _arg(n, 7, "dilation", 1))
