"""Tracer handlers for the ops that move channels and windows around: ``torch.cat`` along any axis but the batch
(CONCAT), max/average pooling with any kernel, stride, padding and ``ceil_mode`` (MAX_POOL, AVG_POOL; adaptive
pooling that reduces to a fixed window), channel shuffles (CHANNEL_SHUFFLE) and channel ranges from
``split``/``chunk``/``x[:, a:b]``/``narrow`` (SLICE). ``from_torch`` merges ``STRUCTURE_HANDLERS`` into its handler table and calls ``rewrite_structure`` on the
exported graph first, which turns multi-node forms into single ATen calls these handlers read:

- ShuffleNet's ``x.view(n, g, c // g, h, w).transpose(1, 2).contiguous().view(n, c, h, w)`` becomes
  ``aten.channel_shuffle(x, g)`` (also what ``nn.ChannelShuffle`` exports as);
- each used piece ``getitem(split(x, ...), i)`` of ``split``/``split_with_sizes``/``chunk`` becomes
  ``aten.slice(x, dim, start, end)``; unused index outputs of max pooling are dropped.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import fx

from mdeploy.errors import UnsupportedOpError
from mdeploy.graph.fx_nodes import op_name, pair, source
from mdeploy.graph.ir import AxisAttrs, Node, Op, PoolAttrs, ShuffleAttrs, SliceAttrs
from mdeploy.graph.pooling import adaptive_window

aten = torch.ops.aten


class Builder(Protocol):
    """What these handlers use of ``from_torch``'s graph builder."""

    shapes: dict[str, tuple[int, ...]]

    def tensor(self, arg: object) -> str: ...

    def emit(self, fx_node: fx.Node, op: Op, inputs: list[str], **kwargs: Any) -> Node: ...

    def bind(self, fx_node: fx.Node, tensor: str) -> None: ...


STRUCTURE_HANDLERS: dict[str, Callable[[Builder, fx.Node], None]] = {}


def handles(*names: str) -> Callable[[Callable[[Builder, fx.Node], None]], Callable[[Builder, fx.Node], None]]:
    def register(fn: Callable[[Builder, fx.Node], None]) -> Callable[[Builder, fx.Node], None]:
        for name in names:
            STRUCTURE_HANDLERS[name] = fn
        return fn

    return register


def _where(n: fx.Node) -> str:
    return source(n) or "the model's forward()"


def _shape(n: object) -> tuple[int, ...]:
    value = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else ()


def _channel_dim(b: Builder, n: fx.Node, x: str, dim: object, what: str) -> None:
    rank = len(b.shapes[x])
    if rank != 4 or int(dim) % rank != 1:  # type: ignore[call-overload]
        raise UnsupportedOpError(f"{what} along dim {dim} of a rank-{rank} tensor at {_where(n)}: only along the "
                                 "channel axis (dim 1) of an (N, C, H, W) map")


# -- concat --------------------------------------------------------------------------------------------------
@handles("cat", "concat", "concatenate")
def _cat(b: Builder, n: fx.Node) -> None:
    tensors = [b.tensor(t) for t in n.args[0]]  # type: ignore[union-attr]
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if len(tensors) == 1:
        b.bind(n, tensors[0])
        return
    ranks = {len(b.shapes[t]) for t in tensors}
    rank = ranks.pop()
    if ranks or rank < 2:
        raise UnsupportedOpError(f"torch.cat of tensors of ranks {sorted({len(b.shapes[t]) for t in tensors})} at "
                                 f"{_where(n)}: only tensors of one rank (2 or more) with a batch axis")
    axis = int(dim) % rank  # type: ignore[call-overload]
    if axis == 0:
        raise UnsupportedOpError(f"torch.cat along the batch axis (dim {dim}) at {_where(n)}: mdeploy's targets run "
                                 "one batch of images; join along another axis")
    b.emit(n, Op.CONCAT, tensors, attrs=None if axis == 1 else AxisAttrs(axis))


# -- pooling -------------------------------------------------------------------------------------------------
def _arg(n: fx.Node, i: int, name: str, default: object) -> object:
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


