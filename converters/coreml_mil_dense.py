"""Core ML for the ops of dense-prediction heads: the MIL lowerings of RESIZE and CONV_TRANSPOSE (``coreml_program``
merges ``DENSE_LOWERINGS`` into its ``LOWERINGS``; each function takes that module's ``_Emitter`` as ``e``) and the
MIL reference's ``resize_bilinear``, ``upsample_nearest_neighbor``, ``gather`` and ``conv_transpose``
(``coreml_mil_reference`` merges ``DENSE_MIL_OPS`` into its registry).

- bilinear RESIZE is ``resize_bilinear`` at the output size: ``UNALIGN_CORNERS`` samples at (d + 0.5) * in / out -
  0.5 clamped to the input (PyTorch's align_corners=False), ``STRICT_ALIGN_CORNERS`` at d * (in - 1) / (out - 1),
  0 for one output (align_corners=True; ``ALIGN_CORNERS`` would sample one output at the middle). A scale factor
  that sets PyTorch's sampling cannot be written (as coremltools' own frontend refuses it): Core ML samples by sizes;
- nearest RESIZE by whole factors is ``upsample_nearest_neighbor`` with integer factors (as coremltools' frontend
  writes FPN's 2x), any other nearest sampling two ``gather``s of PyTorch's indices: exact by definition, where the
  sampling of Core ML's fractional nearest ops is documented nowhere;
- CONV_TRANSPOSE is ``conv_transpose`` (weight (I, O/groups, kh, kw)) with PyTorch's padding as ``custom`` pads,
  output_padding taken off the pad after; where output_padding exceeds the padding, without bias, padded with zeros
  and the bias added after (the extra rows are bias only). int8 weights per output channel: with one group
  dequantized along axis 1; with groups, blockwise (iOS 18) or, on iOS 17 (one axis of the layout does not hold every
  output channel), as one dense group with zero blocks (exact).

The reference ops accumulate and interpolate in fp32 and round once to the declared dtype, like ``conv``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.conv_transpose import dense, to_torch_layout
from mdeploy.graph.ir import Activation, ConvTransposeAttrs, Node, Op, ResizeAttrs
from mdeploy.graph.resize import repeats, source_indices

RUNTIME_NAME = "MIL reference (not Core ML)"
Emitter = Any  # mdeploy.converters.coreml_program._Emitter (which imports this module)
# IR op -> (its lowering, the MIL ops it emits), as coreml_program.Lowering holds them
DENSE_LOWERINGS: dict[Op, tuple[Callable[..., Any], tuple[str, ...]]] = {}
DENSE_MIL_OPS: dict[str, Callable[..., Any]] = {}
# as coreml_program's: int8 weights (_Emitter.weight's ops), a fused ReLU / ReLU6 (_Emitter.activation)
WEIGHT_MIL_OPS = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
ACTIVATION_MIL_OPS = ("relu", "clip")


def lowers(kind: Op, *mil_ops: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        DENSE_LOWERINGS[kind] = (fn, mil_ops)
        return fn

    return register


@lowers(Op.RESIZE, "resize_bilinear", "upsample_nearest_neighbor", "gather")
def resize(e: Emitter, node: Node, xs: list[Any], name: str) -> Any:
    a = node.attrs
    assert isinstance(a, ResizeAttrs)
    in_size = tuple(e.graph.shapes[node.inputs[0]][2:])
    if a.mode == "bilinear":
        if a.scales is not None:
            raise UnsupportedOpError(
                f"the Core ML target cannot resize {in_size} -> {a.size} at {node.source or node.name} as PyTorch "
                f"does: F.interpolate samples with scale_factor {a.scales} (not recomputed; in * scale is not a "
                "whole size) and Core ML's resize_bilinear by the sizes: pass size=... or recompute_scale_factor=True")
        mode = "STRICT_ALIGN_CORNERS" if a.align_corners else "UNALIGN_CORNERS"
        return e.mb.resize_bilinear(x=xs[0], target_size_height=a.size[0], target_size_width=a.size[1],
                                    sampling_mode=mode, name=name)
    factors = repeats(a, in_size)  # type: ignore[arg-type]
    if factors is not None:
        return e.mb.upsample_nearest_neighbor(x=xs[0], scale_factor_height=np.int32(factors[0]),
                                              scale_factor_width=np.int32(factors[1]), name=name)
    rows, columns = source_indices(a, in_size)  # type: ignore[arg-type]
    y = e.mb.gather(x=xs[0], indices=rows.astype(np.int32), axis=2, name=name + "_rows")
    return e.mb.gather(x=y, indices=columns.astype(np.int32), axis=3, name=name)


@lowers(Op.CONV_TRANSPOSE, "conv_transpose", "pad", "add", *ACTIVATION_MIL_OPS, *WEIGHT_MIL_OPS)
def conv_transpose(e: Emitter, node: Node, xs: list[Any], name: str) -> Any:
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    weight, groups = _weight(e, node)
    (ph, pw), (oh, ow) = a.padding, a.output_padding
    extra = (max(oh - ph, 0), max(ow - pw, 0))  # output rows/columns beyond the full result: bias only
    pad = [ph, max(ph - oh, 0), pw, max(pw - ow, 0)]
    inner = name if node.activation is Activation.NONE and not any(extra) else name + "_conv_transpose"
    kwargs = {"bias": e.bias(node)} if not any(extra) else {}
    y = e.mb.conv_transpose(x=xs[0], weight=weight, strides=list(a.stride), pad_type="custom", pad=pad,
                            dilations=list(a.dilation), groups=groups, name=inner, **kwargs)
    if any(extra):
        padded = e.mb.pad(x=y, pad=np.array([0, 0, 0, 0, 0, extra[0], 0, extra[1]], np.int32), mode="constant",
                          constant_val=np.float32(0.0), name=name + "_padded")
        biased = name if node.activation is Activation.NONE else name + "_biased"
        y = e.mb.add(x=padded, y=e.bias(node).reshape(1, -1, 1, 1), name=biased)
    return e.activation(y, node.activation, name)


def _weight(e: Emitter, node: Node) -> tuple[Any, int]:
    """The MIL weight (I, O/groups, kh, kw) and the groups it is written with."""
    a = node.attrs
    assert isinstance(a, ConvTransposeAttrs)
    if not e.is_int8(node):
        return to_torch_layout(node.weight, a.groups).astype(np.float32), a.groups
    wq = e.quantized.weights[node.name]
    scale = wq.scale.astype(np.float32)
    if e.blockwise:  # a scale per (input, output) pair of the layout: per output channel in any group
        data = to_torch_layout(wq.values.astype(np.int8), a.groups)
        per_pair = np.repeat(scale.reshape(a.groups, 1, -1), data.shape[0] // a.groups, axis=1)
        blocks = scale.reshape(1, -1, 1, 1) if a.groups == 1 else per_pair.reshape(data.shape[0], -1, 1, 1)
        return e.mb.constexpr_blockwise_shift_scale(data=data, scale=blocks, name=node.name + "_weight"), a.groups
    data = to_torch_layout(dense(wq.values.astype(np.int8), a.groups), 1)
    return e.mb.constexpr_affine_dequantize(quantized_data=data, zero_point=np.int8(0), scale=scale, axis=1,
                                            name=node.name + "_weight"), 1


# -- the MIL reference -------------------------------------------------------------------------------------------
def mil_op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        DENSE_MIL_OPS[name] = fn
        return fn

    return register


def _unsupported(what: str) -> UnsupportedOpError:
    return UnsupportedOpError(f"MIL {what} is not implemented by the {RUNTIME_NAME}")


def _grid(n_in: int, n_out: int, mode: str) -> np.ndarray:
    """The fp32 source coordinates of ``n_out`` samples, as coremltools documents ``resize_bilinear``'s modes."""
    i = np.arange(n_out, dtype=np.float32)
    if mode == "UNALIGN_CORNERS":
        spacing = np.float32(n_in) / np.float32(n_out)
        grid = (i + np.float32(0.5)) * spacing - np.float32(0.5)
    elif mode == "STRICT_ALIGN_CORNERS":
        spacing = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
        grid = i * spacing
    else:
        raise _unsupported(f"resize_bilinear sampling_mode {mode!r}")
    return np.clip(grid, 0, n_in - 1)


