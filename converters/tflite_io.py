"""How a TFLite artifact's I/O tensors are encoded and decoded: float32 in and out of the (int8/uint8) codes with the
tensor's own scale and zero point. NumPy only, and nothing of mdeploy: the same source runs in mdeploy
(``converters/tflite.py``), in the bundle's ``verify_bundle.py`` (copied in by the bundle) and in the ARM guest
(copied beside ``guest_runner.py`` by ``mdeploy/arm/run.py``)."""

from __future__ import annotations

from typing import Any

import numpy as np


def tensor_encoder(detail: dict[str, Any]) -> Any:
    """float32 -> what the tensor of ``detail`` (an interpreter's input detail) takes."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return lambda x: np.ascontiguousarray(x, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return lambda x: np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def tensor_decoder(detail: dict[str, Any]) -> Any:
    """What the tensor of ``detail`` (an interpreter's output detail) holds -> float32."""
    dtype = np.dtype(detail["dtype"])
    if dtype == np.float32:
        return lambda y: np.array(y, dtype=np.float32)
    scale, zero_point = detail["quantization"]
    return lambda y: ((y.astype(np.float32) - zero_point) * scale).astype(np.float32)
