"""TFLite Support model metadata: what Android Studio's ML binding, the TFLite Support Library's
MetadataExtractor, the Task Library's ImageClassifier and ``tflite_support``'s MetadataDisplayer read.

The standard layout (what ``tflite_support.metadata.MetadataPopulator`` writes):

- a ``ModelMetadata`` flatbuffer (schema ``metadata_schema.fbs`` of tflite-support, file identifier ``M001``) in a
  model buffer named by the ``Model.metadata`` entry ``TFLITE_METADATA``;
- the associated files (here ``labels.txt``) packed as a zip archive appended after the model flatbuffer. LiteRT
  ignores the bytes after the flatbuffer; zip readers find the archive from its end.

The flatbuffer is written here with ``flatbuffers.Builder``, one small function per table, using the field slots
(declaration order) of ``metadata_schema.fbs``, so exporting needs no tflite-support. Content follows tflite-support's
``metadata_writers.image_classifier``: input ``image`` (ImageProperties + NormalizationOptions + Stats), output with
FeatureProperties and a TENSOR_AXIS_LABELS file. Our output is raw logits, so it is named ``logits`` and said so.

Normalisation (``NormalizationOptions``), mapped from ``calibration.preprocess.Preprocess``: mdeploy's model input is
``x = (pixel * scale - mean) / std`` per channel (pixel in 0..255, ``scale`` 1/255 by default, mean and std in
0..1 units, in ``channel_order``). The Task Library and the Support Library's NormalizeOp compute
``(pixel - MEAN) / STD`` on 0..255 pixels. Both are equal for ``MEAN = mean / scale`` and ``STD = std / scale``
(ImageNet: MEAN = (123.675, 116.28, 103.53), STD = (58.395, 57.12, 57.375)); values per tensor channel, so a BGR
model's first value is blue's (its color space is then written UNKNOWN: the schema has no BGR).

Quantised inputs. The schema's convention (its NormalizationOptions comment, and the codegen / ML binding
pipeline [ResizeOp, NormalizeOp, QuantizeOp] it documents for image inputs) is that a quantised model keeps its
float model's NormalizationOptions and the input tensor's own scale and zero point map the normalised float to the
integer tensor, so the same NormalizationOptions are written for float, uint8 and int8 inputs. The Task Library
behaves differently: it copies raw 0..255 pixels into a uint8 input with no normalisation (right only for models
whose input quantisation *is* the normalisation: not ours, whose mean and std differ per channel) and refuses int8
inputs ("kTfLiteInt8 input type is not implemented yet"). The input description says so, and which I/O type
(``IOType.float``: a float input quantised inside the graph) the Task Library can use.

``min_parser_version``: "the largest version number among the versions of all the fields populated" (schema).
tflite-support's ``GetMinimumMetadataParserVersion`` (``metadata/cc/metadata_version.cc``, what MetadataPopulator
writes) starts from 1.0.0 and raises it for the members the schema history lists as added later: VOCABULARY files
(1.0.1), subgraph input/output process units and tokenizer options (1.1.0), tensor groups (1.2.0),
RegexTokenizerOptions (1.2.1), AudioProperties (1.3.0); later ones are SCANN_INDEX_FILE (1.4.0),
AssociatedFile.version (1.4.1) and custom metadata (1.5.0). None of them is written here, so the version is 1.0.0
(the test checks it against the C++ function of tflite-support 0.4.4).
"""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import flatbuffers
import numpy as np
from flatbuffers import number_types
from flatbuffers.table import Table

from mdeploy.converters.base import ArtifactInfo
from mdeploy.errors import BadInputError
from mdeploy.types import OUTPUT_NAME

METADATA_NAME = "TFLITE_METADATA"  # MetadataPopulator.METADATA_FIELD_NAME
FILE_IDENTIFIER = b"M001"
MIN_PARSER_VERSION = "1.0.0"  # see the module docstring: only schema 1.0.0 members are written
LABELS_FILE = "labels.txt"
INPUT_NAME = "image"  # the input tensor's display name in the metadata (the tensor itself is mdeploy.types's)
ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can hold: no timestamp, byte-identical files
ZIP_PERMISSIONS = 0o644

