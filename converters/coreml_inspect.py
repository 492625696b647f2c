"""What a saved ML program holds: I/O, image preprocessing, classifier labels, op histogram, int8 weights and
activation quantisation, read from the program itself (not from what mdeploy meant to write)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np

WEIGHT_DECOMPRESSION = ("constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")


def _feature(feature: Any) -> dict[str, Any]:
    kind = feature.type.WhichOneof("Type")
    out: dict[str, Any] = {"name": feature.name, "kind": kind.removesuffix("Type")}
    if kind == "multiArrayType":
        array = feature.type.multiArrayType
        out["kind"] = "tensor"
        out["shape"] = list(array.shape)
        out["dtype"] = type(array).ArrayDataType.Name(array.dataType).lower()
    elif kind == "imageType":
        image = feature.type.imageType
        out["shape"] = [image.height, image.width]
        out["dtype"] = "uint8"  # 8-bit pixels (a CVPixelBuffer)
        out["color_space"] = type(image).ColorSpace.Name(image.colorSpace)
    if feature.shortDescription:
        out["description"] = feature.shortDescription
    return out


def _const(var: Any) -> Any:
    return None if var is None else var.val


def _image_preprocessing(main: Any, input_name: str) -> dict[str, Any]:
    """The scale and per-channel bias Core ML applies to image pixels, as the ops that use the input compute them
    (coremltools writes ImageType's scale and bias as a ``mul`` then an ``add`` right after the input)."""
    scale: Any = 1.0
    bias: Any = [0.0, 0.0, 0.0]
    var = main.inputs[input_name]
    for _ in range(3):  # an optional cast, then mul (scale), then add (bias)
        users = [op for op in main.operations if any(v is var for v in op.inputs.values())]
        if len(users) != 1 or users[0].op_type not in ("mul", "add", "cast"):
            break
        op = users[0]
        if op.op_type in ("mul", "add"):
            other = op.inputs["y"] if op.inputs["x"] is var else op.inputs["x"]
            if other.val is None:
                break
            if op.op_type == "mul":
                scale = float(np.asarray(other.val).reshape(-1)[0])
            else:
                bias = [float(v) for v in np.asarray(other.val).reshape(-1)]
        var = op.outputs[0]
    return {"scale": scale, "bias": bias}


def describe_program(spec: Any, program: Any) -> dict[str, Any]:
    main = program.functions["main"]
    ops = [op for op in main.operations]
    histogram = Counter(op.op_type for op in ops)
    inputs = [_feature(f) for f in spec.description.input]
    for feature in inputs:
        if feature["kind"] == "image":
            feature["preprocessing"] = _image_preprocessing(main, feature["name"])
    int8_weights = 0
    for op in ops:
        if op.op_type in WEIGHT_DECOMPRESSION:
            key = "quantized_data" if "quantized_data" in op.inputs else "data"
            data = _const(op.inputs.get(key))
            if data is not None and data.dtype in (np.int8, np.uint8) and data.ndim > 1:
                int8_weights += 1
    quantization = []
    for op in ops:
        if op.op_type == "quantize":
            scale, zero_point = _const(op.inputs["scale"]), _const(op.inputs.get("zero_point"))
            entry: dict[str, Any] = {
                "tensor": _tensor_name(op),
                "dtype": str(_const(op.inputs["output_dtype"])),
                "scale": np.asarray(scale, np.float64).tolist(),
                "zero_point": 0 if zero_point is None else np.asarray(zero_point).tolist(),
            }
            if np.ndim(scale) > 0:
                entry["axis"] = int(_const(op.inputs["axis"]))
            quantization.append(entry)
    classifier = [op for op in ops if op.op_type == "classify"]
    float_types = Counter(str(np.dtype(_numpy(op.outputs[0]))) for op in ops
                          if op.op_type in ("conv", "linear") and _numpy(op.outputs[0]) is not None)
    return {
        "inputs": inputs,
        "outputs": [_feature(f) for f in spec.description.output],
        "ops": dict(sorted(histogram.items())),
        "compute_precision": "fp16" if float_types.get("float16") else "fp32",
        "int8_weight_tensors": int8_weights,
        "activation_quantization": quantization,
        "labels": list(_const(classifier[0].inputs["classes"]) or []) if classifier else [],
    }


def _tensor_name(quantize: Any) -> str:
    """The IR tensor a quantize op quantises: mdeploy names it TENSOR_q; coremltools' passes may rename it
    (quantize_N), its input then still reads TENSOR_float (or TENSOR), with _cast_fp16 in fp16 programs."""
    name = quantize.name.removesuffix("_cast_fp16")
    if re.fullmatch(r"quantize_\d+", name):
        return quantize.inputs["input"].name.removesuffix("_cast_fp16").removesuffix("_float")
    return name.removesuffix("_q")


def _numpy(var: Any) -> Any:
    from coremltools.converters.mil.mil import types

    try:
        return types.nptype_from_builtin(var.dtype)
    except (ValueError, TypeError, AttributeError):
        return None
