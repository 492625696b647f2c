"""TFLite Support metadata of a detector with TFLite_Detection_PostProcess (``converters/tflite_detection.py``):
what the Task Library's ObjectDetector requires (an image input with NormalizationOptions; four outputs named
``location``, ``category``, ``score``, ``number of detections``, the location's BoundingBoxProperties saying the
boxes are ``ymin, xmin, ymax, xmax`` ratios) in the layout of tflite-support's ``metadata_writers.object_detector``
(tests/test_detection.py compares the two with tflite-support 0.4.4). Written with the table helpers of
``tflite_metadata.py``, slots from ``metadata_schema.fbs``."""

from __future__ import annotations

from typing import Any

import flatbuffers

from mdeploy.converters.tflite_metadata import (
    CONTENT_FEATURE, CONTENT_IMAGE, FILE_IDENTIFIER, INPUT_NAME, Normalization, _content, _feature_properties,
    _image_properties, _model, _normalization_unit, _offsets, _stats, _tensor,
)

OUTPUT_NAMES = ("location", "category", "score", "number of detections")  # what ObjectDetector looks for
OUTPUT_DESCRIPTIONS = ("The locations of the detected boxes.", "The categories of the detected boxes.",
                       "The scores of the detected boxes.", "The number of the detected boxes.")
GROUP_NAME = "detection_result"
CONTENT_BOUNDING_BOX = 3  # union ContentProperties
BOUNDARIES, RATIO = 1, 0  # BoundingBoxType, CoordinateType
BOX_INDEX = (1, 0, 3, 2)  # the op's ymin, xmin, ymax, xmax as left, top, right, bottom
CONTENT_VALUE_DIM = 2  # the axis of the outputs that runs over detections
MIN_PARSER_VERSION = "1.2.0"  # output_tensor_groups (schema 1.2.0)
_CONTENT_RANGE, _RANGE = 2, {"min": 0, "max": 1}
_BOUNDING_BOX = {"index": 0, "type": 1, "coordinate_type": 2}
_TENSOR_GROUP = {"name": 0, "tensor_names": 1}
_SUBGRAPH = {"input_tensor_metadata": 2, "output_tensor_metadata": 3, "output_tensor_groups": 8}


def _bounding_box(b: flatbuffers.Builder) -> int:
    b.StartVector(4, len(BOX_INDEX), 4)
    for value in reversed(BOX_INDEX):
        b.PrependUint32(value)
    index = b.EndVector()
    b.StartObject(3)
    b.PrependUOffsetTRelativeSlot(_BOUNDING_BOX["index"], index, 0)
    b.PrependInt8Slot(_BOUNDING_BOX["type"], BOUNDARIES, 0)
    b.PrependInt8Slot(_BOUNDING_BOX["coordinate_type"], RATIO, 0)
    return b.EndObject()


def _ranged_content(b: flatbuffers.Builder, properties_type: int, properties: int) -> int:
    b.StartObject(2)
    b.PrependInt32Slot(_RANGE["min"], CONTENT_VALUE_DIM, 0)
    b.PrependInt32Slot(_RANGE["max"], CONTENT_VALUE_DIM, 0)
    value_range = b.EndObject()
    b.StartObject(3)
    b.PrependUint8Slot(0, properties_type, 0)
    b.PrependUOffsetTRelativeSlot(1, properties, 0)
    b.PrependUOffsetTRelativeSlot(_CONTENT_RANGE, value_range, 0)
    return b.EndObject()


def _group(b: flatbuffers.Builder) -> int:
    name = b.CreateString(GROUP_NAME)
    names = _offsets(b, [b.CreateString(n) for n in OUTPUT_NAMES[:3]])
    b.StartObject(2)
    b.PrependUOffsetTRelativeSlot(_TENSOR_GROUP["name"], name, 0)
    b.PrependUOffsetTRelativeSlot(_TENSOR_GROUP["tensor_names"], names, 0)
    return b.EndObject()


def detector_metadata(name: str, preprocess: dict[str, Any], width: int, height: int, description: str,
                      fields: dict[str, str]) -> bytes | None:
    """The ``ModelMetadata`` flatbuffer of a float-input detector with the post-processing op's four outputs; None
    without a mean and std (the Task Library rejects a float input without NormalizationOptions)."""
    norm = Normalization.from_preprocess(preprocess)
    if norm is None:
        return None
    b = flatbuffers.Builder(1024)
    image = _content(b, CONTENT_IMAGE, _image_properties(b, norm.color_space, width, height))
    low, high = norm.value_range()
    text = (f"Input image: {str(preprocess.get('channel_order', 'RGB')).upper()} pixels, NHWC 1x{height}x{width}x3 "
            "float32, each channel normalised as (pixel - mean) / std with pixel in 0..255 and the "
            "NormalizationOptions below (the bundle's README gives the crop).")
    source = _tensor(b, INPUT_NAME, text, image, [_normalization_unit(b, norm.mean, norm.std)],
                     _stats(b, low, high), [])
    outputs = []
    for index, (output, about) in enumerate(zip(OUTPUT_NAMES, OUTPUT_DESCRIPTIONS, strict=True)):
        if index == 0:
            content = _ranged_content(b, CONTENT_BOUNDING_BOX, _bounding_box(b))
        elif index < 3:
            content = _ranged_content(b, CONTENT_FEATURE, _feature_properties(b))
        else:
            content = _content(b, CONTENT_FEATURE, _feature_properties(b))
        b.StartObject(2)  # an empty Stats table, as tflite-support's writer leaves it
        outputs.append(_tensor(b, output, about, content, [], b.EndObject(), []))
    inputs_at, outputs_at, groups_at = _offsets(b, [source]), _offsets(b, outputs), _offsets(b, [_group(b)])
    b.StartObject(10)
    b.PrependUOffsetTRelativeSlot(_SUBGRAPH["input_tensor_metadata"], inputs_at, 0)
    b.PrependUOffsetTRelativeSlot(_SUBGRAPH["output_tensor_metadata"], outputs_at, 0)
    b.PrependUOffsetTRelativeSlot(_SUBGRAPH["output_tensor_groups"], groups_at, 0)
    subgraph = b.EndObject()
    model = _model(b, {"name": name, "description": description, **fields, "min_parser_version": MIN_PARSER_VERSION},
                   subgraph)
    b.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(b.Output())


__all__ = ["OUTPUT_NAMES", "detector_metadata"]