# Enum and union values of metadata_schema.fbs.
COLOR_SPACES = {0: "UNKNOWN", 1: "RGB", 2: "GRAYSCALE"}
COLOR_SPACE_UNKNOWN, COLOR_SPACE_RGB = 0, 1
FILE_TYPES = {0: "UNKNOWN", 1: "DESCRIPTIONS", 2: "TENSOR_AXIS_LABELS", 3: "TENSOR_VALUE_LABELS",
              4: "TENSOR_AXIS_SCORE_CALIBRATION", 5: "VOCABULARY", 6: "SCANN_INDEX_FILE"}
TENSOR_AXIS_LABELS = 2
CONTENT_FEATURE, CONTENT_IMAGE = 1, 2  # union ContentProperties
PROCESS_NORMALIZATION = 1  # union ProcessUnitOptions

# Field slots (declaration order in metadata_schema.fbs; a union takes two: its type, then its value).
_ASSOCIATED_FILE = {"name": 0, "description": 1, "type": 2}  # 3 locale, 4 version (1.4.1): unused
_IMAGE_PROPERTIES = {"color_space": 0, "default_size": 1}
_IMAGE_SIZE = {"width": 0, "height": 1}
_CONTENT = {"content_properties_type": 0, "content_properties": 1}  # 2 range: unused
_NORMALIZATION = {"mean": 0, "std": 1}
_PROCESS_UNIT = {"options_type": 0, "options": 1}
_STATS = {"max": 0, "min": 1}
_TENSOR = {"name": 0, "description": 1, "content": 3, "process_units": 4, "stats": 5, "associated_files": 6}
_SUBGRAPH = {"input_tensor_metadata": 2, "output_tensor_metadata": 3}  # 5.. (1.1.0 and later): unused
_MODEL = {"name": 0, "description": 1, "version": 2, "subgraph_metadata": 3, "author": 4, "license": 5,
          "min_parser_version": 7}
_FIELD_COUNTS = {"AssociatedFile": 5, "ImageProperties": 2, "ImageSize": 2, "Content": 3, "FeatureProperties": 0,
                 "NormalizationOptions": 2, "ProcessUnit": 2, "Stats": 2, "TensorMetadata": 7,
                 "SubGraphMetadata": 10, "ModelMetadata": 8}

__all__ = ["LABELS_FILE", "METADATA_NAME", "Normalization", "build_metadata", "labels_file",
           "pack_associated_files", "read_summary"]


@dataclass(frozen=True)
class Normalization:
    """``(pixel - mean) / std`` per tensor channel on 0..255 pixels: the Task Library's and NormalizeOp's form."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_space: int  # COLOR_SPACE_RGB, or UNKNOWN for BGR (no such value in the schema)

    @classmethod
    def from_preprocess(cls, preprocess: dict[str, Any]) -> Normalization | None:
        """From ``Preprocess.to_dict()``; None without both mean and std (the input cannot be described then).

        ``x = (pixel * scale - mean) / std = (pixel - mean / scale) / (std / scale)``. ``1 / scale`` is taken in
        float32, as ``Preprocess.normalize`` divides by ``np.float32(1 / scale)`` (255 exactly for 1/255)."""
        if "mean" not in preprocess or "std" not in preprocess:
            return None
        mean = [float(v) for v in preprocess["mean"]]
        std = [float(v) for v in preprocess["std"]]
        if len(mean) != len(std) or len(mean) not in (1, 3) or not all(s > 0 for s in std):
            raise BadInputError(f"preprocessing mean {mean} and std {std}: need 1 or 3 values each, std > 0")
        inverse_scale = float(np.float32(1.0 / float(preprocess.get("scale", 1 / 255))))
        order = str(preprocess.get("channel_order", "RGB")).upper()
        return cls(tuple(m * inverse_scale for m in mean), tuple(s * inverse_scale for s in std),
                   COLOR_SPACE_RGB if order == "RGB" else COLOR_SPACE_UNKNOWN)

    def value_range(self) -> tuple[list[float], list[float]]:
        """Per channel, the model input's range for pixels 0..255 (what the metadata writer puts in Stats)."""
        return ([(0.0 - m) / s for m, s in zip(self.mean, self.std, strict=True)],
                [(255.0 - m) / s for m, s in zip(self.mean, self.std, strict=True)])


