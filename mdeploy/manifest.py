"""The typed manifest.json of an output folder: one dataclass tree, one read/write pair.

Every object of ``mdeploy/data/manifest.schema.json`` is a dataclass here, its properties are the fields in the order
the file lists them (tests/test_manifest.py walks both and checks they agree, and that a written manifest validates).
``to_dict`` gives the JSON object as written; :meth:`Manifest.read` checks the structure and names the file and the
field on bad input. The parts that are free-form per target (artifact ``settings``, ``io`` tensors, the quantisation
``recipe``, the ``ops`` histogram, ``reproducibility``) stay ``dict[str, Any]``.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

from mdeploy.errors import BadInputError

MANIFEST_FILE = "manifest.json"
SCHEMA_FILE = "manifest.schema.json"
MANIFEST_VERSION = "1.5"  # manifest.schema.json's version; bump both together

R = TypeVar("R", bound="Record")


def optional(default: Any = None) -> Any:
    """A property the schema does not require: left out of the file when None."""
    return field(default=default, metadata={"omit_none": True})


def _json(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _json(v) for k, v in value.items()}
    return value


class Record:
    """A JSON object of the manifest: fields in file order; ``KEYS`` maps a field to a key that is no identifier."""

    KEYS: ClassVar[dict[str, str]] = {}

    @classmethod
    def key(cls, name: str) -> str:
        return cls.KEYS.get(name, name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if value is None and f.metadata.get("omit_none"):
                continue
            out[self.key(f.name)] = _json(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str = "") -> R:
        if not isinstance(data, dict):
            raise _Invalid(where or "(top level)", "an object", data)
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields(cls):  # type: ignore[arg-type]
            key = cls.key(f.name)
            at = f"{where}.{key}" if where else key
            if key not in data:
                if f.metadata.get("omit_none"):
                    values[f.name] = None
                    continue
                raise _Invalid(at, "present", _ABSENT)
            values[f.name] = _parse(hints[f.name], data[key], at)
        return cls(**values)


_ABSENT = object()


class _Invalid(Exception):
    def __init__(self, where: str, expected: str, got: Any) -> None:
        shown = "missing" if got is _ABSENT else f"{type(got).__name__} {json.dumps(got)[:40]}" if _dumpable(got) \
            else type(got).__name__
        super().__init__(f"field {where} is {shown}, expected {expected}")


def _dumpable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


_SIMPLE = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _parse(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(option, value, where)
            except _Invalid as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else _Invalid(where, " or ".join(_describe(o) for o in options), value)
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_dict(value, where)
    if origin is list:
        if not isinstance(value, list):
            raise _Invalid(where, "a list", value)
        (item,) = typing.get_args(hint)
        return [_parse(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(where, "an object", value)
        _, item = typing.get_args(hint)
        return {k: _parse(item, v, f"{where}.{k}") for k, v in value.items()}
    if hint in _SIMPLE:
        ok = isinstance(value, hint) and not (hint is not bool and isinstance(value, bool))
        if hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise _Invalid(where, _SIMPLE[hint], value)
        return value
    raise TypeError(f"no parser for {hint}")


def _describe(hint: Any) -> str:
    return _SIMPLE.get(hint, "an object" if isinstance(hint, type) and issubclass(hint, Record) else str(hint))


# -- the tree, in the order of manifest.schema.json ------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo(Record):
    name: str
    source_file: str
    source_sha256: str
    format: str
    arch: str | None
    width_mult: float | None
    num_classes: int
    ops: dict[str, Any]


@dataclass(frozen=True)
class InputSpec(Record):
    name: str
    shape: list[int]
    dtype: str
    layout: str


@dataclass(frozen=True)
class OutputSpec(Record):
    name: str
    shape: list[int]
    meaning: str


@dataclass(frozen=True)
class PreprocessRecord(Record):
    """mdeploy.calibration.preprocess.Preprocess's ``to_dict`` form (``Preprocess.from_dict(p.to_dict())``)."""

    resize: int | None
    crop: int
    interpolation: str
    mean: list[float]
    std: list[float]
    scale: float
    channel_order: str
    layout: str


@dataclass(frozen=True)
class SkippedFile(Record):
    file: str
    reason: str


@dataclass(frozen=True)
class SampleSetRecord(Record):
    samples: int
    sha256: str
    files_seen: int
    skipped: list[SkippedFile]
    small_images: int | None = optional()


