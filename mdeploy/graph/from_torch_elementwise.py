"""Tracer handlers for elementwise ops: SiLU, GELU, LeakyReLU, PReLU, and add/sub/mul/div, of two feature maps (ADD,
MUL) or of a feature map and a constant (AFFINE: ``x * scale[c] + shift[c]``). ``from_torch`` merges
``ELEMENTWISE_HANDLERS`` into its handler table and calls ``fold_constant`` on every node first:

- a node that reads only constants (registered parameters and buffers, numbers, lifted tensors) is computed once
  at conversion and becomes a constant itself: ``self.gamma.view(1, -1, 1, 1)``, ``self.scale * 2``;
- a constant operand may be a number or any tensor that broadcasts to one value per channel (axis 1): a scalar,
  ``(C, 1, 1)``, ``(1, C, 1, 1)``, and ``(C,)`` on an (N, C) tensor. MobileNetV4's LayerScale2d
  (``x * gamma.view(1, -1, 1, 1)``), input normalisation ``(x - mean) / std`` and the ``x + 3`` / ``/ 6`` of a
  hard-swish written out all become AFFINE; ``mdeploy.graph.rewrite`` then recognises the written-out activations
  and folds what is left into a preceding convolution where it can.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.fx_nodes import op_name, source
from mdeploy.graph.ir import GeluAttrs, LeakyReluAttrs, Node, Op


class Builder(Protocol):
    """What these handlers use of ``from_torch``'s graph builder."""

    constants: dict[str, np.ndarray]
    shapes: dict[str, tuple[int, ...]]

    def tensor(self, arg: object) -> str: ...

    def emit(self, fx_node: fx.Node, op: Op, inputs: list[str], **kwargs: Any) -> Node: ...


ElementwiseHandler = Callable[[Builder, fx.Node], None]
ELEMENTWISE_HANDLERS: dict[str, ElementwiseHandler] = {}


def handles(*names: str) -> Callable[[ElementwiseHandler], ElementwiseHandler]:
    def register(fn: ElementwiseHandler) -> ElementwiseHandler:
        for name in names:
            ELEMENTWISE_HANDLERS[name] = fn
        return fn

    return register


def _fx_nodes(value: object) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _fx_nodes(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _fx_nodes(v)]
    return []


def fold_constant(b: Builder, n: fx.Node) -> bool:
    """Computes ``n`` now if it reads no feature map (only constants and numbers) and makes a tensor: its value
    becomes a constant of the builder. False (nothing done) otherwise, or if PyTorch cannot compute it here."""
    if n.op != "call_function" or not all(a.name in b.constants for a in _fx_nodes((n.args, n.kwargs))):
        return False

    def value(arg: object) -> object:
        if isinstance(arg, fx.Node):
            return torch.from_numpy(b.constants[arg.name])
        if isinstance(arg, (list, tuple)):
            return type(arg)(value(a) for a in arg)
        return arg

    try:
        with torch.no_grad():
            result = n.target(*value(n.args), **{k: value(v) for k, v in n.kwargs.items()})  # type: ignore[operator]
    except Exception:  # noqa: BLE001  # not computable here: the op's handler reports it
        return False
    if not isinstance(result, torch.Tensor):
        return False
    b.constants[n.name] = result.detach().float().numpy()
    return True


def _is_constant(b: Builder, arg: object) -> bool:
    return isinstance(arg, (int, float)) or (isinstance(arg, fx.Node) and arg.name in b.constants)


def per_channel(value: np.ndarray | float, shape: tuple[int, ...], what: str, where: str) -> np.ndarray:
    """``value`` as (C,) float64 if it broadcasts against a tensor of ``shape`` (N, C, ...) to one value per
    channel without changing the tensor's shape; else an error naming ``what`` and ``where``."""
    v = np.asarray(value, np.float64)
    rank = len(shape)
    problem = None
    if rank < 2:
        problem = f"a rank-{rank} tensor has no channel axis"
    elif v.ndim > rank or (v.ndim == rank and v.shape[0] != 1):
        problem = f"its shape {tuple(v.shape)} is larger than the feature map's {shape}"
    else:
        try:
            full = np.broadcast_to(v, (1, *shape[1:]))
        except ValueError:
            full = None
        if full is None:
            problem = f"its shape {tuple(v.shape)} does not broadcast to the feature map's {shape}"
        else:
            flat = full.reshape(shape[1], -1)
            if np.all(flat == flat[:, :1]):
                return flat[:, 0].copy()
            problem = f"its shape {tuple(v.shape)} gives values that vary within a channel"
    raise UnsupportedOpError(f"{what} at {where}: {problem}; mdeploy supports a constant with one value per "
                             "channel (a number, (C, 1, 1) or (1, C, 1, 1) on (N, C, H, W); (C,) on (N, C))")