# -- writing -------------------------------------------------------------------------------------------------
def _floats(b: flatbuffers.Builder, values: list[float]) -> int:
    return b.CreateNumpyVector(np.asarray(values, np.float32))


def _offsets(b: flatbuffers.Builder, offsets: list[int]) -> int:
    b.StartVector(4, len(offsets), 4)
    for offset in reversed(offsets):
        b.PrependUOffsetTRelative(offset)
    return b.EndVector()


def _associated_file(b: flatbuffers.Builder, name: str, description: str, file_type: int) -> int:
    name_at, description_at = b.CreateString(name), b.CreateString(description)
    b.StartObject(_FIELD_COUNTS["AssociatedFile"])
    b.PrependUOffsetTRelativeSlot(_ASSOCIATED_FILE["name"], name_at, 0)
    b.PrependUOffsetTRelativeSlot(_ASSOCIATED_FILE["description"], description_at, 0)
    b.PrependInt8Slot(_ASSOCIATED_FILE["type"], file_type, 0)
    return b.EndObject()


def _image_size(b: flatbuffers.Builder, width: int, height: int) -> int:
    b.StartObject(_FIELD_COUNTS["ImageSize"])
    b.PrependUint32Slot(_IMAGE_SIZE["width"], width, 0)
    b.PrependUint32Slot(_IMAGE_SIZE["height"], height, 0)
    return b.EndObject()


def _image_properties(b: flatbuffers.Builder, color_space: int, width: int, height: int) -> int:
    size = _image_size(b, width, height)
    b.StartObject(_FIELD_COUNTS["ImageProperties"])
    b.PrependInt8Slot(_IMAGE_PROPERTIES["color_space"], color_space, 0)
    b.PrependUOffsetTRelativeSlot(_IMAGE_PROPERTIES["default_size"], size, 0)
    return b.EndObject()


def _feature_properties(b: flatbuffers.Builder) -> int:
    b.StartObject(_FIELD_COUNTS["FeatureProperties"])
    return b.EndObject()


def _content(b: flatbuffers.Builder, properties_type: int, properties: int) -> int:
    b.StartObject(_FIELD_COUNTS["Content"])
    b.PrependUint8Slot(_CONTENT["content_properties_type"], properties_type, 0)
    b.PrependUOffsetTRelativeSlot(_CONTENT["content_properties"], properties, 0)
    return b.EndObject()


def _normalization_unit(b: flatbuffers.Builder, mean: tuple[float, ...], std: tuple[float, ...]) -> int:
    mean_at, std_at = _floats(b, list(mean)), _floats(b, list(std))
    b.StartObject(_FIELD_COUNTS["NormalizationOptions"])
    b.PrependUOffsetTRelativeSlot(_NORMALIZATION["mean"], mean_at, 0)
    b.PrependUOffsetTRelativeSlot(_NORMALIZATION["std"], std_at, 0)
    options = b.EndObject()
    b.StartObject(_FIELD_COUNTS["ProcessUnit"])
    b.PrependUint8Slot(_PROCESS_UNIT["options_type"], PROCESS_NORMALIZATION, 0)
    b.PrependUOffsetTRelativeSlot(_PROCESS_UNIT["options"], options, 0)
    return b.EndObject()


def _stats(b: flatbuffers.Builder, low: list[float], high: list[float]) -> int:
    high_at, low_at = _floats(b, high), _floats(b, low)
    b.StartObject(_FIELD_COUNTS["Stats"])
    b.PrependUOffsetTRelativeSlot(_STATS["max"], high_at, 0)
    b.PrependUOffsetTRelativeSlot(_STATS["min"], low_at, 0)
    return b.EndObject()


def _tensor(b: flatbuffers.Builder, name: str, description: str, content: int, process_units: list[int],
            stats: int | None, associated_files: list[int]) -> int:
    name_at, description_at = b.CreateString(name), b.CreateString(description)
    units_at = _offsets(b, process_units) if process_units else None
    files_at = _offsets(b, associated_files) if associated_files else None
    b.StartObject(_FIELD_COUNTS["TensorMetadata"])
    b.PrependUOffsetTRelativeSlot(_TENSOR["name"], name_at, 0)
    b.PrependUOffsetTRelativeSlot(_TENSOR["description"], description_at, 0)
    b.PrependUOffsetTRelativeSlot(_TENSOR["content"], content, 0)
    if units_at is not None:
        b.PrependUOffsetTRelativeSlot(_TENSOR["process_units"], units_at, 0)
    if stats is not None:
        b.PrependUOffsetTRelativeSlot(_TENSOR["stats"], stats, 0)
    if files_at is not None:
        b.PrependUOffsetTRelativeSlot(_TENSOR["associated_files"], files_at, 0)
    return b.EndObject()


