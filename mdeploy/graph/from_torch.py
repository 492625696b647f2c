"""Build the IR from a PyTorch model through ``torch.export`` (ATen ops), folding BatchNorm and fusing ReLU/ReLU6.

Tracing with ``torch.export`` instead of walking modules means any user code that computes a MobileNet works,
whatever its module names. One small handler per ATen op; an op without a handler stops the conversion with a
message naming the op, the module it comes from and what is supported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import fx

from mdeploy.errors import BadInputError, ConversionError, MdeployError, UnsupportedOpError, first_line
from mdeploy.graph.ir import WEIGHTED_OPS, Activation, AxisAttrs, ClipAttrs, ConvAttrs, Graph, Node, Op, PadAttrs
from mdeploy.graph.programs import BatchedProgram, torchscript_program, traceable, unwrap_module
from mdeploy.graph.rewrite import simplify
from mdeploy.graph.from_torch_attention import ATTENTION_HANDLERS
from mdeploy.graph.from_torch_dense import DENSE_HANDLERS, conv_transpose
from mdeploy.graph.from_torch_elementwise import ELEMENTWISE_HANDLERS, emit_affine, fold_constant
from mdeploy.graph.from_torch_structure import STRUCTURE_HANDLERS, adaptive_pool, rewrite_structure
from mdeploy.graph.fx_nodes import op_name as _op_name
from mdeploy.graph.fx_nodes import pair as _pair
from mdeploy.graph.fx_nodes import source as _source
from mdeploy.types import INPUT_NAME



@dataclass
class _Builder:
    constants: dict[str, np.ndarray]  # fx placeholder name -> parameter or buffer value
    nodes: list[Node] = field(default_factory=list)
    tensor_of: dict[str, str] = field(default_factory=dict)  # fx node name -> IR tensor name
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)  # IR tensor -> number of fx users

    def tensor(self, arg: object) -> str:
        if not isinstance(arg, fx.Node) or arg.name not in self.tensor_of:
            what = "a constant tensor" if isinstance(arg, fx.Node) and arg.name in self.constants else "a constant"
            raise ConversionError(f"takes {what} ({arg}) where a feature map is expected")
        return self.tensor_of[arg.name]

    def constant(self, arg: object) -> np.ndarray | None:
        if arg is None:
            return None
        if isinstance(arg, fx.Node) and arg.name in self.constants:
            return self.constants[arg.name]
        raise ConversionError(f"takes a computed tensor ({arg}) where a weight (a parameter or buffer) is expected")

    def producer(self, tensor: str) -> Node | None:
        return next((n for n in reversed(self.nodes) if n.output == tensor), None)

    def emit(self, fx_node: fx.Node, op: Op, inputs: list[str], **kwargs: object) -> Node:
        node = Node(name=fx_node.name, op=op, inputs=inputs, output=fx_node.name, source=_source(fx_node), **kwargs)
        self.nodes.append(node)
        self.bind(fx_node, node.output)
        return node

    def bind(self, fx_node: fx.Node, tensor: str) -> None:
        self.tensor_of[fx_node.name] = tensor
        self.users[tensor] = len(fx_node.users)
        value = fx_node.meta.get("val")
        if isinstance(value, torch.Tensor):
            self.shapes[tensor] = tuple(int(d) for d in value.shape)

    def sole_producer(self, tensor: str, op: Op) -> Node | None:
        """The node making ``tensor`` if it is of kind ``op`` and nothing else reads its output."""
        node = self.producer(tensor)
        return node if node is not None and node.op is op and self.users.get(tensor) == 1 else None


Handler = Callable[[_Builder, fx.Node], None]
HANDLERS: dict[str, Handler] = {}


def handles(*names: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        for name in names:
            HANDLERS[name] = fn
        return fn

    return register


@handles("conv2d", "convolution")
def _conv(b: _Builder, n: fx.Node) -> None:
    args = list(n.args) + [None] * 9
    x, weight, bias, stride, padding, dilation = args[:6]
    groups = args[6]
    if _op_name(n.target) == "convolution":  # (input, weight, bias, stride, padding, dilation, transposed, ...)
        if args[6]:  # (..., transposed, output_padding, groups)
            conv_transpose(b, n, x, weight, bias, stride, padding, args[7], args[8], dilation)
            return
        groups = args[8]
    w = b.constant(weight)
    assert w is not None
    if w.ndim != 4:
        raise UnsupportedOpError(f"only 2-D convolutions are supported (at {_source(n)})")
    pad_h, pad_w = _pair(padding, 0)
    if isinstance(padding, str):
        raise UnsupportedOpError(f"string padding {padding!r} at {_source(n)}: use explicit integer padding")
    bias_value = b.constant(bias)
    x_name = b.tensor(x)
    pads = (pad_h, pad_h, pad_w, pad_w)
    pad_node = b.sole_producer(x_name, Op.PAD)
    if pad_node is not None:  # an explicit (often asymmetric, TF-style) zero pad folds into the convolution
        assert isinstance(pad_node.attrs, PadAttrs)
        pads = tuple(p + q for p, q in zip(pads, pad_node.attrs.pads))  # type: ignore[assignment]
        b.nodes.remove(pad_node)
        x_name = pad_node.inputs[0]
    b.emit(
        n,
        Op.CONV,
        [x_name],
        attrs=ConvAttrs(_pair(stride, 1), pads, _pair(dilation, 1), int(groups or 1)),  # type: ignore[arg-type]
        params={
            "weight": w.astype(np.float32),
            "bias": (bias_value if bias_value is not None else np.zeros(w.shape[0])).astype(np.float32),
        },
    )


def _batch_norm_scale_shift(b: _Builder, args: list[object], eps: float) -> tuple[np.ndarray, np.ndarray]:
    _, gamma, beta, mean, var = args[:5]
    mean_v, var_v = b.constant(mean), b.constant(var)
    if mean_v is None or var_v is None:
        raise UnsupportedOpError("BatchNorm without running statistics cannot be folded: export the model in eval mode")
    gamma_v = b.constant(gamma)
    beta_v = b.constant(beta)
    variance = var_v.astype(np.float64) + eps
    if not np.all(variance > 0):  # its square root would be NaN: a damaged checkpoint, not a conversion problem
        raise BadInputError(
            f"BatchNorm statistics {var} hold {int(np.sum(~(variance > 0)))} negative variance(s), whose square "
            "root folding needs: the checkpoint is damaged; fix the trained weights or use an earlier checkpoint"
        )
    scale = (gamma_v if gamma_v is not None else 1.0) / np.sqrt(variance)
    shift = (beta_v if beta_v is not None else 0.0) - mean_v * scale
    return scale, shift


def _fold_batch_norm(b: _Builder, n: fx.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    x_name = b.tensor(n.args[0])
    conv = b.sole_producer(x_name, Op.CONV) or b.sole_producer(x_name, Op.CONV_TRANSPOSE)  # axis 0: out channels
    if conv is not None and conv.activation is Activation.NONE:
        w = conv.params["weight"].astype(np.float64)
        conv.params["weight"] = (w * scale.reshape(-1, 1, 1, 1)).astype(np.float32)
        conv.params["bias"] = (conv.params["bias"] * scale + shift).astype(np.float32)
        b.bind(n, conv.output)
        return
    along = (-1,) + (1,) * (len(b.shapes[x_name]) - 2)  # a BatchNorm on its own: a per-channel scale and shift
    emit_affine(b, n, n.args[0], scale.reshape(along), shift.reshape(along))


@handles("batch_norm")
def _batch_norm(b: _Builder, n: fx.Node) -> None:
    args = list(n.args)
    if args[5]:
        raise UnsupportedOpError(f"BatchNorm in training mode at {_source(n)}: call model.eval() first")
    scale, shift = _batch_norm_scale_shift(b, args, float(args[7]))
    _fold_batch_norm(b, n, scale, shift)


@handles("_native_batch_norm_legit_no_training")
def _native_batch_norm(b: _Builder, n: fx.Node) -> None:
    args = list(n.args)  # (input, weight, bias, mean, var, momentum, eps) -> (out, mean, invstd)
    scale, shift = _batch_norm_scale_shift(b, args, float(args[6]))
    _fold_batch_norm(b, n, scale, shift)


@handles("getitem")
def _getitem(b: _Builder, n: fx.Node) -> None:
    source, index = n.args
    if index == 0 and isinstance(source, fx.Node) and source.name in b.tensor_of:
        b.bind(n, b.tensor_of[source.name])
        return
    raise UnsupportedOpError(f"tuple indexing [{index}] at {_source(n)} is not supported")


def _activation(b: _Builder, n: fx.Node, activation: Activation, standalone: Op, attrs: ClipAttrs | None) -> None:
    x_name = b.tensor(n.args[0])
    producer = b.producer(x_name)
    if (
        producer is not None
        and producer.op in WEIGHTED_OPS
        and producer.activation is Activation.NONE
        and b.users.get(x_name) == 1
    ):
        producer.activation = activation
        b.bind(n, producer.output)
        return
    b.emit(n, standalone, [x_name], attrs=attrs)


@handles("relu", "relu_")
def _relu(b: _Builder, n: fx.Node) -> None:
    _activation(b, n, Activation.RELU, Op.RELU, None)


@handles("hardtanh", "hardtanh_", "clamp", "clamp_", "clip", "relu6")
def _clip(b: _Builder, n: fx.Node) -> None:
    if _op_name(n.target) == "relu6":
        low, high = 0.0, 6.0
    else:
        default_low, default_high = (-1.0, 1.0) if "hardtanh" in _op_name(n.target) else (-np.inf, np.inf)
        args = list(n.args) + [None, None]
        low = float(args[1]) if args[1] is not None else n.kwargs.get("min", default_low)
        high = float(args[2]) if args[2] is not None else n.kwargs.get("max", default_high)
        low, high = float(low if low is not None else -np.inf), float(high if high is not None else np.inf)
    if (low, high) == (0.0, 6.0):
        _activation(b, n, Activation.RELU6, Op.CLIP, ClipAttrs(0.0, 6.0))
    elif (low, high) == (0.0, np.inf):
        _activation(b, n, Activation.RELU, Op.RELU, None)
    else:
        b.emit(n, Op.CLIP, [b.tensor(n.args[0])], attrs=ClipAttrs(low, high))


def _unary(op: Op) -> Handler:
    def handler(b: _Builder, n: fx.Node) -> None:
        b.emit(n, op, [b.tensor(n.args[0])])

    return handler


HANDLERS.update(
    {
        "hardswish": _unary(Op.HARDSWISH),
        "hardswish_": _unary(Op.HARDSWISH),
        "hardsigmoid": _unary(Op.HARDSIGMOID),
        "hardsigmoid_": _unary(Op.HARDSIGMOID),
        "sigmoid": _unary(Op.SIGMOID),
        "sigmoid_": _unary(Op.SIGMOID),
    }
)


def _spatial_dims(dims: object, rank: int) -> bool:
    return sorted(int(d) % rank for d in dims) == [2, 3]  # type: ignore[union-attr]


def _global_pool(b: _Builder, n: fx.Node, keepdim: bool) -> None:
    node = b.emit(n, Op.GLOBAL_AVG_POOL, [b.tensor(n.args[0])])
    if not keepdim:
        b.shapes[node.output] = b.shapes[node.output] + (1, 1)
        flat = Node(n.name + "_flatten", Op.FLATTEN, [node.output], n.name + "_flatten", source=node.source)
        b.nodes.append(flat)
        b.shapes[flat.output] = b.shapes[node.output][:2]
        b.tensor_of[n.name] = flat.output
        b.users[flat.output] = len(n.users)
        b.users[node.output] = 1


@handles("adaptive_avg_pool2d", "_adaptive_avg_pool2d")
def _adaptive_avg_pool(b: _Builder, n: fx.Node) -> None:
    if _pair(n.args[1], 1) != (1, 1):  # a fixed kernel and stride, or a clear error
        adaptive_pool(b, n, Op.AVG_POOL)
        return
    _global_pool(b, n, keepdim=True)


@handles("mean")
def _mean(b: _Builder, n: fx.Node) -> None:
    args = list(n.args) + [None, False]
    dims, keepdim = args[1], bool(args[2] or n.kwargs.get("keepdim", False))
    rank = len(b.shapes[b.tensor(args[0])])
    if rank != 4 or dims is None or not _spatial_dims(dims, rank):
        raise UnsupportedOpError(f"mean over {dims} at {_source(n)}: only the spatial mean (dims 2, 3) is supported")
    _global_pool(b, n, keepdim=keepdim)


@handles("linear")
def _linear(b: _Builder, n: fx.Node) -> None:
    args = list(n.args) + [None]
    w, bias = b.constant(args[1]), b.constant(args[2])
    assert w is not None
    shape = b.shapes[b.tensor(args[0])]
    if len(shape) != 2:  # Gemm, FULLY_CONNECTED and the quantiser's statistics take (N, features)
        raise UnsupportedOpError(f"linear layer on a rank-{len(shape)} tensor {shape} at {_source(n)} is not "
                                 "supported: mdeploy takes nn.Linear on (N, features); on tokens or a feature map "
                                 "use a 1x1 convolution")
    params = {"weight": w.astype(np.float32), "bias": (bias if bias is not None else np.zeros(w.shape[0]))}
    params["bias"] = params["bias"].astype(np.float32)
    b.emit(n, Op.LINEAR, [b.tensor(args[0])], params=params)


@handles("constant_pad_nd", "pad")
def _pad(b: _Builder, n: fx.Node) -> None:
    args = list(n.args) + [None, None]
    pads, mode, value = list(args[1]), n.kwargs.get("mode", args[2] or "constant"), args[3] if _op_name(
        n.target
    ) == "pad" else args[2]
    if mode != "constant" or (value not in (None, 0, 0.0)) or len(pads) != 4:
        raise UnsupportedOpError(f"padding {pads} mode={mode} value={value} at {_source(n)}: only zero padding of H, W")
    left, right, top, bottom = (int(p) for p in pads)
    b.emit(n, Op.PAD, [b.tensor(args[0])], attrs=PadAttrs((top, bottom, left, right)))


@handles("softmax", "_softmax")
def _softmax(b: _Builder, n: fx.Node) -> None:
    x_name = b.tensor(n.args[0])
    rank = len(b.shapes[x_name])
    axis = int(n.args[1]) % rank
    if axis == 0:
        raise UnsupportedOpError(f"softmax over the batch axis (dim {n.args[1]}) at {_source(n)}: only over "
                                 "another axis")
    b.emit(n, Op.SOFTMAX, [x_name], attrs=None if axis == rank - 1 else AxisAttrs(axis))


@handles("dropout", "dropout_", "clone", "contiguous", "alias", "detach", "_to_copy", "to", "identity", "lift_fresh_copy")
def _identity(b: _Builder, n: fx.Node) -> None:
    b.bind(n, b.tensor(n.args[0]))


HANDLERS.update(STRUCTURE_HANDLERS)  # concat, pooling, channel shuffle, channel slices
HANDLERS.update(ELEMENTWISE_HANDLERS)  # add/sub/mul/div (of feature maps, or by constants), SiLU, (P/Leaky)ReLU
HANDLERS.update(ATTENTION_HANDLERS)  # reshapes, transposes, matmul, scaled_dot_product_attention
HANDLERS.update(DENSE_HANDLERS)  # interpolate / upsampling, transposed convolutions
IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "_set_grad_enabled"}


def _export(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    try:
        if isinstance(module, torch.jit.ScriptModule):  # specialised to the input size, ops named by module path
            return torchscript_program(module, example)
        return torch.export.export(module, (example,), strict=False)
    except MdeployError:
        raise
    except Exception as err:  # torch raises many types here; the user needs the first line only
        raise ConversionError(f"torch.export could not trace the model: {first_line(err)}") from err


def graph_from_torch(module: torch.nn.Module, input_shape: tuple[int, ...]) -> Graph:
    """Trace ``module`` (eval mode) on an input of ``input_shape`` (1, C, H, W) and build the IR."""
    module = module.eval()
    if isinstance(module, BatchedProgram):
        module.check_input(tuple(input_shape))
    module, batch = traceable(unwrap_module(module), input_shape[0])  # an ExportedProgram runs at its own batch
    program = _export(module, torch.zeros((batch, *input_shape[1:])))
    signature = program.graph_signature
    state = {**program.state_dict, **program.constants}
    constants: dict[str, np.ndarray] = {}
    for spec in signature.input_specs:
        if spec.target is not None and spec.target in state:
            value = state[spec.target]
            if value.is_floating_point():
                _check_finite(spec.target, value)
            constants[spec.arg.name] = value.detach().float().numpy()
    rewrite_structure(program.graph)  # channel shuffles and split/chunk pieces as single ATen ops
    builder = _Builder(constants)
    user_inputs = [spec.arg.name for spec in signature.input_specs if spec.target is None]
    if len(user_inputs) != 1:
        raise UnsupportedOpError(f"the model takes {len(user_inputs)} inputs; mdeploy converts one-image models")
    for fx_node in program.graph.nodes:
        if fx_node.op == "placeholder":
            if fx_node.name == user_inputs[0]:
                builder.bind(fx_node, INPUT_NAME)
            continue
        if fx_node.op == "output":
            outputs = _outputs(builder, fx_node.args[0])
            continue
        name = _op_name(fx_node.target)
        if name in IGNORED or fold_constant(builder, fx_node):  # constants only: computed now
            continue
        handler = HANDLERS.get(name)
        where = _source(fx_node) or "the model's forward()"
        if handler is None:
            supported = ", ".join(sorted(h for h in HANDLERS if not h.endswith("_") and not h.startswith("_")))
            raise UnsupportedOpError(
                f"operator aten.{name} (from {where}) is not supported by any mdeploy target: rewrite that part "
                "of forward() with supported operators, or leave it out of the exported model and apply it in the "
                f"app; supported: {supported}"
            )
        try:
            handler(builder, fx_node)
        except UnsupportedOpError:
            raise
        except ConversionError as err:  # a supported op used in an unsupported way: say where
            raise UnsupportedOpError(
                f"operator aten.{name} (from {where}) {err}, which mdeploy does not support: compute it from "
                "the layers' outputs and weights only (registered parameters and buffers)"
            ) from None
    shapes = {k: (input_shape[0], *v[1:]) if v and v[0] == batch else v for k, v in builder.shapes.items()}
    nodes, outputs = simplify(builder.nodes, outputs)  # written-out activations; constant affines folded
    graph = Graph(nodes, INPUT_NAME, tuple(input_shape), outputs, shapes, _output_keys(program.call_spec.out_spec))
    _check_graph(graph)
    return graph


def _outputs(b: _Builder, returned: Any) -> tuple[str, ...]:
    """The IR tensors a forward() returns, in its order (torch.export flattens a returned tuple or list)."""
    returned = list(returned) if isinstance(returned, (list, tuple)) else [returned]
    if not returned:
        raise UnsupportedOpError("the model returns no tensor: export a model whose forward() returns its outputs")
    names = []
    for i, value in enumerate(returned):
        which = "the model's output" if len(returned) == 1 else f"output {i} of the model"
        if not (isinstance(value, fx.Node) and value.name in b.tensor_of):
            raise UnsupportedOpError(f"{which} does not depend on its input: export the model itself")
        if b.tensor(value) == INPUT_NAME:
            raise UnsupportedOpError(f"{which} is its input, unchanged: leave it out of the exported model")
        names.append(b.tensor(value))
    if len(set(names)) != len(names):  # each output is one named tensor of the artifact
        raise UnsupportedOpError("the model returns the same tensor more than once: return it once and reuse it "
                                 "in the app")
    return tuple(names)


def _output_keys(spec: Any) -> tuple[str, ...]:
    """The keys of a dict of tensors forward() returns (torch.export flattens it in key order), else ()."""
    if spec is None or not issubclass(spec.type or object, dict):
        return ()
    if not all(child.is_leaf() for child in spec.children()):
        return ()
    return tuple(str(key) for key in spec.context)


def _check_finite(name: str, value: torch.Tensor) -> None:
    bad = ~torch.isfinite(value.detach())
    if bool(bad.any()):
        raise BadInputError(
            f"weight {name} holds {int(bad.sum())} NaN/Inf values: the training diverged or the file is damaged; "
            "use an earlier checkpoint"
        )


def _check_graph(graph: Graph) -> None:
    """Folding BatchNorm can turn finite but absurd statistics (e.g. a negative running_var) into NaN or Inf."""
    for node in graph.weighted_nodes:
        for key, value in node.params.items():
            if not np.all(np.isfinite(value)):
                raise BadInputError(
                    f"the folded {key} of {node.source or node.name} holds NaN or Inf (from its weights or "
                    "BatchNorm statistics, e.g. a negative running_var): fix the trained weights or use an "
                    "earlier checkpoint"
                )
