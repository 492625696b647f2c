"""The small shared vocabulary every layer uses (imports nothing of mdeploy): targets, precisions, runners."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, ClassVar
from enum import Enum

import numpy as np


# The tensor names of every artifact's input and output (the IR's input tensor has the input's name too). Every
# target names its outputs with ``output_names``, the one place that decides them.
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


def output_names(count: int, keys: Sequence[str] = ()) -> tuple[str, ...]:
    """An artifact's output names, in the model's order: a single output keeps the classifier's name (so today's
    artifacts stay byte for byte the same); several take the keys of the dict forward() returns (``out``, ``aux``;
    ``bbox_regression``, ``cls_logits``) when those are plain identifiers every runtime accepts as a tensor name,
    else they are ``output_0``, ``output_1``, ..."""
    if count == 1:
        return (OUTPUT_NAME,)
    usable = (len(keys) == count and len(set(keys)) == count and INPUT_NAME not in keys
              and all(_NAME.fullmatch(key) for key in keys))
    return tuple(keys) if usable else tuple(f"output_{i}" for i in range(count))


def outputs_entry(described: list[dict[str, Any]]) -> dict[str, Any]:
    """The outputs part of an artifact's ``mdeploy.io`` metadata: ``{"output": {...}}`` for one output (as before
    multi-output models, byte for byte), ``{"outputs": [{...}, ...]}`` in the model's order for several."""
    return {"output": described[0]} if len(described) == 1 else {"outputs": described}


class Target(str):
    """A target's name, the key of ``mdeploy.converters.REGISTRY``: which targets exist is the registry's business
    (a test can register one), so this is a name, not a closed enum. The built-in ones are constants for code that
    means one of them; ``value`` reads like an Enum member's."""

    onnx: ClassVar[Target]
    tflite: ClassVar[Target]
    coreml: ClassVar[Target]

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Target({str.__repr__(self)})"


Target.onnx, Target.tflite, Target.coreml = Target("onnx"), Target("tflite"), Target("coreml")


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


# Runs a batch (N, C, H, W) float32, preprocessed as in the manifest, and returns (N, classes) float32 logits.
Runner = Callable[[np.ndarray], np.ndarray]
# Runs a batch the same way and returns every output, (N, ...) float32 in the model's layout, keyed by the
# artifact's output names in the model's order (a dict keeps it).
OutputsRunner = Callable[[np.ndarray], dict[str, np.ndarray]]
