"""Reading ``torch.fx`` nodes of an exported program: where a node comes from in the user's model, the ATen op it
calls, and PyTorch's int-or-pair arguments. Shared by the tracer's modules (``from_torch``, ``from_torch_structure``).
"""

from __future__ import annotations

import operator

from torch import fx


def source(fx_node: fx.Node) -> str:
    """The user's module path and class of ``fx_node`` (``features.3.conv (Conv2d)``), or ""."""
    stack = fx_node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, cls = list(stack.values())[-1]
    cls_name = cls.split(".")[-1] if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
    return f"{path} ({cls_name})" if path else cls_name


def op_name(target: object) -> str:
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "_opname", None) or getattr(target, "__name__", str(target))


def pair(value: object, default: int) -> tuple[int, int]:
    """(h, w) from an int, a one- or two-element list, or None (``default``); an empty list is None too."""
    if value is None or (isinstance(value, (list, tuple)) and not value):
        return (default, default)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    return (int(values[0]), int(values[-1]))