@dataclass(frozen=True)
class FloatLayerRecord(Record):
    """One tensor grid the mixed-precision search removed: the layers around it compute in float (1.5)."""

    tensor: str
    source: str  # the user's module that makes the tensor
    nodes: list[str]  # the IR layers this choice moved to float
    noise_share: float  # of the full-int8 model's estimated output noise, the part this choice removed


@dataclass(frozen=True)
class MixedPrecisionRecord(Record):
    """``convert --target-snr`` (1.5): the layers kept in float to reach the target, and the SNR measured on the
    calibration samples before and after (fake-quantised simulation)."""

    target_snr_db: float
    samples: int
    int8_snr_db: Metric
    snr_db: Metric
    reached: bool
    float_macs_share: float
    ceiling_db: Metric  # estimated with every layer in float: what the grids that must stay allow
    layers: list[FloatLayerRecord]


@dataclass(frozen=True)
class QuantizationInfo(Record):
    recipe: dict[str, Any]
    float_nodes: list[str]
    calibration_set: SampleSetRecord | None
    channel_scales_file: str | None
    mixed_precision: MixedPrecisionRecord | None = optional()  # convert --target-snr (1.5)


@dataclass(frozen=True)
class EvaluationInfo(Record):
    inputs: str
    set: SampleSetRecord | None


@dataclass(frozen=True)
class ArtifactIO(Record):
    inputs: list[dict[str, Any]]  # per tensor: name, dtype, shape, and for quantised I/O scale and zero_point
    outputs: list[dict[str, Any]]


Metric = Union[float, str]  # a number; non-finite values are spelled out ("inf", "nan")


@dataclass(frozen=True)
class ParityMetricsRecord(Record):
    samples: int
    max_abs_error: Metric
    mean_abs_error: Metric
    cosine: Metric
    snr_db: Metric
    top1_agreement: Metric | None = optional()  # class scores only (1.3: absent for a dense output)
    top5_agreement: Metric | None = optional()
    pixel_agreement: Metric | None = optional()  # a dense map of several channels: arg-max over them, per pixel (1.3)
    mean_iou: Metric | None = optional()  # the same maps: mean IoU of the arg-max masks over PyTorch's classes (1.3)


@dataclass(frozen=True)
class DetectionParityRecord(Record):
    """A detector's outputs decoded with its anchors, against PyTorch's (1.4, ``convert --detector``)."""

    top_k: int
    topk_agreement: Metric  # of PyTorch's top-k (anchor, class) pairs by score, the mean fraction in the artifact's
    box_error_px_mean: Metric  # max |corner difference| of the decoded boxes of those pairs' anchors, input pixels
    box_error_px_max: Metric
    score_max_abs_error: Metric  # after the score function, on those pairs


@dataclass(frozen=True)
class OutputParityRecord(Record):
    """One output's parity, in a model of several (1.3)."""

    output: str  # the artifact's name for it (the manifest's ``outputs``)
    passed: bool
    metrics: ParityMetricsRecord
    thresholds: dict[str, float]  # the limits applied to this output, absolute
    failures: list[str]
    threshold_notes: dict[str, str] | None = optional()


@dataclass(frozen=True)
class ParityRecord(Record):
    passed: bool
    inputs: str
    metrics: ParityMetricsRecord
    thresholds: dict[str, float]  # the limits applied, absolute
    failures: list[str]
    threshold_notes: dict[str, str] | None = optional()  # how a limit was derived, keyed like thresholds (1.2)
    outputs: list[OutputParityRecord] | None = optional()  # per output, when the model has several (1.3)
    detection: DetectionParityRecord | None = optional()  # a detector's decoded boxes and scores (1.4)


@dataclass(frozen=True)
class LatencyRecord(Record):
    runs: int | None = optional()
    threads: int | None = optional()
    p50_ms: float | None = optional()
    p90_ms: float | None = optional()
    p99_ms: float | None = optional()
    mean_ms: float | None = optional()


@dataclass(frozen=True)
class ArtifactRecord(Record):
    target: str
    precision: str
    file: str
    runtime: str
    settings: dict[str, Any]
    io: ArtifactIO
    parity: ParityRecord
    latency: LatencyRecord | None
    seconds_to_export: float
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Failure(Record):
    """A target that failed to convert (only with --keep-going)."""

    target: str
    precision: str
    error: str


@dataclass(frozen=True)
class GoldenArray(Record):
    npy: str
    f32: str
    shape: list[int]
    dtype: str
    byte_order: str


