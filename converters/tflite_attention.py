"""TFLite emitters of the ops attention is made of: RESHAPE, TRANSPOSE, MATMUL and SOFTMAX of any rank, and the
layout bookkeeping they need. ``tflite_ops`` merges ``ATTENTION_EMITTERS`` (and the operator versions) into its
tables; each function takes that module's ``Translator`` as ``t``.

Layouts. The translator stores an IR tensor in its canonical layout: a 4-D feature map as NHWC, any other rank in
PyTorch's order. Attention ops read and make tensors of any rank in PyTorch's own order, so a tensor may also be
stored in another order: ``t.order[name]`` is then the permutation ``p`` with PyTorch's tensor =
``stored.permute(p)`` (NHWC is ``(0, 3, 1, 2)``). Orders are carried lazily and a TRANSPOSE is written only where an
op needs another one:

- a TRANSPOSE node writes nothing: its output is its input stored under the composed order, so consecutive
  transposes (and the NHWC <-> NCHW moves around them) fold into the one TRANSPOSE a later reader may need;
- a RESHAPE is a RESHAPE of the stored tensor when it only merges axes that are adjacent, in order, in storage and
  splits axes (``reshape_plan``): NHWC ``(N, H, W, C)`` read as ``(N, C, H*W)`` is a RESHAPE to ``(N, H*W, C)``,
  no TRANSPOSE; otherwise the input is transposed to PyTorch's order first;
- MATMUL is BATCH_MATMUL: an operand stored with its last two axes swapped is read with ``adj_x``/``adj_y``;
- SOFTMAX reads any order that keeps its axis last (the last axis; the channels of a map: NHWC as it is);
- every other op (convolutions, pools, elementwise ops) reads the canonical layout (``Translator.canonical``
  transposes a tensor stored otherwise), and a model output is written in it.

A TFLite tensor is named after the IR tensor it holds when it holds it in the canonical layout (what the per-layer
taps read); in another order it is named ``<tensor>/<order>``. int8: RESHAPE and TRANSPOSE move codes on their
input's grid; BATCH_MATMUL of two int8 activations writes its own grid; SOFTMAX is computed in float between a
DEQUANTIZE and a QUANTIZE to the quantiser's grid (tensors named ``<node>/float_softmax...``: the one float island an
int8 graph has by design: ``tflite_report.float_softmaxes`` lists them).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import permutations
from typing import Any

import numpy as np

from mdeploy.converters.tflite_flatbuffer import Quant, fb
from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.ir import Node, Op, OpRegistry, ReshapeAttrs, TransposeAttrs, softmax_axis
from mdeploy.quantize.params import TensorQuant

B = fb.BuiltinOperator
FLOAT_SOFTMAX = "float_softmax"  # the role in the names of an int8 graph's float softmax tensors
O = fb.BuiltinOptions

Order = tuple[int, ...]
# Operator versions (fp32, int8) as TensorFlow's converter writes them.
ATTENTION_VERSIONS: dict[int, tuple[int, int]] = {B.BATCH_MATMUL: (1, 2)}
TRANSPOSE_VERSION_BY_RANK = {5: 4, 6: 6}  # TensorFlow's converter: a rank-5 TRANSPOSE is version 4, rank 6: 6
BATCH_MATMUL_MAX_RANK = 5
Translator = Any  # mdeploy.converters.tflite_ops.Translator (which imports this module)
ATTENTION_EMITTERS: OpRegistry[Callable[[Translator, Node], None]] = OpRegistry()
emits = ATTENTION_EMITTERS.register


# -- orders ----------------------------------------------------------------------------------------------------
def canonical_order(rank: int) -> Order:
    """How the translator stores a tensor of ``rank`` by default: NHWC for a feature map, else PyTorch's order."""
    return (0, 3, 1, 2) if rank == 4 else tuple(range(rank))


def channels_last_order(rank: int) -> Order:
    """PyTorch's axis 1 (the channels) stored last, the other axes in order (NHWC for rank 4)."""
    return (0, rank - 1, *range(1, rank - 1)) if rank > 2 else tuple(range(rank))


def _identity(rank: int) -> Order:
    return tuple(range(rank))


def _tag(order: Order) -> str:
    if len(order) == 4 and order == canonical_order(4):
        return "nhwc"
    return "torch" if order == _identity(len(order)) else "order" + "".join(str(p) for p in order)


