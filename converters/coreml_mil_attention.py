"""Core ML for the ops attention is made of: the MIL lowerings of RESHAPE, TRANSPOSE and MATMUL (``coreml_program``
merges ``ATTENTION_LOWERINGS`` into its ``LOWERINGS``; each function takes that module's ``_Emitter`` as ``e``) and
the MIL reference's ``matmul`` (``coreml_mil_reference`` merges ``ATTENTION_MIL_OPS`` into its registry).

Core ML programs are in PyTorch's layout, so each op is written as coremltools' PyTorch frontend writes it. In W8A8
programs the RESHAPE/TRANSPOSE outputs get the quantize -> dequantize pair of their input's grid (exact) and a
MATMUL's output its own grid, as every other op's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mdeploy.graph.ir import Node, Op, ReshapeAttrs, TransposeAttrs

Emitter = Any  # mdeploy.converters.coreml_program._Emitter (which imports this module)
# IR op -> (its lowering, the MIL ops it emits), as coreml_program.Lowering holds them
ATTENTION_LOWERINGS: dict[Op, tuple[Callable[..., Any], tuple[str, ...]]] = {}
ATTENTION_MIL_OPS: dict[str, Callable[..., Any]] = {}


def lowers(kind: Op, *mil_ops: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        ATTENTION_LOWERINGS[kind] = (fn, mil_ops)
        return fn

    return register


@lowers(Op.RESHAPE, "reshape")
def reshape(e: Emitter, node: Node, xs: list[Any], name: str) -> Any:
    assert isinstance(node.attrs, ReshapeAttrs)
    return e.mb.reshape(x=xs[0], shape=np.array([-1, *node.attrs.shape[1:]], np.int32), name=name)


@lowers(Op.TRANSPOSE, "transpose")
def transpose(e: Emitter, node: Node, xs: list[Any], name: str) -> Any:
    assert isinstance(node.attrs, TransposeAttrs)
    return e.mb.transpose(x=xs[0], perm=list(node.attrs.perm), name=name)


@lowers(Op.MATMUL, "matmul")
def matmul(e: Emitter, node: Node, xs: list[Any], name: str) -> Any:
    return e.mb.matmul(x=xs[0], y=xs[1], transpose_x=False, transpose_y=False, name=name)


# -- the MIL reference -------------------------------------------------------------------------------------------
def mil_op(name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        ATTENTION_MIL_OPS[name] = fn
        return fn

    return register


@mil_op("matmul")
def mil_matmul(x: np.ndarray, y: np.ndarray, transpose_x: bool = False, transpose_y: bool = False) -> np.ndarray:
    """x @ y with broadcast leading axes (the last two swapped first when asked), accumulated in fp32 like
    ``conv`` and ``linear``; the executor rounds the output once to the declared dtype."""
    x, y = x.astype(np.float32, copy=False), y.astype(np.float32, copy=False)
    if bool(transpose_x):
        x = np.swapaxes(x, -1, -2)
    if bool(transpose_y):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)
