"""ONNX target: fp32 graphs and int8 QDQ graphs written straight from the IR, run on ONNX Runtime.

Writing the graph ourselves (instead of ``torch.onnx.export`` + ``quantize_static``) lets the int8 artifact carry
exactly the weights and ranges the quantiser chose; ONNX Runtime fuses each DequantizeLinear -> op ->
QuantizeLinear group into an integer kernel. Codes are stored as uint8 (code + 128, zero point + 128: the same grid),
which no x86 CPU's ONNX Runtime kernels saturate on (``onnx_dense.stored_codes``).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.converters.base import (ONE_OUTPUT_STAGE, ArtifactInfo, BundleRunner, ConverterBase, Precision, Runner,
                                  Target, require_content)
from mdeploy.converters.onnx_dense import DENSE_EMITTERS, stored_codes
from mdeploy.errors import BadInputError, UnsupportedOpError
from mdeploy.graph.ir import Activation, ClipAttrs, ConvAttrs, Graph, Node, Op, OpRegistry, PadAttrs, only_output
from mdeploy.graph.ir import GeluAttrs, LeakyReluAttrs, PoolAttrs, ReshapeAttrs, ShuffleAttrs, SliceAttrs
from mdeploy.graph.ir import TransposeAttrs, concat_axis, softmax_axis
from mdeploy.graph.pooling import pool_geometry, shuffle_permutation
from mdeploy.quantize.params import QuantizedGraph, quantize_bias
from mdeploy.quantize.rounding import affine_dequantized
from mdeploy.types import INPUT_NAME, OutputsRunner, outputs_entry

OPSET = 17

Emitter = Callable[["_Writer", Node, list[str], str], str]
# IR op -> its ONNX emitter (a _Writer method): one per member of Op (tests/test_ops.py checks).
EMITTERS: OpRegistry[Emitter] = OpRegistry()
emits = EMITTERS.register
EMITTERS.update(DENSE_EMITTERS)  # RESIZE, CONV_TRANSPOSE


class _Writer:
    """Accumulates ONNX nodes and initializers; one small method per IR op, registered in EMITTERS."""

    def __init__(self, graph: Graph, quantized: QuantizedGraph | None) -> None:
        from onnx import helper

        self.helper = helper
        self.graph = graph
        self.quantized = quantized
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    # -- helpers ---------------------------------------------------------------------------------------------
    def constant(self, name: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.require(value, requirements="C"), name))
        return name

    def add(self, op_type: str, inputs: list[str], output: str, **attrs: Any) -> str:
        self.nodes.append(self.helper.make_node(op_type, inputs, [output], name=output + "/" + op_type, **attrs))
        return output

    def qdq(self, tensor: str, float_name: str, output: str | None = None) -> str:
        """Quantise and dequantise ``float_name`` with ``tensor``'s int8 parameters into ``output`` (``tensor``)."""
        assert self.quantized is not None
        quant = self.quantized.activations[tensor]
        scale = self.constant(tensor + "/scale", np.array(float(quant.scale), np.float32))
        zero_point = self.constant(tensor + "/zero_point", stored_codes(quant.zero_point))
        self.add("QuantizeLinear", [float_name, scale, zero_point], tensor + "/q")
        return self.add("DequantizeLinear", [tensor + "/q", scale, zero_point], output or tensor)

    def is_int8(self, node: Node) -> bool:
        return self.quantized is not None and node.name not in self.quantized.float_nodes

    def weight_and_bias(self, node: Node) -> tuple[str, str]:
        if not self.is_int8(node):
            return (self.constant(node.name + "/weight", node.weight), self.constant(node.name + "/bias", node.bias))
        assert self.quantized is not None
        wq = self.quantized.weights[node.name]
        input_scale = self.quantized.activations[node.inputs[0]].scale
        channels = wq.scale.shape[0]
        w_q = self.constant(node.name + "/weight_q", stored_codes(wq.values))
        w_scale = self.constant(node.name + "/weight_scale", wq.scale.astype(np.float32))
        w_zp = self.constant(node.name + "/weight_zero_point", stored_codes(np.zeros(channels, np.int8)))
        w = self.add("DequantizeLinear", [w_q, w_scale, w_zp], node.name + "/weight", axis=0)
        b_q = self.constant(node.name + "/bias_q", quantize_bias(node.bias, input_scale, wq.scale))
        b_scale = self.constant(node.name + "/bias_scale", (input_scale * wq.scale).astype(np.float32))
        b_zp = self.constant(node.name + "/bias_zero_point", np.zeros(channels, np.int32))
        b = self.add("DequantizeLinear", [b_q, b_scale, b_zp], node.name + "/bias", axis=0)
        return w, b

    def activation(self, x: str, activation: Activation, output: str) -> str:
        if activation is Activation.RELU:
            return self.add("Relu", [x], output)
        if activation is Activation.RELU6:
            low = self.constant(output + "/min", np.array(0.0, np.float32))
            high = self.constant(output + "/max", np.array(6.0, np.float32))
            return self.add("Clip", [x, low, high], output)
        return x

    # -- one function per IR op (registered in EMITTERS), returning the float output's name ---------------------
    @emits(Op.CONV)
    def conv(self, node: Node, inputs: list[str], out: str) -> str:
        attrs = node.attrs
        assert isinstance(attrs, ConvAttrs)
        w, b = self.weight_and_bias(node)
        top, bottom, left, right = attrs.padding
        y = self.add(
            "Conv",
            [inputs[0], w, b],
            out + "/conv" if node.activation is not Activation.NONE else out,
            strides=list(attrs.stride),
            pads=[top, left, bottom, right],
            dilations=list(attrs.dilation),
            group=attrs.groups,
            kernel_shape=list(node.weight.shape[2:]),
        )
        return self.activation(y, node.activation, out)

    @emits(Op.LINEAR)
    def linear(self, node: Node, inputs: list[str], out: str) -> str:
        w, b = self.weight_and_bias(node)
        y = self.add("Gemm", [inputs[0], w, b], out + "/gemm" if node.activation is not Activation.NONE else out,
                     transB=1)
        return self.activation(y, node.activation, out)

    @emits(Op.ADD)
    def add_op(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("Add", inputs, out)

    @emits(Op.MUL)
    def mul(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("Mul", inputs, out)

    @emits(Op.RELU)
    def relu(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("Relu", inputs, out)

    @emits(Op.CLIP)
    def clip(self, node: Node, inputs: list[str], out: str) -> str:
        attrs = node.attrs
        assert isinstance(attrs, ClipAttrs)
        low = self.constant(out + "/min", np.array(attrs.min, np.float32))
        high = self.constant(out + "/max", np.array(attrs.max, np.float32))
        return self.add("Clip", [inputs[0], low, high], out)

    @emits(Op.HARDSWISH)
    def hardswish(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("HardSwish", inputs, out)

    @emits(Op.HARDSIGMOID)
    def hardsigmoid(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("HardSigmoid", inputs, out, alpha=1.0 / 6.0, beta=0.5)

    @emits(Op.SIGMOID)
    def sigmoid(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("Sigmoid", inputs, out)

    @emits(Op.GLOBAL_AVG_POOL)
    def global_avg_pool(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("GlobalAveragePool", inputs, out)

    @emits(Op.FLATTEN)
    def flatten(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("Flatten", inputs, out, axis=1)

    @emits(Op.PAD)
    def pad(self, node: Node, inputs: list[str], out: str) -> str:
        attrs = node.attrs
        assert isinstance(attrs, PadAttrs)
        top, bottom, left, right = attrs.pads
        pads = self.constant(out + "/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64))
        return self.add("Pad", [inputs[0], pads], out)

    @emits(Op.SILU)
    def silu(self, node: Node, inputs: list[str], out: str) -> str:  # opset 17 has no Swish
        return self.add("Mul", [inputs[0], self.add("Sigmoid", inputs, out + "/sigmoid")], out)

    @emits(Op.GELU)
    def gelu(self, node: Node, inputs: list[str], out: str) -> str:
        """opset 17 has no Gelu (opset 20): 0.5 x (1 + erf(x / sqrt(2))), or 0.5 x (1 + tanh(sqrt(2 / pi) (x +
        0.044715 x^3))), with standard ops (int8: in float between the input's DequantizeLinear and the output's
        QuantizeLinear, as SILU)."""
        assert isinstance(node.attrs, GeluAttrs)
        x = inputs[0]

        def scalar(role: str, value: float) -> str:
            return self.constant(f"{out}/{role}", np.array(value, np.float32))

        if node.attrs.approximate == "tanh":
            cube = self.add("Mul", [x, self.add("Mul", [x, x], out + "/square")], out + "/cube")
            inner = self.add("Add", [x, self.add("Mul", [cube, scalar("c", 0.044715)], out + "/cube_c")],
                             out + "/inner")
            scaled = self.add("Mul", [inner, scalar("sqrt_2_over_pi", np.sqrt(2.0 / np.pi))], out + "/scaled")
            curve = self.add("Tanh", [scaled], out + "/tanh")
        else:
            scaled = self.add("Mul", [x, scalar("sqrt_half", np.sqrt(0.5))], out + "/scaled")
            curve = self.add("Erf", [scaled], out + "/erf")
        one_plus = self.add("Add", [curve, scalar("one", 1.0)], out + "/one_plus")
        half_x = self.add("Mul", [x, scalar("half", 0.5)], out + "/half_x")
        return self.add("Mul", [half_x, one_plus], out)

    @emits(Op.LEAKY_RELU)
    def leaky_relu(self, node: Node, inputs: list[str], out: str) -> str:
        assert isinstance(node.attrs, LeakyReluAttrs)
        return self.add("LeakyRelu", inputs, out, alpha=node.attrs.negative_slope)

    def along_channels(self, node: Node, name: str, value: np.ndarray) -> str:
        """A (C,) parameter as a constant broadcasting along axis 1 of ``node``'s output."""
        rank = len(self.graph.shapes[node.output])
        return self.constant(name, value.astype(np.float32).reshape((-1,) + (1,) * (rank - 2)))

    @emits(Op.PRELU)
    def prelu(self, node: Node, inputs: list[str], out: str) -> str:
        return self.add("PRelu", [inputs[0], self.along_channels(node, out + "/slope", node.params["slope"])], out)

    @emits(Op.AFFINE)
    def affine(self, node: Node, inputs: list[str], out: str) -> str:
        """Mul and Add by constants; int8: the scale and shift the int8 kernels apply (rounding.affine_dequantized),
        computed in float between the input's DequantizeLinear and the output's QuantizeLinear."""
        scale, shift = node.params["scale"], node.params["shift"]
        if self.is_int8(node):
            assert self.quantized is not None
            scale, shift = affine_dequantized(scale, shift, self.quantized.activations[node.inputs[0]].scale)
        y = self.add("Mul", [inputs[0], self.along_channels(node, out + "/scale", scale)],
                     out + "/scaled" if np.any(shift != 0) else out)
        return self.add("Add", [y, self.along_channels(node, out + "/shift", shift)], out) if np.any(shift != 0) else y

    @emits(Op.SOFTMAX)
    def softmax(self, node: Node, inputs: list[str], out: str) -> str:
        rank = len(self.graph.shapes[node.output])
        axis = softmax_axis(node, rank)
        return self.add("Softmax", inputs, out, axis=-1 if axis == rank - 1 else axis)

    @emits(Op.CONCAT)
    def concat(self, node: Node, inputs: list[str], out: str) -> str:
        if self.quantized is not None and self.is_int8(node):  # inputs on another grid: requantised to the output's
            grid = self.quantized.activations[node.output]
            inputs = list(inputs)
            for i, name in enumerate(node.inputs):
                if self.quantized.activations[name] != grid:
                    tag = f"{out}/input{i}"
                    scale = self.constant(tag + "/scale", np.array(float(grid.scale), np.float32))
                    zero_point = self.constant(tag + "/zero_point", stored_codes(grid.zero_point))
                    self.add("QuantizeLinear", [inputs[i], scale, zero_point], tag + "/q")
                    inputs[i] = self.add("DequantizeLinear", [tag + "/q", scale, zero_point], tag)
        return self.add("Concat", inputs, out, axis=concat_axis(node))

    @emits(Op.MAX_POOL, Op.AVG_POOL)
    def pool(self, node: Node, inputs: list[str], out: str) -> str:
        """PyTorch's windows (mdeploy.graph.pooling): explicit pads, then a correction map for PyTorch's divisor."""
        attrs = node.attrs
        assert isinstance(attrs, PoolAttrs)
        average = node.op is Op.AVG_POOL
        geometry = pool_geometry(attrs, self.graph.shapes[node.inputs[0]][2:], average)  # type: ignore[arg-type]
        top, bottom, left, right = geometry.pads
        kwargs: dict[str, Any] = {"kernel_shape": list(attrs.kernel), "strides": list(attrs.stride),
                                  "pads": [top, left, bottom, right]}
        if not average:
            return self.add("MaxPool", inputs, out, **kwargs)
        if geometry.correction is None:
            return self.add("AveragePool", inputs, out, count_include_pad=1, **kwargs)
        y = self.add("AveragePool", inputs, out + "/window_mean", count_include_pad=1, **kwargs)
        correction = self.constant(out + "/correction", geometry.correction.reshape(1, 1, *geometry.out)
                                   .astype(np.float32))
        return self.add("Mul", [y, correction], out)

    @emits(Op.CHANNEL_SHUFFLE)
    def channel_shuffle(self, node: Node, inputs: list[str], out: str) -> str:
        assert isinstance(node.attrs, ShuffleAttrs)
        channels = self.graph.shapes[node.inputs[0]][1]
        perm = self.constant(out + "/perm", shuffle_permutation(channels, node.attrs.groups).astype(np.int64))
        return self.add("Gather", [inputs[0], perm], out, axis=1)

    @emits(Op.SLICE)
    def channel_slice(self, node: Node, inputs: list[str], out: str) -> str:
        attrs = node.attrs
        assert isinstance(attrs, SliceAttrs)
        starts = self.constant(out + "/starts", np.array([attrs.start], np.int64))
        ends = self.constant(out + "/ends", np.array([attrs.end], np.int64))
        axes = self.constant(out + "/axes", np.array([1], np.int64))
        return self.add("Slice", [inputs[0], starts, ends, axes], out)

    @emits(Op.RESHAPE)
    def reshape(self, node: Node, inputs: list[str], out: str) -> str:
        assert isinstance(node.attrs, ReshapeAttrs)
        shape = self.constant(out + "/shape", np.array([-1, *node.attrs.shape[1:]], np.int64))  # any batch
        return self.add("Reshape", [inputs[0], shape], out)

    @emits(Op.TRANSPOSE)
    def transpose(self, node: Node, inputs: list[str], out: str) -> str:
        assert isinstance(node.attrs, TransposeAttrs)
        return self.add("Transpose", inputs, out, perm=list(node.attrs.perm))

    @emits(Op.MATMUL)
    def matmul(self, node: Node, inputs: list[str], out: str) -> str:  # int8: ONNX Runtime fuses DQ -> MatMul -> Q
        return self.add("MatMul", inputs, out)

    def emit(self, node: Node, inputs: list[str], out: str) -> str:
        emitter = EMITTERS.get(node.op)
        if emitter is None:
            raise UnsupportedOpError(f"IR op {node.op.value} at {node.source or node.name} has no ONNX emitter")
        return emitter(self, node, inputs, out)

    def io_description(self) -> dict[str, Any]:
        """Float input and outputs; for int8, the grids the model quantises them onto inside (QDQ)."""
        names = self.graph.artifact_names
        tensors: dict[str, dict[str, Any]] = {self.graph.input_name: {"name": INPUT_NAME, "dtype": "float32"}}
        meaning = {"meaning": "raw logits"} if len(names) == 1 else {}  # what several outputs mean: issue 15
        for tensor, name in names.items():
            tensors[tensor] = {"name": name, "dtype": "float32", **meaning}
        if self.quantized is not None:
            for tensor, entry in tensors.items():
                tq = self.quantized.activations.get(tensor)
                if tq is not None:
                    entry["int8_grid"] = {"scale": float(tq.scale), "zero_point": int(tq.zero_point),
                                          "stored_as": "uint8, code + 128 (zero point + 128)"}
        return {"input": tensors[self.graph.input_name], **outputs_entry([tensors[t] for t in names])}

    def write(self, info: ArtifactInfo) -> Any:
        from onnx import TensorProto, helper

        emit = self.emit
        graph = self.graph
        quantized = self.quantized
        if graph.input_name != INPUT_NAME:
            raise ValueError(f"the IR's input tensor must be named {INPUT_NAME!r}")
        # The IR's tensor names are reused; the float input is renamed after its quantise-dequantise pair.
        renamed = {INPUT_NAME: INPUT_NAME}
        if quantized is not None and INPUT_NAME in quantized.activations:  # else mixed precision's float input
            renamed[INPUT_NAME] = self.qdq(INPUT_NAME, INPUT_NAME, output=INPUT_NAME + "/dq")
        for node in graph.nodes:
            inputs = [renamed.get(name, name) for name in node.inputs]
            out = node.output
            if quantized is not None and out in quantized.activations:
                emit(node, inputs, out + "/float")
                self.qdq(out, out + "/float")
            else:
                emit(node, inputs, out)
        outputs = []
        for tensor, name in graph.artifact_names.items():  # each output, in order, under the artifact's name
            self.add("Identity", [renamed.get(tensor, tensor)], name)
            shape = graph.shapes.get(tensor, (1, 0))[1:]
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", *shape]))
        channels, height, width = graph.input_shape[1:]
        onnx_graph = helper.make_graph(
            self.nodes,
            info.model_name,
            [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", channels, height, width])],
            outputs,
            self.initializers,
        )
        model = helper.make_model(
            onnx_graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name="mdeploy",
            producer_version=info.producer_version,
        )
        model.ir_version = 8  # readable by every ONNX Runtime since 1.14 and by mobile builds
        metadata = {
            "mdeploy.preprocess": json.dumps(info.preprocess, sort_keys=True),
            "mdeploy.labels": json.dumps(list(info.labels)),
            "mdeploy.precision": "int8" if quantized is not None else "fp32",
            "mdeploy.layout": "NCHW",
            "mdeploy.io": json.dumps(self.io_description(), sort_keys=True),
            **info.extra,
        }
        helper.set_model_props(model, metadata)
        return model


class OnnxConverter(ConverterBase):
    target = Target.onnx
    suffix = ".onnx"
    runtime_name = "ONNX Runtime (CPU)"
    requires = ("onnx", "onnxruntime")
    packages = ("onnx", "onnxruntime")
    taps_runtime = "ONNX Runtime (CPU, graph optimisations off)"
    arm_format = "onnx"
    times_latency = True

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        import onnx

        model = _Writer(graph, quantized).write(info)
        onnx.checker.check_model(model, full_check=True)
        onnx.save(model, str(path))

    def layer_taps(self, path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
        from mdeploy.converters.onnx_taps import onnx_layer_taps

        return onnx_layer_taps(path, graph, inputs)

    def settings(self, precision: Precision) -> dict[str, Any]:
        if precision is Precision.int8:
            return {"opset": OPSET, "int8_format": "QDQ (QuantizeLinear/DequantizeLinear pairs)"}
        return {"opset": OPSET}

    def runner(self, path: Path, threads: int = 1) -> Runner:
        session = _session(Path(path), threads)
        input_name = session.get_inputs()[0].name
        only_output([o.name for o in session.get_outputs()], ONE_OUTPUT_STAGE, Path(path).name)

        def run(batch: np.ndarray) -> np.ndarray:
            return session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]

        return run

    def outputs_runner(self, path: Path, threads: int = 1) -> OutputsRunner:
        session = _session(Path(path), threads)
        input_name = session.get_inputs()[0].name
        names = [o.name for o in session.get_outputs()]

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            values = session.run(names, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})
            return dict(zip(names, values, strict=True))

        return run

    def bundle_runner(self) -> BundleRunner:
        from mdeploy.converters.onnx_runs import run_onnx_in_bundle

        return BundleRunner("onnxruntime", run_onnx_in_bundle)

    def inspect(self, path: Path) -> dict[str, Any]:
        import onnx
        from onnx import numpy_helper

        require_content(Path(path), "an ONNX model")
        model = onnx.load(str(path))
        if not model.HasField("graph") or not model.graph.node or not any(
                o.domain in ("", "ai.onnx") for o in model.opset_import):
            raise BadInputError(f"{path} holds no ONNX graph with a default-domain opset (an empty or foreign "
                                "protobuf): pass an ONNX model, or convert again")

        def describe(value: Any) -> dict[str, Any]:
            dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).name
            return {"name": value.name, "dtype": dtype,
                    "shape": dims}

        ops = Counter(node.op_type for node in model.graph.node)
        initializers = {init.name: init for init in model.graph.initializer}
        quant_params = []
        for node in model.graph.node:
            if node.op_type == "QuantizeLinear":
                scale = numpy_helper.to_array(initializers[node.input[1]])
                zero_point = numpy_helper.to_array(initializers[node.input[2]])
                quant_params.append({"tensor": node.input[0].removesuffix("/float"),
                                     "scale": float(scale.reshape(-1)[0]), "zero_point": int(zero_point.reshape(-1)[0])})
        int8_weights = sum(1 for init in model.graph.initializer if init.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                           and len(init.dims) > 1)
        return {
            "format": "ONNX",
            "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
            "inputs": [describe(v) for v in model.graph.input],
            "outputs": [describe(v) for v in model.graph.output],
            "ops": dict(sorted(ops.items())),
            "size_bytes": path.stat().st_size,
            "int8_weight_tensors": int8_weights,
            "activation_quantization": quant_params,
            "metadata": {p.key: p.value for p in model.metadata_props},
        }


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    require_content(path, "an ONNX model")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