@handles("max_pool2d", "max_pool2d_with_indices")
def _max_pool(b: Builder, n: fx.Node) -> None:
    kernel = pair(n.args[1], 1)
    dilation = pair(_arg(n, 4, "dilation", 1), 1)
    if dilation != (1, 1):
        raise UnsupportedOpError(f"max pooling with dilation {dilation} at {_where(n)} is not supported by the "
                                 "Core ML and TFLite targets: use dilation 1")
    stride = _arg(n, 2, "stride", None)
    attrs = PoolAttrs(kernel, pair(stride, 1) if stride else kernel, pair(_arg(n, 3, "padding", 0), 0),
                      bool(_arg(n, 5, "ceil_mode", False)))
    b.emit(n, Op.MAX_POOL, [b.tensor(n.args[0])], attrs=attrs)


@handles("avg_pool2d")
def _avg_pool(b: Builder, n: fx.Node) -> None:
    kernel = pair(n.args[1], 1)
    stride = _arg(n, 2, "stride", None)
    override = _arg(n, 6, "divisor_override", None)
    attrs = PoolAttrs(kernel, pair(stride, 1) if stride else kernel, pair(_arg(n, 3, "padding", 0), 0),
                      bool(_arg(n, 4, "ceil_mode", False)), bool(_arg(n, 5, "count_include_pad", True)),
                      int(override) if override else None)  # type: ignore[call-overload]
    b.emit(n, Op.AVG_POOL, [b.tensor(n.args[0])], attrs=attrs)


def adaptive_pool(b: Builder, n: fx.Node, op: Op) -> None:
    """Adaptive pooling whose windows are all alike (the input size a multiple of the output size, or 1x1) as a
    fixed pool; else a clear error. (Adaptive average pooling to 1x1 stays GLOBAL_AVG_POOL, in ``from_torch``.)"""
    x = b.tensor(n.args[0])
    size = b.shapes[x][2:]
    out = pair(n.args[1], 1)
    out = tuple(s if o is None else o for s, o in zip(size, out, strict=True))  # None keeps that size
    windows = [adaptive_window(int(s), int(o)) for s, o in zip(size, out, strict=True)]
    if len(size) != 2 or None in windows:
        name = "adaptive_avg_pool2d" if op is Op.AVG_POOL else "adaptive_max_pool2d"
        raise UnsupportedOpError(
            f"{name} from {tuple(size)} to {tuple(out)} at {_where(n)} uses windows of different sizes, which no "
            "mdeploy target expresses as one pooling op: pool to a size that divides the input (or to 1x1), or "
            "use nn.AvgPool2d / nn.MaxPool2d with a fixed kernel")
    (kh, sh), (kw, sw) = windows  # type: ignore[misc]
    b.emit(n, op, [x], attrs=PoolAttrs((kh, kw), (sh, sw)))


@handles("adaptive_max_pool2d")
def _adaptive_max_pool(b: Builder, n: fx.Node) -> None:
    adaptive_pool(b, n, Op.MAX_POOL)


# -- channel shuffle and slices ------------------------------------------------------------------------------
@handles("channel_shuffle", "native_channel_shuffle", "pixel_shuffle_channels")
def _channel_shuffle(b: Builder, n: fx.Node) -> None:
    x = b.tensor(n.args[0])
    groups = int(n.args[1])  # type: ignore[call-overload]
    shape = b.shapes[x]
    if len(shape) != 4 or shape[1] % groups:
        raise UnsupportedOpError(f"channel shuffle of {shape} in {groups} groups at {_where(n)}: needs an "
                                 "(N, C, H, W) map with C a multiple of the groups")
    if groups == 1 or groups == shape[1]:
        b.bind(n, x)
        return
    b.emit(n, Op.CHANNEL_SHUFFLE, [x], attrs=ShuffleAttrs(groups))


def _channel_range(b: Builder, n: fx.Node, dim: object, start: object, end: object, step: object = 1) -> None:
    x = b.tensor(n.args[0])
    rank = len(b.shapes[x])
    dim = int(dim) % rank  # type: ignore[call-overload]
    size = b.shapes[x][dim]
    first, last, stride = slice(start, end, step).indices(size)  # type: ignore[arg-type]
    if (first, max(last, first), stride) == (0, size, 1):
        b.bind(n, x)  # the whole axis (x[:, a:b] slices dim 0 fully first)
        return
    if stride != 1 or last <= first:
        raise UnsupportedOpError(f"slice {first}:{last}:{stride} at {_where(n)}: only non-empty channel ranges "
                                 "with step 1")
    _channel_dim(b, n, x, dim, "slicing")
    b.emit(n, Op.SLICE, [x], attrs=SliceAttrs(first, last))