def _quant(t: Translator, x: str, label: str) -> Quant | None:
    """An int8 tensor holding IR tensor ``label`` (any order) is on ``label``'s grid."""
    if t.b.dtype(x) != np.int8:
        return None
    tq: TensorQuant = t.tq(label)
    return Quant.per_tensor(tq.scale, tq.zero_point)


def _inverse(order: Order) -> Order:
    inverse = [0] * len(order)
    for i, p in enumerate(order):
        inverse[p] = i
    return tuple(inverse)


def stored_shape(shape: tuple[int, ...], order: Order) -> tuple[int, ...]:
    """The stored shape of a tensor of PyTorch shape ``shape`` kept in ``order``."""
    return tuple(shape[i] for i in _inverse(order))


def arrange(t: Translator, x: str, have: Order, want: Order, label: str) -> str:
    """The TFLite tensor holding the value of ``x`` (IR tensor ``label`` stored in order ``have``) in order
    ``want``: ``x`` itself, or a TRANSPOSE of it (one per tensor and permutation)."""
    if have == want:
        return x
    rank = len(want)
    perm = tuple(have[i] for i in _inverse(want))  # stored axis j of the result is axis perm[j] of x
    key = (x, perm)
    if key not in t.arranged:
        if rank > max(TRANSPOSE_VERSION_BY_RANK):
            producer = t.graph.producer(label)
            where = (producer.source or producer.name) if producer is not None else label
            raise UnsupportedOpError(f"the TFLite target cannot place the rank-{rank} tensor of {where} in the order "
                                     "its readers need: TFLite's TRANSPOSE takes up to 6 axes")
        shape = tuple(t.b.shape(x)[p] for p in perm)
        name = (label if want == canonical_order(rank) and not t.b.has(label)
                else f"{x}/transposed{''.join(str(p) for p in perm)}")
        out = t.b.tensor(name, shape, t.b.dtype(x), _quant(t, x, label))
        t.arranged[key] = t.op(B.TRANSPOSE, [x, t.b.constant(f"{name}/perm", np.array(perm, np.int32))], out,
                               version=TRANSPOSE_VERSION_BY_RANK.get(rank))
    return t.arranged[key]


def to_canonical(t: Translator, name: str) -> str:
    """IR tensor ``name`` (stored in another order) in the canonical layout."""
    x = t.value[name]
    return arrange(t, x, t.order[name], canonical_order(len(t.b.shape(x))), name)


def operand(t: Translator, node: Node, i: int = 0) -> tuple[str, Order]:
    """``node``'s i-th input as stored, in the node's domain (int8 or float), and its order."""
    name = node.inputs[i]
    x = t.value[name]
    order = t.order.get(name, canonical_order(len(t.b.shape(x))))
    return t.in_domain(node, name, x), order


def channels_last_operand(t: Translator, node: Node, any_order: bool = False) -> tuple[str, Order]:
    """``node``'s input with PyTorch's axis 1 stored last (``any_order``: as stored, for an op that treats every
    channel alike), and its order."""
    x, order = operand(t, node)
    if any_order:
        return x, order
    want = channels_last_order(len(order))
    return arrange(t, x, order, want, node.inputs[0]), want


def declare(t: Translator, node: Node, shape: tuple[int, ...], order: Order, quant: TensorQuant | None = None
            ) -> str:
    """The TFLite tensor for ``node``'s output stored in ``order`` (``shape``: the stored shape)."""
    canonical = order == canonical_order(len(order))
    out = t.output(node, quant, shape, None if canonical else f"{node.output}/{_tag(order)}")
    if not canonical:
        t.order[node.output] = order
    return out


def alias(t: Translator, node: Node, x: str, order: Order) -> None:
    """``node``'s output is ``x`` read in ``order``: no op."""
    t.value[node.output] = x
    if order != canonical_order(len(order)):
        t.order[node.output] = order