def _subgraph(b: flatbuffers.Builder, inputs: list[int], outputs: list[int]) -> int:
    inputs_at, outputs_at = _offsets(b, inputs), _offsets(b, outputs)
    b.StartObject(_FIELD_COUNTS["SubGraphMetadata"])
    b.PrependUOffsetTRelativeSlot(_SUBGRAPH["input_tensor_metadata"], inputs_at, 0)
    b.PrependUOffsetTRelativeSlot(_SUBGRAPH["output_tensor_metadata"], outputs_at, 0)
    return b.EndObject()


def _model(b: flatbuffers.Builder, fields: dict[str, str], subgraph: int) -> int:
    strings = {key: b.CreateString(value) for key, value in fields.items() if value}
    subgraphs = _offsets(b, [subgraph])
    b.StartObject(_FIELD_COUNTS["ModelMetadata"])
    for key, at in strings.items():
        b.PrependUOffsetTRelativeSlot(_MODEL[key], at, 0)
    b.PrependUOffsetTRelativeSlot(_MODEL["subgraph_metadata"], subgraphs, 0)
    return b.EndObject()


def _quantized_range(values: list[float], tensor: dict[str, Any]) -> list[float]:
    """``values`` as the integer codes the input tensor holds for them (its own scale and zero point)."""
    info = np.iinfo(np.dtype(tensor["dtype"]))
    return [float(min(max(round(v / tensor["scale"]) + tensor["zero_point"], info.min), info.max)) for v in values]


def _input_description(preprocess: dict[str, Any], norm: Normalization, tensor: dict[str, Any]) -> str:
    _, height, width, _ = tensor["shape"]
    order = str(preprocess.get("channel_order", "RGB")).upper()
    crop = preprocess.get("crop", height)
    geometry = (f"resize the short side to {preprocess['resize']} px (bilinear, keeping the aspect ratio), then "
                f"centre-crop {crop}x{crop}" if preprocess.get("resize") else f"a {crop}x{crop} centre crop")
    text = (f"Input image to be classified: {order} pixels, NHWC 1x{height}x{width}x3, {geometry} (the Task "
            f"Library resizes the whole image instead: centre-crop it first for the same framing). Each channel is "
            f"normalised as (pixel - mean) / std with pixel in 0..255 and the NormalizationOptions below.")
    if order != "RGB":
        text += " Channels are in BGR order (mean and std too): color space UNKNOWN, the schema has no BGR."
    dtype = tensor["dtype"]
    if dtype != "float32":
        text += (f" The tensor is {dtype} (scale {tensor['scale']:.9g}, zero point {tensor['zero_point']}): "
                 f"quantise the normalised value, q = round(x / scale) + zero_point (the Support Library's "
                 f"[Normalize, Quantize] pipeline does).")
        text += (" The Task Library does not support int8 inputs; use an artifact with float I/O for it."
                 if dtype == "int8" else
                 " The Task Library feeds raw 0..255 pixels to uint8 inputs without normalising, which this model "
                 "does not expect; use an artifact with float I/O for it.")
    return text