@handles("slice")
def _slice(b: Builder, n: fx.Node) -> None:
    args = list(n.args) + [0, None, None, 1][len(n.args) - 1 :]
    _channel_range(b, n, args[1], args[2], args[3], args[4] if args[4] is not None else 1)


@handles("narrow")
def _narrow(b: Builder, n: fx.Node) -> None:
    _, dim, start, length = n.args
    _channel_range(b, n, dim, start, int(start) + int(length))  # type: ignore[call-overload]


# -- graph rewrites ------------------------------------------------------------------------------------------
_VIEWS = {"view", "reshape", "_unsafe_view"}
_PASS = {"contiguous", "clone", "alias"}
_SPLITS = {"split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split"}


def _only_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _shuffle_groups(view: fx.Node) -> tuple[fx.Node, fx.Node, int] | None:
    """(input, last node, groups) if ``view`` starts view(n, g, c/g, h, w) -> transpose(1, 2) -> view(n, c, h, w)."""
    x = view.args[0] if view.args else None
    before, grouped = _shape(x), _shape(view)
    if len(before) != 4 or len(grouped) != 5 or grouped[1] * grouped[2] != before[1] or grouped[3:] != before[2:]:
        return None
    node = _only_user(view)
    if node is None or op_name(node.target) not in ("transpose", "permute", "swapaxes"):
        return None
    dims = [int(d) % 5 for d in (node.args[1:3] if op_name(node.target) != "permute" else node.args[1])]
    if sorted(dims) != [1, 2] and dims != [0, 2, 1, 3, 4]:
        return None
    last = _only_user(node)
    while last is not None and op_name(last.target) in _PASS:
        last = _only_user(last)
    if last is None or op_name(last.target) not in _VIEWS | {"flatten"} or _shape(last) != before:
        return None
    return x, last, grouped[1]  # type: ignore[return-value]


def rewrite_structure(graph: fx.Graph) -> None:
    erased: set[str] = set()
    for node in list(graph.nodes):
        if node.op != "call_function" or node.name in erased:
            continue
        name = op_name(node.target)
        found = _shuffle_groups(node) if name in _VIEWS else None
        if found is not None:
            x, last, groups = found
            with graph.inserting_before(last):
                shuffle = graph.call_function(aten.channel_shuffle.default, (x, groups))
            shuffle.meta = {**last.meta, "nn_module_stack": node.meta.get("nn_module_stack", {})}
            last.replace_all_uses_with(shuffle)
            chain = [last]
            while chain[-1] is not node:
                chain.append(chain[-1].args[0])
            for dead in chain:
                erased.add(dead.name)
                graph.erase_node(dead)
        elif name in _SPLITS or name in ("max_pool2d_with_indices", "adaptive_max_pool2d"):
            _split_pieces(graph, node, name)


def _split_pieces(graph: fx.Graph, node: fx.Node, name: str) -> None:
    """Each used ``getitem(split, i)`` as ``aten.slice(x, dim, start, end)``; unused getitems dropped."""
    for user in list(node.users):
        if user.target is not operator.getitem:
            continue
        if not user.users:
            graph.erase_node(user)
            continue
        if name not in _SPLITS:
            continue
        values = node.meta.get("val")
        dim = int(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0))
        index = int(user.args[1])  # type: ignore[call-overload]
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, torch.Tensor) for v in values):
            continue
        start = sum(int(v.shape[dim]) for v in values[:index])
        with graph.inserting_before(user):
            piece = graph.call_function(aten.slice.Tensor,
                                        (node.args[0], dim, start, start + int(values[index].shape[dim])))
        piece.meta = dict(user.meta)
        piece.meta.setdefault("nn_module_stack", node.meta.get("nn_module_stack", {}))
        user.replace_all_uses_with(piece)
        graph.erase_node(user)
    if name in _SPLITS and not node.users:
        graph.erase_node(node)