# -- reshape and transpose -------------------------------------------------------------------------------------
def reshape_plan(stored: tuple[int, ...], order: Order, target: tuple[int, ...]) -> tuple[tuple[int, ...], Order] | None:
    """(the stored shape, the order) that hold ``stored.permute(order).reshape(target)`` after a RESHAPE of the
    stored tensor alone, or None when that needs a TRANSPOSE: each group of axes the reshape merges must be
    adjacent and in order in storage. Size-1 axes go first in storage, unless the result is in PyTorch's order."""
    current = [stored[p] for p in order]  # PyTorch's shape
    axes = [i for i, d in enumerate(current) if d != 1]
    out_axes = [i for i, d in enumerate(target) if d != 1]
    rank_in_storage = {p: k for k, p in enumerate(j for j, d in enumerate(stored) if d != 1)}
    groups: list[tuple[list[int], list[int]]] = []  # (PyTorch axes in, target axes out) of equal sizes
    a = o = 0
    while a < len(axes) and o < len(out_axes):
        group_in, group_out = [axes[a]], [out_axes[o]]
        size_in, size_out = current[axes[a]], target[out_axes[o]]
        a, o = a + 1, o + 1
        while size_in != size_out:
            if size_in < size_out and a < len(axes):
                group_in.append(axes[a])
                size_in, a = size_in * current[axes[a]], a + 1
            elif size_out < size_in and o < len(out_axes):
                group_out.append(out_axes[o])
                size_out, o = size_out * target[out_axes[o]], o + 1
            else:
                return None
        positions = [rank_in_storage[order[i]] for i in group_in]
        if positions != list(range(positions[0], positions[0] + len(positions))):
            return None
        groups.append((group_in, group_out))
    if a < len(axes) or o < len(out_axes):
        return None
    ones = [i for i, d in enumerate(target) if d == 1]
    new_order = [0] * len(target)
    for k, i in enumerate(ones):
        new_order[i] = k
    shape = [1] * len(ones)
    for _, group_out in sorted(groups, key=lambda g: rank_in_storage[order[g[0][0]]]):
        for i in group_out:
            new_order[i] = len(shape)
            shape.append(target[i])
    if [new_order[i] for i in out_axes] == sorted(new_order[i] for i in out_axes):
        return tuple(target), _identity(len(target))  # in PyTorch's order: its size-1 axes where it has them
    return tuple(shape), tuple(new_order)


def _reshape_op(t: Translator, x: str, shape: tuple[int, ...], out: str) -> str:
    options = fb.ReshapeOptionsT()
    options.newShape = np.array(shape, np.int32)
    return t.op(B.RESHAPE, [x, t.b.constant(f"{out}/shape", np.array(shape, np.int32))], out, options,
                O.ReshapeOptions)


ATTENTION_OPS = (Op.RESHAPE, Op.TRANSPOSE, Op.MATMUL, Op.SOFTMAX)  # read tensors in any order


def wanted_order(t: Translator, tensor: str) -> Order | None:
    """The order in which ``tensor``'s readers would take it without a TRANSPOSE, when other ops than attention's
    read it (directly or through transposes read by nothing else): the order that makes their input canonical.
    None when only attention ops read it."""
    chain: list[Order] = []  # the permutations of the transposes that alone read it, in order
    current = tensor
    while True:
        readers = t.graph.consumers(current)
        if len(readers) != 1 or readers[0].op is not Op.TRANSPOSE or current in t.graph.outputs:
            break
        assert isinstance(readers[0].attrs, TransposeAttrs)
        chain.append(readers[0].attrs.perm)
        current = readers[0].output
    if current not in t.graph.outputs and all(r.op in ATTENTION_OPS for r in t.graph.consumers(current)):
        return None
    order = canonical_order(len(t.graph.shapes[current]))
    for perm in reversed(chain):  # a transpose's output has order[i] = its input's order[perm[i]]
        order = tuple(order[i] for i in _inverse(perm))
    return order


@emits(Op.RESHAPE)
def reshape(t: Translator, node: Node) -> None:
    assert isinstance(node.attrs, ReshapeAttrs)
    x, order = operand(t, node)
    target = tuple(node.attrs.shape)
    plan = reshape_plan(t.b.shape(x), order, target)
    if plan is None:  # merges axes apart in storage: one TRANSPOSE first, to PyTorch's order or, when the readers
        # want another order (a convolution reads NHWC), to the order whose RESHAPE gives it
        torch_shape = t.graph.shapes[node.inputs[0]]
        wanted = wanted_order(t, node.output)
        start = _identity(len(order))
        candidates = [start] + (sorted(set(permutations(start)) - {start}) if wanted is not None else [])
        for candidate in candidates:
            plan = reshape_plan(stored_shape(torch_shape, candidate), candidate, target)
            if plan is not None and plan[1] == wanted:
                break
        else:
            candidate, plan = start, (target, _identity(len(target)))
        x = arrange(t, x, order, candidate, node.inputs[0])
    assert plan is not None
    shape, new_order = plan
    if shape == t.b.shape(x):
        alias(t, node, x, new_order)
        return
    _reshape_op(t, x, shape, declare(t, node, shape, new_order, t._input_quant(node)))