def _lerp(x: np.ndarray, grid: np.ndarray, axis: int) -> np.ndarray:
    low = np.floor(grid).astype(np.int64)
    high = np.minimum(low + 1, x.shape[axis] - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = (grid - low).astype(np.float32).reshape(shape)
    a, b = np.take(x, low, axis=axis), np.take(x, high, axis=axis)
    return a + (b - a) * frac


@mil_op("resize_bilinear")
def resize_bilinear(x: np.ndarray, target_size_height: int = 1, target_size_width: int = 1,
                    sampling_mode: str = "DEFAULT") -> np.ndarray:
    """Interpolation along H then W between the samples around each source coordinate, in fp32."""
    y = x.astype(np.float32)
    y = _lerp(y, _grid(x.shape[-2], int(target_size_height), str(sampling_mode)), x.ndim - 2)
    return _lerp(y, _grid(x.shape[-1], int(target_size_width), str(sampling_mode)), x.ndim - 1)


@mil_op("upsample_nearest_neighbor")
def upsample_nearest_neighbor(x: np.ndarray, scale_factor_height: Any = 1, scale_factor_width: Any = 1) -> np.ndarray:
    """Each sample repeated by the (integer) factors: what the op documents for integers."""
    factors = (scale_factor_height, scale_factor_width)
    if any(float(f) != int(f) or int(f) < 1 for f in factors):
        raise _unsupported(f"upsample_nearest_neighbor by fractional factors {factors}")
    return np.repeat(np.repeat(x, int(factors[0]), axis=-2), int(factors[1]), axis=-1)


@mil_op("gather")
def gather(x: np.ndarray, indices: np.ndarray, axis: int = 0, batch_dims: int = 0,
           validate_indices: bool = False) -> np.ndarray:
    if int(batch_dims) != 0:
        raise _unsupported(f"gather with batch_dims={batch_dims}")
    return np.take(x, np.asarray(indices).astype(np.int64), axis=int(axis))


@mil_op("conv_transpose")
def conv_transpose(x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None, pad: Any = None,
                   output_shape: Any = None, pad_type: str = "valid", strides: Any = None, dilations: Any = None,
                   groups: int = 1) -> np.ndarray:
    """Each input sample adds weight * x at stride * its position (the full output, (in - 1) * stride + dilation *
    (k - 1) + 1), cropped by the custom pads; accumulated in fp32. An ``output_shape`` (coremltools records the
    inferred one) must be that shape."""
    if x.ndim != 4 or str(pad_type) not in ("custom", "valid"):
        raise _unsupported(f"conv_transpose of rank {x.ndim} with pad_type {pad_type!r}")
    x, w = x.astype(np.float32, copy=False), weight.astype(np.float32, copy=False)
    (sh, sw) = [int(s) for s in (strides if strides is not None else (1, 1))]
    (dh, dw) = [int(d) for d in (dilations if dilations is not None else (1, 1))]
    n, c_in, h, wd = x.shape
    groups = int(groups)
    per_group_in, per_group_out, kh, kw = c_in // groups, w.shape[1], w.shape[2], w.shape[3]
    full = np.zeros((n, per_group_out * groups, (h - 1) * sh + dh * (kh - 1) + 1, (wd - 1) * sw + dw * (kw - 1) + 1),
                    np.float32)
    for g in range(groups):
        xg = x[:, g * per_group_in:(g + 1) * per_group_in]
        wg = w[g * per_group_in:(g + 1) * per_group_in]
        outs = slice(g * per_group_out, (g + 1) * per_group_out)
        for i in range(kh):
            for j in range(kw):
                tap = np.einsum("nchw,co->nohw", xg, wg[:, :, i, j])
                full[:, outs, i * dh:i * dh + sh * (h - 1) + 1:sh, j * dw:j * dw + sw * (wd - 1) + 1:sw] += tap
    top, bottom, left, right = [int(p) for p in pad] if str(pad_type) == "custom" and pad is not None else [0] * 4
    y = full[:, :, top:full.shape[2] - bottom, left:full.shape[3] - right]
    if output_shape is not None and tuple(int(d) for d in output_shape)[1:] != y.shape[1:]:
        raise _unsupported(f"conv_transpose to output_shape {tuple(output_shape)} (its pads give {y.shape})")
    return y if bias is None else y + bias.astype(np.float32).reshape(1, -1, 1, 1)