def emit_affine(b: Builder, n: fx.Node, x: object, scale: object, shift: object) -> None:
    """``x * scale + shift`` with per-channel constants (numbers or arrays broadcasting per channel)."""
    x_name = b.tensor(x)
    shape = b.shapes[x_name]
    where = source(n) or "the model's forward()"
    what = f"{op_name(n.target)} with a constant"
    params = {"scale": per_channel(scale, shape, what, where).astype(np.float32),
              "shift": per_channel(shift, shape, what, where).astype(np.float32)}
    b.emit(n, Op.AFFINE, [x_name], params=params)


@handles("add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_")
def _binary(b: Builder, n: fx.Node) -> None:
    name = op_name(n.target).rstrip("_")
    x, y = n.args[:2]
    alpha = n.kwargs.get("alpha", 1)
    where = source(n) or "the model's forward()"
    if name == "rsub":  # rsub(x, y, alpha) = y - alpha * x = sub(y, x, alpha)
        x, y, name = y, x, "sub"
    if name == "div" and n.kwargs.get("rounding_mode") is not None:
        raise UnsupportedOpError(f"division with rounding_mode={n.kwargs['rounding_mode']!r} at {where} is not "
                                 "supported")
    x_const, y_const = _is_constant(b, x), _is_constant(b, y)
    if not x_const and not y_const:
        if name in ("add", "mul") and alpha == 1:
            b.emit(n, Op.ADD if name == "add" else Op.MUL, [b.tensor(x), b.tensor(y)])
            return
        raise UnsupportedOpError(f"{op_name(n.target)} of two feature maps at {where} is not supported: mdeploy "
                                 "adds and multiplies feature maps, and subtracts or divides them by constants")
    if x_const and y_const:
        raise UnsupportedOpError(f"{op_name(n.target)} at {where} reads no feature map")
    fmap, c = (y, x) if x_const else (x, y)
    value = b.constants[c.name] if isinstance(c, fx.Node) else np.float64(c)  # type: ignore[arg-type]
    if name == "add":  # x + alpha * c, or c + alpha * x
        scale, shift = (1.0, alpha * value) if y_const else (alpha, value)
    elif name == "sub":  # x - alpha * c, or c - alpha * x
        scale, shift = (1.0, -alpha * value) if y_const else (-alpha, value)
    elif name == "mul":
        scale, shift = value, 0.0
    elif y_const:  # div by a constant
        if np.any(np.asarray(value) == 0):
            raise UnsupportedOpError(f"division by a constant holding zeros at {where}")
        scale, shift = 1.0 / np.asarray(value, np.float64), 0.0
    else:
        raise UnsupportedOpError(f"a constant divided by a feature map at {where} is not supported")
    emit_affine(b, n, fmap, scale, shift)


@handles("silu", "silu_")
def _silu(b: Builder, n: fx.Node) -> None:
    b.emit(n, Op.SILU, [b.tensor(n.args[0])])


@handles("gelu", "gelu_")
def _gelu(b: Builder, n: fx.Node) -> None:
    approximate = n.args[1] if len(n.args) > 1 else n.kwargs.get("approximate", "none")
    if approximate not in ("none", "tanh"):
        where = source(n) or "the model's forward()"
        raise UnsupportedOpError(f"GELU with approximate={approximate!r} at {where} is not supported: 'none' and "
                                 "'tanh' are")
    b.emit(n, Op.GELU, [b.tensor(n.args[0])], attrs=GeluAttrs(str(approximate)))


@handles("leaky_relu", "leaky_relu_")
def _leaky_relu(b: Builder, n: fx.Node) -> None:
    slope = n.args[1] if len(n.args) > 1 else n.kwargs.get("negative_slope", 0.01)
    b.emit(n, Op.LEAKY_RELU, [b.tensor(n.args[0])], attrs=LeakyReluAttrs(float(slope)))  # type: ignore[arg-type]


@handles("prelu", "_prelu_kernel")
def _prelu(b: Builder, n: fx.Node) -> None:
    x_name = b.tensor(n.args[0])
    weight = n.args[1]
    where = source(n) or "the model's forward()"
    if not (isinstance(weight, fx.Node) and weight.name in b.constants):
        raise UnsupportedOpError(f"PReLU at {where} takes a computed slope: only a parameter or buffer is supported")
    shape = b.shapes[x_name]
    slope = b.constants[weight.name].astype(np.float64).reshape(-1)
    if len(shape) < 2 or slope.size not in (1, shape[1]):
        raise UnsupportedOpError(f"PReLU at {where}: {slope.size} slopes for a tensor of shape {shape}")
    b.emit(n, Op.PRELU, [x_name], params={"slope": np.broadcast_to(slope, (shape[1],)).astype(np.float32)})
