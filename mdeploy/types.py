"""The small shared vocabulary every layer uses (imports nothing of mdeploy): targets, precisions, runners."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import numpy as np


# The tensor names of every artifact's input and output (the IR's input tensor has the input's name too).
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


class Target(str, Enum):
    onnx = "onnx"
    tflite = "tflite"
    coreml = "coreml"


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


# Runs a batch (N, C, H, W) float32, preprocessed as in the manifest, and returns (N, classes) float32 logits.
Runner = Callable[[np.ndarray], np.ndarray]
