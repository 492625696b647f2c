"""Tracer handlers for the ops attention is made of (issue 14: MobileNetV4-Hybrid's ``MultiQueryAttention2d``):
reshapes of any rank (RESHAPE; FLATTEN for the classifier head's ``(N, C, H, W) -> (N, C*H*W)``, as before),
axis permutations (TRANSPOSE), products of two feature maps (MATMUL) and ``F.scaled_dot_product_attention``,
which becomes ``q * scale`` (AFFINE) -> MATMUL with the transposed key -> SOFTMAX -> MATMUL. ``from_torch`` merges
``ATTENTION_HANDLERS`` into its handler table.

The IR is traced at batch 1 and run at any batch, so every tensor keeps the batch as its first axis: a reshape that
merges or drops it, a transpose that moves it, or a product of tensors without it is refused with a one-line error
naming the user's module. ``torch.export`` and ``torch.jit.trace`` both keep ``scaled_dot_product_attention`` as
one ATen op (the fused kernels ``_scaled_dot_product_flash_attention_for_cpu`` & co. are read too, when a program
was decomposed); an attention mask, dropout or ``is_causal`` is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import torch
from torch import fx

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.fx_nodes import op_name, source
from mdeploy.graph.ir import Node, Op, ReshapeAttrs, TransposeAttrs
from mdeploy.types import INPUT_NAME


class Builder(Protocol):
    """What these handlers use of ``from_torch``'s graph builder."""

    constants: dict[str, np.ndarray]
    nodes: list[Node]
    shapes: dict[str, tuple[int, ...]]
    users: dict[str, int]

    def tensor(self, arg: object) -> str: ...

    def emit(self, fx_node: fx.Node, op: Op, inputs: list[str], **kwargs: Any) -> Node: ...

    def bind(self, fx_node: fx.Node, tensor: str) -> None: ...

    def sole_producer(self, tensor: str, op: Op) -> Node | None: ...


AttentionHandler = Callable[[Builder, fx.Node], None]
ATTENTION_HANDLERS: dict[str, AttentionHandler] = {}


def handles(*names: str) -> Callable[[AttentionHandler], AttentionHandler]:
    def register(fn: AttentionHandler) -> AttentionHandler:
        for name in names:
            ATTENTION_HANDLERS[name] = fn
        return fn

    return register


def _where(n: fx.Node) -> str:
    return source(n) or "the model's forward()"


def _out_shape(n: fx.Node) -> tuple[int, ...]:
    value = n.meta.get("val")
    if isinstance(value, (list, tuple)):  # the fused attention kernels also return their log-sum-exp
        value = value[0]
    return tuple(int(d) for d in value.shape)


def _batch(b: Builder) -> int:
    return b.shapes[INPUT_NAME][0]


def _extra(b: Builder, n: fx.Node, role: str, op: Op, inputs: list[str], shape: tuple[int, ...],
           **kwargs: Any) -> str:
    """A node of the IR that ``n`` expands into besides its last one (named ``<n>_<role>``, read once)."""
    node = Node(f"{n.name}_{role}", op, inputs, f"{n.name}_{role}", source=source(n), **kwargs)
    b.nodes.append(node)
    b.shapes[node.output], b.users[node.output] = shape, 1
    return node.output


# -- reshapes ------------------------------------------------------------------------------------------------
@handles("view", "reshape", "_unsafe_view", "flatten", "squeeze", "unsqueeze")
def _reshape(b: Builder, n: fx.Node) -> None:
    x = b.tensor(n.args[0])
    in_shape, out_shape = b.shapes[x], _out_shape(n)
    if in_shape == out_shape:
        b.bind(n, x)
    elif len(in_shape) == 4 and len(out_shape) == 2 and out_shape[0] == in_shape[0]:
        b.emit(n, Op.FLATTEN, [x])  # the classifier head's flatten, written as every target writes it today
    else:
        _emit_reshape(b, n, x, in_shape, out_shape)