@emits(Op.TRANSPOSE)
def transpose(t: Translator, node: Node) -> None:
    assert isinstance(node.attrs, TransposeAttrs)
    x, order = operand(t, node)
    alias(t, node, x, tuple(order[p] for p in node.attrs.perm))  # read later in whatever order its readers need


# -- products and softmax --------------------------------------------------------------------------------------
@emits(Op.MATMUL)
def matmul(t: Translator, node: Node) -> None:
    options = fb.BatchMatMulOptionsT()
    xs = []
    for i in range(2):
        x, order = operand(t, node, i)
        rank = len(order)
        if rank > BATCH_MATMUL_MAX_RANK:
            raise UnsupportedOpError(f"the TFLite target does not support matmul of rank-{rank} tensors (at "
                                     f"{node.source or node.name}): TFLite's BATCH_MATMUL takes up to "
                                     f"{BATCH_MATMUL_MAX_RANK} axes")
        swapped = (*range(rank - 2), rank - 1, rank - 2)
        if order != _identity(rank) and order != swapped:  # one TRANSPOSE, to an order another reader shares, else
            # (a transposed key, whose key is often read too) to the order read as an adjoint for the second operand
            reused = [want for want in (_identity(rank), swapped)
                      if (x, tuple(order[j] for j in _inverse(want))) in t.arranged]
            want = reused[0] if reused else swapped if i else _identity(rank)
            x, order = arrange(t, x, order, want, node.inputs[i]), want
        if order == swapped:  # stored with its last two axes swapped: read as adjoint
            setattr(options, "adjY" if i else "adjX", True)
        xs.append(x)
    shape = t.graph.shapes[node.output]
    t.op(B.BATCH_MATMUL, xs, declare(t, node, shape, _identity(len(shape))), options, O.BatchMatMulOptions)


def last_axis_operand(t: Translator, node: Node, axis: int | None = None) -> tuple[str, Callable[[], str]]:
    """For SOFTMAX: its input stored with PyTorch's ``axis`` (default: the last) last, and a maker of its output in
    the same order. Stored otherwise, it is transposed to the order that moves only that axis last (NHWC for the
    channels of a map, which is then the canonical layout: no TRANSPOSE)."""
    x, order = operand(t, node)
    rank = len(order)
    axis = rank - 1 if axis is None else axis
    if order[axis] != rank - 1:
        want = _inverse((*(i for i in range(rank) if i != axis), axis))
        x, order = arrange(t, x, order, want, node.inputs[0]), want
    return x, lambda: declare(t, node, t.b.shape(x), order)


@emits(Op.SOFTMAX)
def softmax(t: Translator, node: Node) -> None:
    """int8: DEQUANTIZE -> SOFTMAX in float -> QUANTIZE to the quantiser's grid, which XNNPACK runs inside the
    graph's one partition; its int8 SOFTMAX is not delegated (a partition boundary on each side) and writes a fixed
    1/256 grid that then needed a second rounding. The float softmax rounds once, as the quantiser simulates."""
    options = fb.SoftmaxOptionsT()
    options.beta = 1.0
    x, out = last_axis_operand(t, node, softmax_axis(node, len(t.graph.shapes[node.output])))
    if not t.is_int8(node):
        t.op(B.SOFTMAX, [x], out(), options, O.SoftmaxOptions)
        return
    shape = t.b.shape(x)
    logits = t.op(B.DEQUANTIZE, [x], t.b.tensor(f"{node.name}/{FLOAT_SOFTMAX}/logits", shape, np.float32))
    probabilities = t.op(B.SOFTMAX, [logits], t.b.tensor(f"{node.name}/{FLOAT_SOFTMAX}", shape, np.float32), options,
                         O.SoftmaxOptions)
    t.op(B.QUANTIZE, [probabilities], out())
