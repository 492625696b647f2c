"""Core ML target: ML programs (.mlpackage) written from the IR with coremltools' MIL Builder.

- fp32 artifact: an fp32 ML program (``compute_precision`` FLOAT32), so that it matches PyTorch like the other
  targets' fp32 files; ``CoremlConverter(compute_precision="fp16")`` writes the fp16 program iOS apps usually
  ship (the Neural Engine computes in fp16).
- int8 artifact: W8A8 from our QuantizedGraph (see ``converters/coreml_program.py``), fp16 between the int8
  tensors by default (what the Neural Engine runs; coremltools' own W8A8 requires fp16), fp32 on request;
  ``activations=False`` writes weight-only int8 (W8) instead.
- I/O: a tensor input preprocessed as for PyTorch (default), or ``image_input=True``: an ``ImageType`` taking the
  camera buffer's 0..255 pixels, its scale and per-channel bias derived from the preprocessing (a per-channel std
  is folded into the program, see ``ImageNormalization``). With labels whose count matches the classes, a
  classifier (``classLabel`` and ``classLabel_probs``, the scores being the model's outputs, i.e. logits unless
  the model ends in softmax).
- Metadata: author, licence, description and version in the model's fields; ``mdeploy.preprocess``,
  ``mdeploy.labels`` and the export choices in its user-defined metadata.
- Runner: Core ML itself on macOS (compute units selectable); elsewhere the NumPy MIL reference executor
  (``converters/coreml_mil_reference.py``), named "MIL reference (not Core ML)".
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import platform
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from enum import Enum
from typing import Any, TypeVar

import numpy as np

from mdeploy.converters.base import (
    ArtifactInfo, BundleRunner, CliOption, Converter, ConverterBase, Precision, Runner, Target,
)
from mdeploy.converters.base import AppReadme, ReadmeParts
from mdeploy.converters.coreml_readme import ios_readme
from mdeploy.converters.coreml_fp16 import fp16_fallback_reason
from mdeploy.converters.coreml_mil_reference import RUNTIME_NAME, MilExecutor, load_program, package_items
from mdeploy.converters.coreml_program import OUTPUT_NAME, ImageNormalization, ProgramOptions, build_program, import_coremltools
from mdeploy.errors import BadInputError
from mdeploy.manifest import GoldenTolerance
from mdeploy.converters.base import ONE_OUTPUT_STAGE
from mdeploy.graph.ir import Graph, only_output
from mdeploy.metrics import is_class_scores
from mdeploy.types import OutputsRunner
from mdeploy.manifest import Manifest
from mdeploy.quantize.params import QuantizedGraph

SPEC_VERSION_TARGET = {6: "iOS15", 7: "iOS16", 8: "iOS17", 9: "iOS18"}


class DeploymentTarget(str, Enum):
    """Minimum iOS version of an ML program (W8A8 needs iOS17: quantize/dequantize ops)."""

    iOS15 = "iOS15"
    iOS16 = "iOS16"
    iOS17 = "iOS17"
    iOS18 = "iOS18"


class ComputePrecision(str, Enum):
    fp16 = "fp16"
    fp32 = "fp32"


class InputKind(str, Enum):
    tensor = "tensor"  # a preprocessed NCHW float32 tensor, as for PyTorch
    image = "image"  # an ImageType taking 0..255 pixels, normalisation inside the model


class ComputeUnits(str, Enum):
    ALL = "ALL"
    CPU_ONLY = "CPU_ONLY"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"


E = TypeVar("E", bound=Enum)


def _choice(kind: type[E], value: object, what: str) -> E:
    try:
        return kind(value)
    except ValueError:
        raise BadInputError(f"Core ML {what} must be one of {', '.join(m.value for m in kind)}, "
                            f"got {value!r}") from None


PACKAGE_NAMESPACE = uuid.UUID("6f1c6a47-5c1e-4a8e-9a57-0d3c3b0d5e11")  # mdeploy's, for package item identifiers


def make_reproducible(package: Path) -> None:
    """The same model saved twice gives the same bytes: coremltools names package items with random UUIDs and
    serialises protobuf maps (the metadata) in arbitrary order. Identifiers become UUIDs derived from each item's
    path (any UUID is valid to Core ML) and the specification is re-serialised deterministically."""
    from coremltools.proto import Model_pb2

    manifest_path = package / "Manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    renamed = {old: str(uuid.uuid5(PACKAGE_NAMESPACE, item["path"])) for old, item in manifest["itemInfoEntries"].items()}
    manifest["itemInfoEntries"] = {renamed[old]: item for old, item in sorted(manifest["itemInfoEntries"].items(),
                                                                              key=lambda kv: kv[1]["path"])}
    manifest["rootModelIdentifier"] = renamed[manifest["rootModelIdentifier"]]
    manifest_path.write_text(json.dumps(manifest, indent=4, sort_keys=True) + "\n", encoding="utf-8")
    for item in manifest["itemInfoEntries"].values():
        spec_path = package / "Data" / item["path"]
        if spec_path.is_file() and spec_path.suffix == ".mlmodel":
            spec = Model_pb2.Model()
            spec.ParseFromString(spec_path.read_bytes())
            spec_path.write_bytes(spec.SerializeToString(deterministic=True))


def core_ml_available() -> bool:
    """True where Core ML itself can run predictions (macOS with coremltools' native extension)."""
    if platform.system() != "Darwin":
        return False
    try:
        return importlib.util.find_spec("coremltools.libcoremlpython") is not None
    except ImportError:
        return False


def _package_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


class CoremlConverter(ConverterBase):
    target = Target.coreml
    suffix = ".mlpackage"
    requires = ("coremltools",)
    packages = ("coremltools",)
    arm_unavailable = "Core ML runs only on Apple platforms; Linux runs it on mdeploy's MIL reference executor"
    taps_unavailable = ("not implemented for Core ML's runtimes; diagnose the ONNX or TFLite artifact of the same model, "
                        "which carries the same int8 parameters")

    def __init__(self, compute_precision: ComputePrecision | str | None = None,
                 minimum_target: DeploymentTarget | str = DeploymentTarget.iOS17, image_input: bool = False,
                 classifier: bool | None = None, activations: bool = True,
                 compute_units: ComputeUnits | str = ComputeUnits.ALL, use_core_ml: bool | None = None,
                 author: str = "", license: str = "", description: str = "") -> None:  # noqa: A002
        # None: fp32 for the fp32 artifact (parity with PyTorch), fp16 for int8 (what the Neural Engine runs)
        self.compute_precision = _choice(ComputePrecision, compute_precision, "compute precision").value \
            if compute_precision is not None else None
        self.minimum_target = _choice(DeploymentTarget, minimum_target, "minimum deployment target").value
        self.image_input = image_input
        self.classifier = classifier  # None: a classifier when labels are given and match the classes
        self.activations = activations
        self.compute_units = _choice(ComputeUnits, str(getattr(compute_units, "value", compute_units)).upper(),
                                     "compute units").value
        self._use_core_ml = use_core_ml  # None: Core ML where it runs (macOS), else the MIL reference
        self.fields = {"author": author, "license": license, "description": description}
        self.fp16_fallback: str | None = None  # why the last int8 program computes in fp32 by default (coreml_fp16)

    def golden_tolerance(self, precision: Precision, output_scale: float | None) -> GoldenTolerance:
        # Recorded on the MIL reference; Core ML on a device computes in its own fp16/fp32 order.
        return GoldenTolerance(min_snr_db=30.0 if precision == Precision.int8 else 60.0,
                               note="outputs of the MIL reference executor: compare Core ML on a device by SNR, "
                                    "not exactly")

    def cli_options(self) -> tuple[CliOption, ...]:
        return (
            CliOption("coreml_precision", ComputePrecision | None, None,
                      "Core ML compute precision [default: fp32 for fp32, fp16 for int8]"),
            CliOption("coreml_input", InputKind, InputKind.tensor,
                      "Core ML input: a preprocessed tensor, or an image (normalisation inside)"),
            CliOption("coreml_target", DeploymentTarget, DeploymentTarget.iOS17,
                      "Core ML minimum deployment target (W8A8 needs iOS17)"),
            CliOption("coreml_compute_units", ComputeUnits, ComputeUnits.ALL,
                      "Core ML compute units for parity runs on macOS (elsewhere the MIL reference runs)"),
            CliOption("coreml_weights_only", bool, False,
                      "int8 Core ML: int8 weights only (W8), activations stay float"),
        )

    def configured(self, values: Mapping[str, Any], int8: bool) -> Converter:
        minimum = DeploymentTarget(values["coreml_target"])
        weights_only = bool(values["coreml_weights_only"])
        if int8 and not weights_only and list(DeploymentTarget).index(minimum) < list(DeploymentTarget).index(
                DeploymentTarget.iOS17):
            raise BadInputError(f"int8 Core ML (W8A8) needs --coreml-target iOS17 or later, not {minimum.value}: "
                                "raise the target or pass --coreml-weights-only")
        return CoremlConverter(compute_precision=values["coreml_precision"], minimum_target=minimum,
                               image_input=InputKind(values["coreml_input"]) is InputKind.image,
                               activations=not weights_only, compute_units=values["coreml_compute_units"])

    @property
    def use_core_ml(self) -> bool:
        if self._use_core_ml is None:
            self._use_core_ml = core_ml_available()
        return self._use_core_ml

    @property
    def times_latency(self) -> bool:
        return self.use_core_ml  # the MIL reference executor's timings say nothing about a device

    @property
    def runtime_name(self) -> str:
        return f"Core ML (compute units {self.compute_units})" if self.use_core_ml else RUNTIME_NAME

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
        return ios_readme(manifest, parts)  # README_ios.md: Swift, with Vision for an image input

    # -- export ------------------------------------------------------------------------------------------------
    def settings(self, precision: Precision) -> dict[str, Any]:
        int8 = precision is Precision.int8
        chosen: dict[str, Any] = {
            "compute_precision": self.compute_precision_for(int8),
            "minimum_deployment_target": self.minimum_target,
            "input": InputKind.image.value if self.image_input else InputKind.tensor.value,
            "classifier": "when labels match the classes" if self.classifier is None else self.classifier,
        }
        if int8:
            chosen["int8"] = "W8A8" if self.activations else "W8 (weights only)"
        if int8 and self.fp16_fallback is not None:
            chosen["compute_precision"] = "fp32"
            chosen["compute_precision_reason"] = self.fp16_fallback
        return chosen

    def compute_precision_for(self, int8: bool) -> str:
        return self.compute_precision or ("fp16" if int8 else "fp32")

    def convert(self, graph: Graph, quantized: QuantizedGraph | None, info: ArtifactInfo) -> Any:
        """The ``MLModel`` (not yet saved)."""
        ct = import_coremltools()
        target = getattr(ct.target, self.minimum_target)
        if quantized is not None and self.activations and target < ct.target.iOS17:
            raise BadInputError(f"W8A8 Core ML programs need iOS17 or later (quantize/dequantize ops), "
                                f"not {self.minimum_target}: use minimum_target='iOS17' or later, or weight-only int8 "
                                f"(activations=False)")
        image = ImageNormalization.from_preprocess(info.preprocess) if self.image_input else None
        program = build_program(graph, quantized, ProgramOptions(target, image, self.activations))
        shape = tuple(int(d) for d in graph.input_shape)
        if image is None:
            inputs = [ct.TensorType(name=graph.input_name, shape=shape)]
        else:
            inputs = [ct.ImageType(name=graph.input_name, shape=shape, scale=image.image_scale,
                                   bias=list(image.bias), color_layout=getattr(ct.colorlayout, image.color_layout))]
        classifier = False
        if len(graph.outputs) == 1 or self.classifier:  # a Core ML classifier has one class-score output (N, K)
            shape = graph.shapes.get(graph.single_output("a Core ML classifier", info.model_name), (1, 0))
            if is_class_scores(shape) or self.classifier:
                classifier = self._classifier(info.labels, shape[-1] if len(shape) == 2 else 0)
        precision = self.compute_precision_for(quantized is not None)
        if quantized is not None and self.compute_precision is None:  # the default: fp16 unless it cannot hold it
            self.fp16_fallback = fp16_fallback_reason(quantized)
            precision = "fp32" if self.fp16_fallback is not None else precision
        with contextlib.redirect_stderr(io.StringIO()):  # coremltools' pass progress bars
            model = ct.convert(
                program, convert_to="mlprogram", minimum_deployment_target=target, inputs=inputs,
                classifier_config=ct.ClassifierConfig(list(info.labels)) if classifier else None,
                compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32,
                skip_model_load=True,
            )
        self._describe(model, graph, quantized, info, image, classifier, precision)
        return model

    def _classifier(self, labels: tuple[str, ...], classes: int) -> bool:
        if self.classifier is False or not labels:
            if self.classifier:
                raise BadInputError("a Core ML classifier needs class labels (--labels labels.txt)")
            return False
        if len(labels) != classes:
            if self.classifier:
                raise BadInputError(f"{len(labels)} labels for a model with {classes} outputs: a Core ML "
                                    f"classifier needs one label per output")
            warnings.warn(f"{len(labels)} labels for {classes} outputs: the Core ML model outputs raw scores "
                          f"instead of a classifier", stacklevel=3)
            return False
        return True

    def _describe(self, model: Any, graph: Graph, quantized: QuantizedGraph | None, info: ArtifactInfo,
                  image: ImageNormalization | None, classifier: bool, precision: str) -> None:
        extra = dict(info.extra)
        fields = {key: value or extra.pop(key, "") for key, value in self.fields.items()}
        model.author = fields["author"] or "mdeploy"
        model.license = fields["license"]
        kind = "int8 W8A8" if quantized is not None and self.activations else "int8 W8" if quantized else "float"
        model.short_description = fields["description"] or f"{info.model_name} ({kind}, {precision} compute)"
        model.version = extra.pop("version", "") or info.producer_version
        io_description = {"kind": "image", **image.__dict__} if image is not None else {"kind": "tensor"}
        metadata = {
            "mdeploy.preprocess": json.dumps(info.preprocess, sort_keys=True),
            "mdeploy.labels": json.dumps(list(info.labels)),
            "mdeploy.precision": "int8" if quantized is not None else "fp32",
            "mdeploy.compute_precision": precision,
            "mdeploy.int8": kind,
            "mdeploy.input": json.dumps(io_description, sort_keys=True),
            "mdeploy.classifier": json.dumps(classifier),
            "mdeploy.producer_version": info.producer_version,
            **extra,
        }
        model.user_defined_metadata.update(metadata)
        model.input_description[graph.input_name] = (
            "RGB/BGR image, 0..255 pixels (normalisation inside the model)" if image is not None
            else "image batch preprocessed as mdeploy.preprocess describes (NCHW float32)")
        if classifier:
            model.output_description["classLabel"] = "most likely class"
            model.output_description["classLabel_probs"] = "score of every class (the model's outputs)"
        elif len(graph.outputs) == 1:
            model.output_description[OUTPUT_NAME] = "scores of every class (the model's outputs)"
        else:
            for i, name in enumerate(graph.artifact_names.values()):
                model.output_description[name] = f"output {i} of the model, in the order its forward() returns"

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        model = self.convert(graph, quantized, info)
        path = Path(path)
        if path.is_dir() and path.suffix == self.suffix:
            shutil.rmtree(path)  # an .mlpackage is a directory: replace it as a file would be replaced
        model.save(str(path))
        make_reproducible(path)

    # -- run ---------------------------------------------------------------------------------------------------
    def runner(self, path: Path, threads: int = 1) -> Runner:
        """Runs (N, C, H, W) float32 batches preprocessed as for PyTorch, one image at a time (the programs have
        batch 1), and returns (N, classes) float32 scores. An image-input model gets the (unrounded) pixel values
        that preprocess into the batch; Core ML itself needs 8-bit images, so there the pixels are rounded.
        ``threads`` is not used: Core ML picks its own, and the reference runs NumPy as configured."""
        if self.use_core_ml:
            return self._core_ml_runner(Path(path))
        spec, program = load_program(Path(path))
        executor = MilExecutor.from_program(program)
        image = self._image_input(spec)
        input_name = executor.input_names[0]
        scores = executor.classifier_scores() or only_output(executor.output_names, ONE_OUTPUT_STAGE, Path(path).name)

        def run(batch: np.ndarray) -> np.ndarray:
            batch = np.asarray(batch, dtype=np.float32)
            feeds = image.pixels(batch) if image is not None else batch
            outs = [executor.run({input_name: feeds[i : i + 1]}, keep={scores})[scores] for i in range(len(batch))]
            return _batched(np.concatenate(outs).astype(np.float32), len(batch))

        return run

    def outputs_runner(self, path: Path, threads: int = 1) -> OutputsRunner:
        """As :meth:`runner`, every output of the program by name, in the model's order (a classifier's one output
        is its scores, under the one-output name)."""
        if self.use_core_ml:
            return self._core_ml_outputs_runner(Path(path))
        spec, program = load_program(Path(path))
        executor = MilExecutor.from_program(program)
        if executor.classifier_scores():
            one = self.runner(path, threads)
            return lambda batch: {OUTPUT_NAME: one(batch)}
        image = self._image_input(spec)
        input_name, names = executor.input_names[0], executor.output_names

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            batch = np.asarray(batch, dtype=np.float32)
            feeds = image.pixels(batch) if image is not None else batch
            outs = [executor.run({input_name: feeds[i : i + 1]}) for i in range(len(batch))]
            return {name: _batched(np.concatenate([o[name] for o in outs]).astype(np.float32), len(batch))
                    for name in names}

        return run

    @staticmethod
    def _image_input(spec: Any) -> ImageNormalization | None:
        if spec.description.input[0].type.WhichOneof("Type") != "imageType":
            return None
        described = json.loads(spec.description.metadata.userDefined.get("mdeploy.input", "{}"))
        if described.get("kind") != "image":
            raise BadInputError("this Core ML model takes images but was not written by mdeploy: its normalisation "
                                "is unknown, so a preprocessed batch cannot be turned back into pixels")
        return ImageNormalization(described["image_scale"], tuple(described["bias"]), tuple(described["gain"]),
                                  described["color_layout"])

    def _core_ml_runner(self, path: Path) -> Runner:  # pragma: no cover - macOS only
        ct = import_coremltools()
        from PIL import Image

        package_items(path)  # Core ML follows Manifest.json's item paths: they must stay inside the package
        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        spec = model.get_spec()
        image = self._image_input(spec)
        input_name = spec.description.input[0].name
        classifier = spec.description.predictedProbabilitiesName
        labels = json.loads(spec.description.metadata.userDefined.get("mdeploy.labels", "[]"))
        output = classifier or only_output([o.name for o in spec.description.output], ONE_OUTPUT_STAGE, path.name)

        def one(x: np.ndarray) -> np.ndarray:
            if image is None:
                feed: Any = x
            else:
                pixels = np.clip(np.round(image.pixels(x)[0]), 0, 255).astype(np.uint8).transpose(1, 2, 0)
                feed = Image.fromarray(pixels[..., ::-1] if image.color_layout == "BGR" else pixels)
            out = model.predict({input_name: feed})
            if classifier:
                return np.array([out[classifier][label] for label in labels], np.float32)
            return np.asarray(out[output], np.float32).reshape(-1)

        return lambda batch: np.stack([one(np.asarray(batch, np.float32)[i : i + 1]) for i in range(len(batch))])

    def _core_ml_outputs_runner(self, path: Path) -> OutputsRunner:  # pragma: no cover - macOS only
        ct = import_coremltools()
        spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
        if spec.description.predictedProbabilitiesName or len(spec.description.output) == 1:
            one = self._core_ml_runner(path)
            return lambda batch: {OUTPUT_NAME: one(batch)}
        if self._image_input(spec) is not None:
            raise BadInputError(f"{path.name}: image input with several outputs is not run here yet (issue 15)")
        package_items(path)
        model = ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, self.compute_units))
        input_name, names = spec.description.input[0].name, [o.name for o in spec.description.output]

        def run(batch: np.ndarray) -> dict[str, np.ndarray]:
            outs = [model.predict({input_name: np.asarray(batch, np.float32)[i : i + 1]}) for i in range(len(batch))]
            return {name: np.concatenate([np.asarray(o[name], np.float32) for o in outs]) for name in names}

        return run

    # -- inspect -----------------------------------------------------------------------------------------------
    def bundle_runner(self) -> BundleRunner:
        return BundleRunner("Core ML", None, why_not="runs on Apple platforms only")

    def inspect(self, path: Path) -> dict[str, Any]:
        from mdeploy.converters.coreml_inspect import describe_program

        spec, program = load_program(Path(path))
        metadata = dict(spec.description.metadata.userDefined)
        report = {
            "format": "Core ML ML program (.mlpackage)",
            "specification_version": spec.specificationVersion,
            "minimum_deployment_target": SPEC_VERSION_TARGET.get(spec.specificationVersion, "unknown"),
            "size_bytes": _package_size(Path(path)),
            "author": spec.description.metadata.author,
            "license": spec.description.metadata.license,
            "description": spec.description.metadata.shortDescription,
            "version": spec.description.metadata.versionString,
            "metadata": metadata,
        }
        report.update(describe_program(spec, program))
        return report


def _batched(out: np.ndarray, count: int) -> np.ndarray:
    """Outputs of ``count`` images stacked on the batch axis; a classifier's per-image score vectors become rows."""
    return out if out.ndim >= 2 and out.shape[0] == count else out.reshape(count, -1)