def _emit_reshape(b: Builder, n: fx.Node, x: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> None:
    if not out_shape or out_shape[0] != _batch(b) or in_shape[0] != _batch(b):
        raise UnsupportedOpError(
            f"reshape {in_shape} -> {out_shape} at {_where(n)} is not supported: it merges or drops the batch axis, "
            "which mdeploy keeps first (the model is converted at batch 1 and run at any batch); reshape the other "
            "axes only, e.g. x.reshape(x.shape[0], ...)")
    inner = b.sole_producer(x, Op.RESHAPE)
    if inner is not None:  # a reshape of a reshape read nowhere else: one reshape of the first input
        b.nodes.remove(inner)
        x = inner.inputs[0]
        if b.shapes[x] == out_shape:
            b.bind(n, x)
            return
    b.emit(n, Op.RESHAPE, [x], attrs=ReshapeAttrs((1, *out_shape[1:])))


@handles("expand")
def _expand(b: Builder, n: fx.Node) -> None:
    x = b.tensor(n.args[0])
    if b.shapes[x] != _out_shape(n):
        raise UnsupportedOpError(
            f"expand {b.shapes[x]} -> {_out_shape(n)} at {_where(n)} is not supported: mdeploy takes expand only "
            "where it changes nothing (matmul, add and mul broadcast size-1 axes by themselves)")
    b.bind(n, x)


# -- transposes ----------------------------------------------------------------------------------------------
def _swap(rank: int, first: object, second: object) -> list[int]:
    perm = list(range(rank))
    i, j = int(first) % rank, int(second) % rank  # type: ignore[call-overload]
    perm[i], perm[j] = perm[j], perm[i]
    return perm


@handles("transpose", "swapaxes", "swapdims", "permute", "mT", "mH", "adjoint", "t", "numpy_T")
def _transpose(b: Builder, n: fx.Node) -> None:
    x = b.tensor(n.args[0])
    rank = len(b.shapes[x])
    name = op_name(n.target)
    if name == "permute":
        perm = [int(d) % rank for d in n.args[1]]  # type: ignore[union-attr]
    elif name in ("mT", "mH", "adjoint"):
        perm = _swap(rank, -2, -1)
    elif name == "numpy_T":
        perm = list(reversed(range(rank)))
    elif name == "t":
        perm = _swap(rank, 0, 1) if rank == 2 else list(range(rank))
    else:
        perm = _swap(rank, n.args[1], n.args[2])
    inner = b.sole_producer(x, Op.TRANSPOSE)
    if inner is not None:  # a transpose of a transpose read nowhere else: one permutation of the first input
        assert isinstance(inner.attrs, TransposeAttrs)
        perm = [inner.attrs.perm[p] for p in perm]
        b.nodes.remove(inner)
        x = inner.inputs[0]
    if perm == list(range(rank)):
        b.bind(n, x)
        return
    if perm[0] != 0:
        raise UnsupportedOpError(
            f"{name} moving the batch axis (permutation {tuple(perm)} of {b.shapes[x]}) at {_where(n)} is not "
            "supported: mdeploy keeps the batch axis first (the model is converted at batch 1 and run at any "
            "batch); permute the other axes only")
    b.emit(n, Op.TRANSPOSE, [x], attrs=TransposeAttrs(tuple(perm)))


# -- products ------------------------------------------------------------------------------------------------
def _product_shape(b: Builder, n: fx.Node, what: str, left: tuple[int, ...], right: tuple[int, ...]
                   ) -> tuple[int, ...]:
    """(N, ..., M, P) of (N, ..., M, K) @ (N, ..., K, P), or an error naming ``what`` and the user's module."""
    batch = _batch(b)
    problem = None
    if len(left) != len(right) or len(left) < 3:
        problem = "mdeploy multiplies two tensors of one rank, 3 or more, whose first axis is the batch"
    elif left[0] != batch or right[0] != batch:
        problem = "an operand's first axis is not the batch (the model is converted at batch 1 and run at any batch)"
    elif left[-1] != right[-2]:
        problem = "the inner dimensions differ"
    else:
        try:
            return (*np.broadcast_shapes(left[:-2], right[:-2]), left[-2], right[-1])
        except ValueError:
            problem = "the leading axes do not broadcast"
    raise UnsupportedOpError(f"{what} of {left} and {right} at {_where(n)} is not supported: {problem}")


def _operand(b: Builder, n: fx.Node, arg: object, what: str) -> str:
    if isinstance(arg, fx.Node) and arg.name in b.constants:
        raise UnsupportedOpError(
            f"{what} with a constant operand ({arg.name}) at {_where(n)} is not supported: mdeploy multiplies two "
            "feature maps; use nn.Linear or a 1x1 convolution for a product with a weight")
    return b.tensor(arg)


@handles("matmul", "bmm")
def _matmul(b: Builder, n: fx.Node) -> None:
    what = op_name(n.target)
    x, y = (_operand(b, n, arg, what) for arg in n.args[:2])
    _product_shape(b, n, what, b.shapes[x], b.shapes[y])
    b.emit(n, Op.MATMUL, [x, y])


_ATTENTION_OPS = ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention")


def _arguments(n: fx.Node) -> dict[str, Any]:
    """The call's arguments by the op schema's names, defaults filled in."""
    schema = n.target._schema  # type: ignore[union-attr]
    values: dict[str, Any] = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    values.update({a.name: v for a, v in zip(schema.arguments, n.args)})
    values.update(n.kwargs)
    return values


@handles(*_ATTENTION_OPS)
def _attention(b: Builder, n: fx.Node) -> None:
    """softmax(q k^T * scale) v as q * scale (AFFINE) -> MATMUL(., k^T) -> SOFTMAX -> MATMUL(., v)."""
    args = _arguments(n)
    where = _where(n)
    refused = [f"{key}={args[key]}" for key in ("dropout_p", "is_causal") if args.get(key)]
    refused += [f"{key} (a tensor)" for key in ("attn_mask", "attn_bias") if args.get(key) is not None]
    if refused:
        raise UnsupportedOpError(
            f"scaled_dot_product_attention with {', '.join(refused)} at {where} is not supported: mdeploy converts "
            "attention without a mask, dropout or causal masking (export in eval mode, leave the mask out)")
    q, k, v = (_operand(b, n, args[key], "scaled_dot_product_attention") for key in ("query", "key", "value"))
    q_shape, k_shape, v_shape = b.shapes[q], b.shapes[k], b.shapes[v]
    if args.get("enable_gqa") and len(q_shape) == len(k_shape) > 3 and k_shape[1] not in (1, q_shape[1]):
        raise UnsupportedOpError(f"scaled_dot_product_attention with enable_gqa and {k_shape[1]} key heads for "
                                 f"{q_shape[1]} query heads at {where} is not supported: use 1 key head or as many "
                                 "as query heads")
    scale = args.get("scale")
    scale = float(scale) if scale is not None else 1.0 / math.sqrt(q_shape[-1])
    rank = len(k_shape)
    k_perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    k_t_shape = tuple(k_shape[p] for p in k_perm)
    scores_shape = _product_shape(b, n, "scaled_dot_product_attention", q_shape, k_t_shape)
    _product_shape(b, n, "scaled_dot_product_attention", scores_shape, v_shape)
    channels = q_shape[1]
    q_scaled = _extra(b, n, "query_scaled", Op.AFFINE, [q], q_shape,
                      params={"scale": np.full(channels, scale, np.float32), "shift": np.zeros(channels, np.float32)})
    k_t = _extra(b, n, "key_transposed", Op.TRANSPOSE, [k], k_t_shape, attrs=TransposeAttrs(tuple(k_perm)))
    scores = _extra(b, n, "scores", Op.MATMUL, [q_scaled, k_t], scores_shape)
    weights = _extra(b, n, "weights", Op.SOFTMAX, [scores], scores_shape)
    out = b.emit(n, Op.MATMUL, [weights, v])
    b.shapes[out.output] = _out_shape(n)  # the fused kernels return a tuple: bind() did not record it
