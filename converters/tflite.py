"""TFLite target: fp32 and full-int8 flatbuffers written straight from the IR, run on LiteRT (ai-edge-litert).

Why not Keras + TFLiteConverter (DESIGN.md §3): writing the flatbuffer ourselves (``converters/tflite_ops.py``)
puts exactly the quantiser's int8 weights, biases, scales and zero points into the artifact (the converter would
recalibrate), lets us choose the int8 patterns XNNPACK runs in one partition (the converter fuses hardswish back
into HARD_SWISH, which XNNPACK refuses in int8), needs no TensorFlow at export time, and takes well under a second.

I/O (``IOType``, int8 artifacts only): ``int8`` by default, the LiteRT convention for full-integer models (the
graph has no QUANTIZE/DEQUANTIZE at all and XNNPACK runs it end to end); ``uint8`` and ``float`` on request. The
input and output scale and zero point are on the I/O tensors and in the ``mdeploy.io`` metadata entry.

Metadata: ``Model.metadata`` entries (name -> UTF-8 buffer) ``mdeploy.preprocess``, ``mdeploy.labels``,
``mdeploy.precision``, ``mdeploy.io``, ``mdeploy.layout`` and the artifact's extra entries, readable with any
flatbuffer tooling (``tflite_flatbuffer.read_metadata``). When the preprocessing gives mean and std, also the TFLite
Support metadata that Android tooling and the Task Library read (``TFLITE_METADATA``, ``converters/tflite_metadata.py``)
and, with one label per class, ``labels.txt`` zipped after the flatbuffer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.converters.base import (ArtifactInfo, BundleRunner, CliOption, Converter, ConverterBase, Precision,
                                  Runner, Target, require_content)
from mdeploy.converters.tflite_io import tensor_decoder, tensor_encoder
from mdeploy.converters.tflite_options import HardSwishMode, IOType, Options
from mdeploy.converters.base import AppReadme, ReadmeParts
from mdeploy.converters.tflite_readme import android_readme
from mdeploy.manifest import Manifest
from mdeploy.converters.base import ONE_OUTPUT_STAGE
from mdeploy.graph.ir import Graph, only_output
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.types import INPUT_NAME, OutputsRunner, outputs_entry


__all__ = ["HardSwishMode", "IOType", "Kernels", "TfliteConverter", "tensor_decoder", "tensor_encoder"]


class Kernels(str, Enum):
    """Which LiteRT kernels run the model."""

    xnnpack = "xnnpack"  # the default XNNPACK delegate (what Android ships), builtin kernels for the rest
    builtin = "builtin"  # LiteRT's optimised builtin kernels, no delegate
    reference = "reference"  # LiteRT's reference kernels (slow; the arbiter when the others disagree)

    def __str__(self) -> str:
        return self.value


class TfliteConverter(ConverterBase):
    target = Target.tflite
    suffix = ".tflite"
    runtime_name = "LiteRT (XNNPACK)"
    requires = ("ai_edge_litert", "flatbuffers")
    packages = ("ai-edge-litert", "flatbuffers")
    taps_runtime = "LiteRT (builtin kernels)"
    arm_format = "tflite"
    times_latency = True

    def __init__(self, io: IOType | str = IOType.int8,
                 hardswish: HardSwishMode | str = HardSwishMode.decomposed) -> None:
        self.options = Options(IOType(io), HardSwishMode(hardswish))

    def layer_taps(self, path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
        from mdeploy.converters.tflite_taps import tflite_layer_taps

        return tflite_layer_taps(path, graph, inputs)

    def cli_options(self) -> tuple[CliOption, ...]:
        return (CliOption("tflite_io", IOType, IOType.int8, "type of the int8 TFLite model's input and output"),)

    def configured(self, values: Mapping[str, Any], int8: bool) -> Converter:
        return TfliteConverter(io=values["tflite_io"], hardswish=self.options.hardswish)

    @property
    def int8_takes_float_input(self) -> bool:
        return self.options.io is IOType.float

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
        return android_readme(manifest, parts)  # README_android.md: Kotlin with LiteRT

    def settings(self, precision: Precision) -> dict[str, Any]:
        if precision is Precision.int8:
            return {"io": str(self.options.io), "hardswish": str(self.options.hardswish), "layout": "NHWC"}
        return {"io": "float", "layout": "NHWC"}

    def to_bytes(self, graph: Graph, quantized: QuantizedGraph | None, info: ArtifactInfo) -> bytes:
        from mdeploy.converters import tflite_metadata
        from mdeploy.converters.tflite_ops import Translator

        builder = Translator(graph, quantized, self.options).translate(INPUT_NAME)
        outputs = [_io_description(builder, name) for name in builder.outputs]
        io = {"input": _io_description(builder, INPUT_NAME), **outputs_entry(outputs)}
        metadata = {
            "mdeploy.preprocess": json.dumps(info.preprocess, sort_keys=True),
            "mdeploy.labels": json.dumps(list(info.labels)),
            "mdeploy.precision": "int8" if quantized is not None else "fp32",
            "mdeploy.layout": "NHWC",
            "mdeploy.io": json.dumps(io, sort_keys=True),
            **info.extra,
        }
        if quantized is not None:
            metadata["mdeploy.int8_patterns"] = json.dumps({"hardswish": str(self.options.hardswish)})
        description = f"mdeploy {info.producer_version}".strip()
        support = tflite_metadata.build_metadata(info, io, metadata["mdeploy.precision"])
        binary = {tflite_metadata.METADATA_NAME: support} if support is not None else {}
        content = builder.serialize(info.model_name, metadata, description, binary)
        if support is not None and tflite_metadata.labels_attached(info.labels, outputs[0]["shape"][-1]):
            labels = tflite_metadata.labels_file(info.labels)
            content = tflite_metadata.pack_associated_files(content, {tflite_metadata.LABELS_FILE: labels})
        return content

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        Path(path).write_bytes(self.to_bytes(graph, quantized, info))

    def runner(self, path: Path, threads: int = 1, kernels: Kernels | str = Kernels.xnnpack) -> Runner:
        """Runs (N, C, H, W) float32 batches one image at a time (the artifact's batch is 1) and returns float32
        outputs: quantises the input and dequantises the output with the I/O tensors' own parameters."""
        require_content(Path(path), "a TFLite model")
        interpreter = load_interpreter(path, threads, Kernels(kernels))
        name = only_output([d["name"] for d in interpreter.get_output_details()], ONE_OUTPUT_STAGE, Path(path).name)
        run_all = _outputs_run(interpreter)
        return lambda batch: run_all(batch)[name]

    def outputs_runner(self, path: Path, threads: int = 1, kernels: Kernels | str = Kernels.xnnpack
                       ) -> OutputsRunner:
        """As :meth:`runner`, every output by name in the model's order (rank-4 ones back in NCHW)."""
        require_content(Path(path), "a TFLite model")
        return _outputs_run(load_interpreter(path, threads, Kernels(kernels)))

    def bundle_runner(self) -> BundleRunner:
        from mdeploy.converters.tflite_runs import run_tflite_in_bundle

        return BundleRunner("LiteRT", run_tflite_in_bundle, helpers=(tensor_encoder, tensor_decoder))

    def inspect(self, path: Path) -> dict[str, Any]:
        from mdeploy.converters import tflite_metadata
        from mdeploy.converters.tflite_flatbuffer import read_metadata, read_model
        from mdeploy.converters.tflite_report import graph_report, tensor_description

        require_content(Path(path), "a TFLite model")
        content = Path(path).read_bytes()
        model = read_model(content)
        graph = model.subgraphs[0]
        report = graph_report(content)
        tensors = graph.tensors
        int8_weights = sum(1 for t in tensors if t.type == 9 and t.buffer and model.buffers[t.buffer].data
                           is not None and len(t.shape) > 1)
        activations = []
        for index, t in enumerate(tensors):
            constant = t.buffer and model.buffers[t.buffer].data is not None
            if not constant and t.quantization is not None and t.quantization.scale is not None:
                activations.append(tensor_description(model, index))
        return {
            "format": "TFLite",
            "schema_version": int(model.version),
            "inputs": [tensor_description(model, int(i)) for i in graph.inputs],
            "outputs": [tensor_description(model, int(i)) for i in graph.outputs],
            "ops": report.pop("ops"),
            "graph": report,
            "size_bytes": len(content),
            "int8_weight_tensors": int8_weights,
            "activation_quantization": [{"tensor": a["name"], "scale": a["scale"], "zero_point": a["zero_point"]}
                                        for a in activations if "scale" in a],
            "metadata": read_metadata(content),
            "tflite_support_metadata": tflite_metadata.read_summary(content),
        }


def _outputs_run(interpreter: Any) -> OutputsRunner:
    (input_detail,) = interpreter.get_input_details()
    fetches = interpreter.get_output_details()  # the subgraph's outputs, in the model's order
    encode = tensor_encoder(input_detail)
    decoders = [tensor_decoder(detail) for detail in fetches]

    def run(batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = np.asarray(batch, dtype=np.float32)
        images = np.transpose(batch, (0, 2, 3, 1)) if batch.ndim == 4 else batch
        outputs: list[list[np.ndarray]] = [[] for _ in fetches]
        for image in images:
            interpreter.set_tensor(input_detail["index"], encode(image[None]))
            interpreter.invoke()
            for collected, detail, decode in zip(outputs, fetches, decoders):
                collected.append(decode(interpreter.get_tensor(detail["index"])))
        found = {}
        for detail, collected in zip(fetches, outputs):
            out = np.concatenate(collected)
            found[detail["name"]] = np.transpose(out, (0, 3, 1, 2)) if out.ndim == 4 else out
        return found

    return run


def _io_description(builder: Any, name: str) -> dict[str, Any]:
    tensor = builder.tensors[builder.tensor_index[name]]
    described: dict[str, Any] = {"name": name, "dtype": builder.dtype(name).name,
                                 "shape": [int(d) for d in tensor.shape]}
    if tensor.quantization is not None:
        described["scale"] = float(tensor.quantization.scale[0])
        described["zero_point"] = int(tensor.quantization.zeroPoint[0])
    return described


def load_interpreter(path: Path | str, threads: int = 1, kernels: Kernels = Kernels.xnnpack) -> Any:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from mdeploy.converters.base import capture_stderr

    resolver = {
        Kernels.xnnpack: OpResolverType.AUTO,
        Kernels.builtin: OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        Kernels.reference: OpResolverType.BUILTIN_REF,
    }[kernels]

    def load() -> Any:
        interpreter = Interpreter(model_path=str(path), num_threads=threads, experimental_op_resolver_type=resolver)
        interpreter.allocate_tensors()
        return interpreter

    interpreter, _ = capture_stderr(load)  # drops "INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
    return interpreter
