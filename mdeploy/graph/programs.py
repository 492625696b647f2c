"""Models as users save them, made traceable at the conversion's input size.

- An ExportedProgram runs only at the batch sizes it was exported for (``torch.export.export(model, (x,))`` gives
  the static batch of ``x``, usually 1). ``BatchedProgram`` runs it at any batch by cutting the input into chunks
  the program accepts and padding the last one (with copies of its last sample); ``traceable`` hands the tracer the
  program itself at a batch it accepts, so that the IR keeps the user's module paths.
- TorchScript computes shapes at run time (TF-style "SAME" padding from ``x.shape``, ``x.view(x.size(0), -1)``):
  ``torchscript_program`` specialises it to the conversion's input shape, so that every size computation is a
  constant, and names each op after the module it came from (the TorchScript's scopes), never an internal wrapper.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from mdeploy.errors import BadInputError

__all__ = ["BatchedProgram", "batched_program", "traceable", "torchscript_program", "unwrap_module"]

# No upper bound on a dynamic batch: chunks are then as large as the caller's batches.
_UNBOUNDED = 1 << 30


class BatchedProgram(nn.Module):
    """An ExportedProgram's module, run at any batch: inputs are cut into chunks of a batch the program accepts
    (between ``low`` and ``high``), the last chunk padded with copies of its last sample, and the outputs joined."""

    def __init__(self, program: nn.Module, low: int, high: int, sample_shape: tuple[int | None, ...]) -> None:
        super().__init__()
        self.program = program
        self.low, self.high = low, high
        self.sample_shape = sample_shape  # per-sample input shape; None where the program accepts any size

    def trace_batch(self, batch: int) -> int:
        """The batch at which to trace the program for a conversion at ``batch``."""
        return min(max(batch, self.low), self.high)

    def check_input(self, shape: tuple[int, ...]) -> None:
        wanted = tuple(shape[1:])
        if len(wanted) != len(self.sample_shape) or any(
                s is not None and s != w for s, w in zip(self.sample_shape, wanted)):
            exported = "x".join("any" if s is None else str(s) for s in self.sample_shape)
            hint = (f"pass --input-size {self.sample_shape[-1]}"
                    if len(self.sample_shape) == 3 and self.sample_shape[-1] is not None
                    and self.sample_shape[-1] == self.sample_shape[-2] else "convert it at its exported size")
            raise BadInputError(
                f"this ExportedProgram was exported for inputs of {exported} per sample but the conversion feeds "
                f"{'x'.join(str(w) for w in wanted)}: {hint}, or export the model again at the input size you deploy"
            )

    def forward(self, x: torch.Tensor) -> Any:
        self.check_input(tuple(x.shape))
        batch = x.shape[0]
        if self.low <= batch <= self.high:
            return self.program(x)
        outputs = []
        for start in range(0, batch, self.high):
            chunk = x[start:start + self.high]
            size = chunk.shape[0]
            if size < self.low:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.low - size, *chunk.shape[1:])])
            outputs.append(pytree.tree_map(lambda t: t[:size], self.program(chunk)))
        return pytree.tree_map(lambda *parts: torch.cat(parts), *outputs)

    def train(self, mode: bool = True) -> BatchedProgram:
        if mode:
            raise NotImplementedError("this ExportedProgram was exported for inference: train() is not supported")
        return nn.Module.train(self, False)


def batched_program(program: torch.export.ExportedProgram, module: nn.Module) -> BatchedProgram:
    """``module`` (``program.module()``) as a BatchedProgram at the batch range ``program`` was exported for."""
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    users = [placeholders[spec.arg.name] for spec in program.graph_signature.input_specs
             if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT and spec.arg.name in placeholders]
    value = users[0].meta.get("val") if len(users) == 1 else None
    if not isinstance(value, torch.Tensor) or value.ndim == 0:
        raise BadInputError(f"the ExportedProgram takes {len(users)} inputs; mdeploy converts one-image models")
    sizes = [_size_range(program, d) for d in value.shape]
    low, high = sizes[0]
    sample = tuple(lo if lo == hi else None for lo, hi in sizes[1:])
    return BatchedProgram(module, max(low, 1), max(high, 1), sample)


def _size_range(program: torch.export.ExportedProgram, size: object) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    expr = size.node.expr  # type: ignore[attr-defined]
    bounds = program.range_constraints.get(expr)
    if bounds is None:
        return 1, _UNBOUNDED
    low = int(bounds.lower) if bounds.lower.is_finite else 1
    high = int(bounds.upper) if bounds.upper.is_finite else _UNBOUNDED
    return low, min(high, _UNBOUNDED)


def traceable(module: nn.Module, batch: int) -> tuple[nn.Module, int]:
    """The module to trace for a conversion at ``batch``, and the batch to trace it at: an ExportedProgram is
    traced itself (its ops keep the user's module paths), at a batch it was exported for."""
    if isinstance(module, BatchedProgram):
        return module.program, module.trace_batch(batch)
    return module, batch


def unwrap_module(module: nn.Module) -> nn.Module:
    """The model inside the usual wrappers: ``torch.compile`` (``_orig_mod``), DataParallel and
    DistributedDataParallel (``module``)."""
    for _ in range(8):
        if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        elif isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            module = module.module
        else:
            break
    return module


# -------------------------------------------------------------------------------------------------- TorchScript


def torchscript_program(module: torch.jit.ScriptModule, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``module`` as an ExportedProgram specialised to ``example``'s shape, each op named after its module."""
    from torch._export import converter  # private, but the one TorchScript-to-ATen path PyTorch has

    ts = converter.TS2EPConverter(module, (example,))
    blocks, attribute_fqns = converter.get_block_to_lifted_attrs(ts.ts_graph)
    graph_converter = _scoped_converter()(ts.ts_graph, ts.name_to_param, ts.name_to_buffer, blocks,
                                          ts.name_to_non_tensor_attributes, ts.name_to_constant,
                                          attribute_fqns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = graph_converter.convert()
        converter.replace_quantized_ops_with_standard_ops(gm)
        _fold_sizes(gm, example)
        program = torch.export.export(gm, (example,), strict=False)  # static shapes: the conversion's input size
    constants = graph_converter.name_to_constant
    program._constants.update({k: v for k, v in constants.items() if isinstance(v, torch.Tensor)})
    for key in constants:
        program.state_dict.pop(key, None)
    for spec in program.graph_signature.input_specs:  # the converter's tensor constants are retraced as buffers
        if spec.kind == torch.export.graph_signature.InputKind.BUFFER and spec.target in constants:
            spec.kind, spec.persistent = torch.export.graph_signature.InputKind.CONSTANT_TENSOR, None
    for node in program.graph.nodes:
        scope = node.meta.get("custom", {}).get(_SCOPE)
        node.meta["nn_module_stack"] = _module_stack(scope) if scope is not None else {}
    return program


_SCOPE = "mdeploy_torchscript_scope"
_SIZE_OPS = {"size", "sym_size", "dim", "numel", "sym_numel"}


def _scoped_converter() -> type:
    from torch._export.converter import TS2FXGraphConverter

    class ScopedConverter(TS2FXGraphConverter):
        """Records on each fx node the TorchScript scope ("pkg.Class::name/...") of the node it came from."""

        def convert_node(self, node: torch._C.Node) -> None:
            root = self.fx_graph._root
            last = root.prev
            super().convert_node(node)
            scope, current = node.scopeName(), root.prev
            while current is not last and current is not root:
                current.meta.setdefault("custom", {})[_SCOPE] = scope
                current = current.prev

    return ScopedConverter


def _module_stack(scope: str) -> dict[str, tuple[str, str]]:
    """A TorchScript scope ("pkg.Root::/pkg.Seq::blocks/pkg.Block::0") as torch.export's nn_module_stack."""
    stack: dict[str, tuple[str, str]] = {}
    names: list[str] = []
    for part in scope.split("/")[1:] if scope else []:
        cls, _, name = part.rpartition("::")
        names.append(name)
        path = ".".join(names)
        stack[f"L__self__{path}"] = (path, cls)
    return stack


def _fold_sizes(gm: fx.GraphModule, example: torch.Tensor) -> None:
    """Replace every scalar computed from shapes, constants and weights (never from the input's values) by its
    value at ``example``'s shape: TorchScript keeps such arithmetic as tensor ops that torch.export cannot trace."""
    static: dict[fx.Node, bool] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            static[node] = True
        elif node.op == "call_function":
            name = getattr(node.target, "_opname", None) or getattr(node.target, "__name__", "")
            static[node] = name in _SIZE_OPS or all(static.get(a, False) for a in node.all_input_nodes)
        else:
            static[node] = False
    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            out = super().run_node(node)
            if static[node] and isinstance(out, (bool, int, float)):
                values[node] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(example)
    for node, value in values.items():
        for user in list(node.users):
            user.args = fx.node.map_arg(user.args, lambda a, n=node, v=value: v if a is n else a)
            user.kwargs = fx.node.map_arg(user.kwargs, lambda a, n=node, v=value: v if a is n else a)
    for node in reversed(list(gm.graph.nodes)):
        if static[node] and node.op == "call_function" and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