@dataclass(frozen=True)
class GoldenInputs(GoldenArray):
    layout: str | None = optional()


@dataclass(frozen=True)
class GoldenTolerance(Record):
    max_abs_error: float | None = optional()
    min_snr_db: float | None = optional()
    note: str | None = optional()


@dataclass(frozen=True)
class GoldenArtifact(GoldenArray):
    runtime: str
    tolerance: GoldenTolerance
    # A model of several outputs has one record per artifact and output, keyed "<artifact>:<output>" (1.3).
    artifact: str | None = optional()
    output: str | None = optional()


@dataclass(frozen=True)
class Golden(Record):
    samples: int
    images: list[str | None]
    inputs: GoldenInputs
    pytorch_outputs: GoldenArray  # the first output's, when the model has several
    artifacts: dict[str, GoldenArtifact]
    pytorch_by_output: dict[str, GoldenArray] | None = optional()  # every output's, when it has several (1.3)


@dataclass(frozen=True)
class PostprocessRecord(Record):
    """The fp32 TFLite with TFLite_Detection_PostProcess appended (1.4, a spec's ``[postprocess] tflite = true``)."""

    file: str
    op: str
    outputs: list[str]  # boxes (1, D, 4) ymin, xmin, ymax, xmax normalised; classes; scores; count
    object_detector_metadata: bool  # TFLite Support metadata as the Task Library's ObjectDetector needs it
    max_detections: int
    score_threshold: float
    iou_threshold: float
    nms: str
    check: dict[str, Any]  # its detections against NumPy decoding + NMS of the fp32 TFLite's raw outputs


@dataclass(frozen=True)
class DetectionRecord(Record):
    """What ``convert --detector`` said about the detector's outputs, and how an app decodes them (1.4)."""

    boxes_output: str  # box regression (N, A, 4)
    scores_output: str  # class logits (N, A, K)
    anchors_file: str  # (A, 4) float32 .npy in the bundle
    anchors: int
    anchor_format: str
    box_order: list[str]  # the regression's four numbers per anchor, e.g. ["dx", "dy", "dw", "dh"]
    box_scales: list[float]  # the box coder's scales, in box_order
    score_function: str  # "softmax" or "sigmoid"
    background_class: int | None
    classes: int  # K, background included
    decoding: str  # the formula, in words
    top_k: int  # k of the parity metrics
    limits: dict[str, dict[str, float]]  # per precision; empty: reported only
    postprocess: PostprocessRecord | None = optional()


@dataclass(frozen=True)
class Bundle(Record):
    readmes: list[str]
    files: list[str]
    checksums: str


@dataclass(frozen=True)
class Manifest(Record):
    KEYS: ClassVar[dict[str, str]] = {"schema": "$schema"}

    schema: str
    manifest_version: str
    model: ModelInfo
    input: InputSpec
    output: OutputSpec
    preprocess: PreprocessRecord
    labels_file: str | None
    quantization: QuantizationInfo | None
    evaluation: EvaluationInfo
    artifacts: list[ArtifactRecord]
    failures: list[Failure]
    parity_passed: bool
    golden: Golden
    reproducibility: dict[str, Any]
    seconds: dict[str, float]  # wall time per pipeline stage
    tool_versions: dict[str, str]
    bundle: Bundle | None = optional()  # None only while the bundle is being written (and in folders from before)
    # Every output in the model's order (1.3); ``output`` is the first of them, as in manifests before 1.3.
    outputs: list[OutputSpec] | None = optional()
    detection: DetectionRecord | None = optional()  # convert --detector (1.4)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def write(self, folder: Path) -> Path:
        path = folder / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    def with_bundle(self, bundle: Bundle) -> Manifest:
        return replace(self, bundle=bundle)

    @classmethod
    def read(cls, path: Path) -> Manifest:
        """The manifest at ``path``; a BadInputError (one line, naming the file and the field) when it is not one."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadInputError(f"{path} is not a valid mdeploy manifest ({err}): convert again") from None
        try:
            return cls.from_dict(data)
        except _Invalid as err:
            raise BadInputError(f"{path} is not a valid mdeploy manifest ({err}): convert again") from None

    def artifact(self, target: str, precision: str) -> ArtifactRecord | None:
        return next((a for a in self.artifacts if a.target == target and a.precision == precision), None)


assert all(is_dataclass(c) for c in Record.__subclasses__())
