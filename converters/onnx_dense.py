"""ONNX emitters of RESIZE and CONV_TRANSPOSE (``onnx`` merges ``DENSE_EMITTERS`` into its ``EMITTERS``; each
function takes that module's ``_Writer`` as ``w``).

- RESIZE bilinear is ``Resize`` (linear; ``align_corners``, or ``half_pixel`` - which clamps like PyTorch, where
  ``pytorch_half_pixel`` would sample a one-pixel output at 0), on ``sizes``, or on ``scales`` where PyTorch's
  scale factor sets the sampling. Nearest by whole factors is ``Resize`` (nearest, ``asymmetric``, ``floor``: d // f
  exactly); any other nearest sampling is two ``Gather``s of PyTorch's own indices (``mdeploy.graph.resize``), as
  ONNX Runtime's nearest ``Resize`` divides by out / in in float32 and floors some exact quotients one sample low
  (14 -> 2: index 6 where PyTorch reads 7). int8: between the input's DequantizeLinear and the output's
  QuantizeLinear, on the input's grid.
- CONV_TRANSPOSE is ``ConvTranspose`` (pads, output_padding, group, dilations as PyTorch's). int8 weights are
  int8 per output channel: with one group in ONNX's (I, O, kh, kw) layout, dequantized along axis 1; with groups,
  dequantized in the IR's (O, I/g, kh, kw) layout along axis 0 and rearranged (Reshape, Transpose, Reshape), as
  one axis of ONNX's layout does not hold every output channel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.graph.conv_transpose import to_torch_layout
from mdeploy.graph.ir import Activation, ConvTransposeAttrs, Node, Op, OpRegistry, ResizeAttrs
from mdeploy.graph.resize import repeats, source_indices
from mdeploy.quantize.params import quantize_bias

Writer = Any  # mdeploy.converters.onnx._Writer (which imports this module)
CODE_OFFSET = 128


def stored_codes(int8_codes: Any) -> np.ndarray:
    """int8 codes (or zero points) as the ONNX file stores them: uint8, code + 128, the same grid. ONNX Runtime's x86
    kernels without VNNI (AVX2) run int8 x int8 as unsigned x signed with VPMADDUBSW, whose 16-bit pair sums
    saturate (the real MobileNetV2: 22.4 dB on its reference kernels, 10.3 dB fused, on an AVX2-only AMD EPYC);
    uint8 x uint8 widens first and cannot saturate (ONNX Runtime's quantisation guide). ARM runs both on dot-product
    instructions."""
    return (np.asarray(int8_codes, np.int16) + CODE_OFFSET).astype(np.uint8)
DENSE_EMITTERS: OpRegistry[Callable[[Writer, Node, list[str], str], str]] = OpRegistry()
emits = DENSE_EMITTERS.register


@emits(Op.RESIZE)
def resize(w: Writer, node: Node, inputs: list[str], out: str) -> str:
    a = node.attrs
    assert isinstance(a, ResizeAttrs)
    in_size = tuple(w.graph.shapes[node.inputs[0]][2:])
    if a.mode == "bilinear":
        sampling = "align_corners" if a.align_corners else "half_pixel"
        return w.add("Resize", [inputs[0], *_resize_target(w, a, inputs[0], out)], out, mode="linear",
                     coordinate_transformation_mode=sampling)
    if repeats(a, in_size) is not None:
        return w.add("Resize", [inputs[0], *_resize_target(w, a, inputs[0], out)], out, mode="nearest",
                     coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    rows, columns = source_indices(a, in_size)  # type: ignore[arg-type]
    y = w.add("Gather", [inputs[0], w.constant(out + "/rows", rows.astype(np.int64))], out + "/rows_gathered", axis=2)
    return w.add("Gather", [y, w.constant(out + "/columns", columns.astype(np.int64))], out, axis=3)


def _resize_target(w: Writer, a: ResizeAttrs, x: str, out: str) -> list[str]:
    """Resize's roi, scales and sizes inputs ("" for one left out). Sizes are the input's (N, C) and the output's
    (H, W): opset 17's Resize has no ``axes``, and the batch is dynamic."""
    roi = w.constant(out + "/roi", np.zeros(0, np.float32))
    if a.scales is not None:
        return [roi, w.constant(out + "/scales", np.array([1.0, 1.0, *a.scales], np.float32))]
    batch_channels = w.add("Shape", [x], out + "/batch_channels", start=0, end=2)
    sizes = w.add("Concat", [batch_channels, w.constant(out + "/size", np.array(a.size, np.int64))], out + "/sizes",
                  axis=0)
    return [roi, "", sizes]


@emits(Op.CONV_TRANSPOSE)
def conv_transpose(w: Writer, node: Node, inputs: list[str], out: str) -> str:
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    (ph, pw), activation = a.padding, node.activation
    y = w.add("ConvTranspose", [inputs[0], _weight(w, node), _bias(w, node)],
              out + "/conv_transpose" if activation is not Activation.NONE else out, strides=list(a.stride),
              pads=[ph, pw, ph, pw], output_padding=list(a.output_padding), dilations=list(a.dilation),
              group=a.groups, kernel_shape=list(node.weight.shape[2:]))
    return w.activation(y, activation, out)


def _weight(w: Writer, node: Node) -> str:
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    name = node.name + "/weight"
    if not w.is_int8(node):
        return w.constant(name, to_torch_layout(node.weight, a.groups))
    wq = w.quantized.weights[node.name]
    channels = len(wq.scale)
    scale = w.constant(name + "_scale", wq.scale.astype(np.float32))
    zero_point = w.constant(name + "_zero_point", stored_codes(np.zeros(channels, np.int8)))
    if a.groups == 1:
        codes = w.constant(name + "_q", to_torch_layout(stored_codes(wq.values), 1))
        return w.add("DequantizeLinear", [codes, scale, zero_point], name, axis=1)
    codes = w.constant(name + "_q", stored_codes(wq.values))
    ir = w.add("DequantizeLinear", [codes, scale, zero_point], name + "_ir_layout", axis=0)
    o, per_group_in, kh, kw = wq.values.shape
    grouped = w.constant(name + "/grouped_shape", np.array([a.groups, o // a.groups, per_group_in, kh, kw], np.int64))
    y = w.add("Reshape", [ir, grouped], name + "_grouped")
    y = w.add("Transpose", [y], name + "_swapped", perm=[0, 2, 1, 3, 4])
    shape = w.constant(name + "/shape", np.array([a.groups * per_group_in, o // a.groups, kh, kw], np.int64))
    return w.add("Reshape", [y, shape], name)


def _bias(w: Writer, node: Node) -> str:
    """The float bias, or int32 codes at input_scale * weight_scale dequantized (as CONV's)."""
    name = node.name + "/bias"
    if not w.is_int8(node):
        return w.constant(name, node.bias.astype(np.float32))
    wq = w.quantized.weights[node.name]
    input_scale = w.quantized.activations[node.inputs[0]].scale
    codes = w.constant(name + "_q", quantize_bias(node.bias, input_scale, wq.scale))
    scale = w.constant(name + "_scale", (input_scale * wq.scale).astype(np.float32))
    zero_point = w.constant(name + "_zero_point", np.zeros(len(wq.scale), np.int32))
    return w.add("DequantizeLinear", [codes, scale, zero_point], name, axis=0)