def build_metadata(info: ArtifactInfo, io_tensors: dict[str, dict[str, Any]], precision: str) -> bytes | None:
    """The ``ModelMetadata`` flatbuffer for an mdeploy classifier, or None when ``info.preprocess`` lacks mean or
    std (NormalizationOptions cannot be stated, and the Task Library rejects a float input without them).

    ``io_tensors``: ``{"input": ..., "output": ...}`` as in the
    ``mdeploy.io`` entry (name, dtype, shape and, quantised, scale and zero_point); None for a multi-output model
    (``{"input": ..., "outputs": [...]}``)."""
    norm = Normalization.from_preprocess(info.preprocess)
    if norm is None or "output" not in io_tensors:  # it describes one classifier output (several: issue 15)
        return None
    source, target = io_tensors["input"], io_tensors["output"]
    extra = dict(info.extra)
    classes = int(target["shape"][-1])
    labels = labels_attached(info.labels, classes)
    b = flatbuffers.Builder(1024)

    _, height, width, _ = source["shape"]
    image = _content(b, CONTENT_IMAGE, _image_properties(b, norm.color_space, int(width), int(height)))
    low, high = norm.value_range()
    if source["dtype"] != "float32":
        low, high = _quantized_range(low, source), _quantized_range(high, source)
    input_tensor = _tensor(b, INPUT_NAME, _input_description(info.preprocess, norm, source), image,
                           [_normalization_unit(b, norm.mean, norm.std)], _stats(b, low, high), [])

    output_text = (f"Raw logits (not probabilities: apply a softmax for those) of the {classes} classes, "
                   f"{target['dtype']}")
    if target["dtype"] != "float32":
        output_text += f" (scale {target['scale']:.9g}, zero point {target['zero_point']}: dequantise first)"
    files = []
    if labels:
        output_text += f"; class names in {LABELS_FILE}."
        files = [_associated_file(b, LABELS_FILE, f"Names of the {classes} classes, one per line, in output order.",
                                  TENSOR_AXIS_LABELS)]
    else:
        output_text += "." if not info.labels else (
            f"; the {len(info.labels)} labels given are not attached ({classes} outputs expected, one line each).")
    output_tensor = _tensor(b, OUTPUT_NAME, output_text, _content(b, CONTENT_FEATURE, _feature_properties(b)),
                            [], None, files)

    default_description = (f"Identify the most prominent object in the image from a set of {classes} categories "
                           f"({precision} MobileNet exported by mdeploy).")
    fields = {
        "name": info.model_name,
        "description": extra.get("description") or default_description,
        "version": extra.get("version") or info.producer_version,
        "author": extra.get("author", ""),
        "license": extra.get("license", ""),
        "min_parser_version": MIN_PARSER_VERSION,
    }
    b.Finish(_model(b, fields, _subgraph(b, [input_tensor], [output_tensor])), file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


def labels_attached(labels: tuple[str, ...] | list[str], classes: int) -> bool:
    """Whether a labels file goes with the output: one label per class (the Task Library refuses other counts),
    none with a line break (the file holds one per line)."""
    return (bool(labels) and len(labels) == classes
            and not any("\n" in label or "\r" in label for label in labels))


def labels_file(labels: tuple[str, ...] | list[str]) -> bytes:
    """One label per line, UTF-8, newline-terminated (readers drop the empty last line)."""
    return "".join(f"{label}\n" for label in labels).encode("utf-8")


def pack_associated_files(model: bytes, files: dict[str, bytes]) -> bytes:
    """``model`` followed by a zip of ``files`` (as MetadataPopulator appends them), stored uncompressed (the C++
    metadata extractor maps the files in place), with a fixed date, permissions and order: byte-identical output."""
    out = io.BytesIO(model)
    out.seek(0, io.SEEK_END)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        for name in sorted(files):
            member = zipfile.ZipInfo(name, date_time=ZIP_DATE_TIME)
            member.create_system = 3  # unix, whatever the exporting machine
            member.external_attr = (0o100000 | ZIP_PERMISSIONS) << 16  # regular file, rw-r--r--
            member.compress_type = zipfile.ZIP_STORED
            archive.writestr(member, files[name])
    return out.getvalue()


# -- reading -------------------------------------------------------------------------------------------------
class _Reader:
    """One table of a flatbuffer, read by field slot."""

    def __init__(self, buf: bytes | bytearray, pos: int) -> None:
        self.table = Table(buf, pos)

    def _at(self, slot: int) -> int:
        return self.table.Offset(4 + 2 * slot)

    def string(self, slot: int) -> str | None:
        at = self._at(slot)
        return self.table.String(at + self.table.Pos).decode("utf-8") if at else None

    def scalar(self, slot: int, flags: Any, default: int = 0) -> int:
        at = self._at(slot)
        return self.table.Get(flags, at + self.table.Pos) if at else default

    def floats(self, slot: int) -> list[float] | None:
        at = self._at(slot)
        if not at:
            return None
        # str() of a float32 is its shortest round-trip form: 123.675, not 123.67500305175781
        return [float(str(v)) for v in self.table.GetVectorAsNumpy(number_types.Float32Flags, at)]

    def table_at(self, slot: int) -> _Reader | None:
        at = self._at(slot)
        return _Reader(self.table.Bytes, self.table.Indirect(at + self.table.Pos)) if at else None

    def tables(self, slot: int) -> list[_Reader]:
        at = self._at(slot)
        if not at:
            return []
        start = self.table.Vector(at)
        return [_Reader(self.table.Bytes, self.table.Indirect(start + 4 * i))
                for i in range(self.table.VectorLen(at))]


def metadata_buffer(content: bytes) -> bytes | None:
    """The ``TFLITE_METADATA`` buffer of a .tflite file, or None."""
    from mdeploy.converters.tflite_flatbuffer import fb

    model = fb.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        entry = model.Metadata(i)
        if entry.Name().decode("utf-8") == METADATA_NAME:
            return model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
    return None


def packed_files(content: bytes) -> dict[str, bytes]:
    """The associated files zipped after the flatbuffer (empty without an archive)."""
    try:
        with zipfile.ZipFile(io.BytesIO(content)) as archive:
            return {name: archive.read(name) for name in archive.namelist()}
    except zipfile.BadZipFile:
        return {}


def _tensor_summary(tensor: _Reader) -> dict[str, Any]:
    summary: dict[str, Any] = {"name": tensor.string(_TENSOR["name"])}
    content = tensor.table_at(_TENSOR["content"])
    if content is not None:
        kind = content.scalar(_CONTENT["content_properties_type"], number_types.Uint8Flags)
        summary["content"] = {CONTENT_FEATURE: "FeatureProperties", CONTENT_IMAGE: "ImageProperties"}.get(kind, kind)
        properties = content.table_at(_CONTENT["content_properties"])
        if kind == CONTENT_IMAGE and properties is not None:
            space = properties.scalar(_IMAGE_PROPERTIES["color_space"], number_types.Int8Flags)
            summary["color_space"] = COLOR_SPACES.get(space, space)
    for unit in tensor.tables(_TENSOR["process_units"]):
        options = unit.table_at(_PROCESS_UNIT["options"])
        if unit.scalar(_PROCESS_UNIT["options_type"], number_types.Uint8Flags) == PROCESS_NORMALIZATION and options:
            summary["normalization"] = {"mean": options.floats(_NORMALIZATION["mean"]),
                                        "std": options.floats(_NORMALIZATION["std"])}
    stats = tensor.table_at(_TENSOR["stats"])
    if stats is not None:
        summary["stats"] = {"min": stats.floats(_STATS["min"]), "max": stats.floats(_STATS["max"])}
    files = tensor.tables(_TENSOR["associated_files"])
    if files:
        summary["associated_files"] = [
            {"name": f.string(_ASSOCIATED_FILE["name"]),
             "type": FILE_TYPES.get(f.scalar(_ASSOCIATED_FILE["type"], number_types.Int8Flags), "?")}
            for f in files]
    return summary


def read_summary(content: bytes) -> dict[str, Any] | None:
    """What an app team's tools will see: model fields, input normalisation, output files and the packed labels;
    None when the file has no TFLite Support metadata."""
    buf = metadata_buffer(content)
    if buf is None:
        return None
    if buf[4:8] != FILE_IDENTIFIER:
        return {"error": f"{METADATA_NAME} buffer lacks the {FILE_IDENTIFIER.decode()} file identifier"}
    root = _Reader(buf, int.from_bytes(buf[:4], "little"))
    summary: dict[str, Any] = {key: root.string(slot) for key, slot in _MODEL.items()
                               if key != "subgraph_metadata" and root.string(slot) is not None}
    subgraphs = root.tables(_MODEL["subgraph_metadata"])
    if subgraphs:
        summary["inputs"] = [_tensor_summary(t) for t in subgraphs[0].tables(_SUBGRAPH["input_tensor_metadata"])]
        summary["outputs"] = [_tensor_summary(t) for t in subgraphs[0].tables(_SUBGRAPH["output_tensor_metadata"])]
    files = packed_files(content)
    summary["packed_files"] = sorted(files)
    if LABELS_FILE in files:
        lines = files[LABELS_FILE].decode("utf-8").split("\n")
        summary["labels"] = len(lines[:-1] if lines and not lines[-1] else lines)
    return summary
