"""The stock converter's graphs of the same models, for ``bench/tflite_latency.py --stock``: Keras's own
MobileNetV2 / MobileNetV3-Small / MobileNetV3-Large (``keras.applications``, random weights, 1000 classes) through
TensorFlow's ``TFLiteConverter``, fp32 and full-integer int8 (int8 weights, activations, input and output, as
mdeploy's default int8 TFLite), calibrated on a few random inputs (latency does not depend on the values).

This is the comparison the issue asks for when a CPU makes int8 no faster than fp32 (x86 without VNNI): the best
int8 graph another converter makes, timed in the same interleaved run as ours.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from mdeploy.zoo import Arch

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def keras_counterpart(arch: Arch, size: int, width: float) -> object:
    import keras

    shape = (size, size, 3)
    builders: dict[Arch, Callable[[], object]] = {
        Arch.mobilenet_v2: lambda: keras.applications.MobileNetV2(shape, alpha=width, weights=None),
        Arch.mobilenet_v3_small: lambda: keras.applications.MobileNetV3Small(
            shape, alpha=width, weights=None, include_preprocessing=False),
        Arch.mobilenet_v3_large: lambda: keras.applications.MobileNetV3Large(
            shape, alpha=width, weights=None, include_preprocessing=False),
    }
    if arch not in builders:
        raise ValueError(f"keras.applications has no counterpart of {arch.value}")
    return builders[arch]()


def write_stock_tflite(model: object, path: Path, int8: bool, size: int) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if int8:
        def representative() -> Iterator[list[np.ndarray]]:
            rng = np.random.default_rng(0)
            for _ in range(8):
                yield [rng.standard_normal((1, size, size, 3)).astype(np.float32)]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    path.write_bytes(converter.convert())


def stock_paths(arch: Arch, size: int, width: float, folder: Path) -> dict[str, Path]:
    """{"stock_fp32": ..., "stock_int8": ...}: the two TFLite files TFLiteConverter makes of ``arch``."""
    model = keras_counterpart(arch, size, width)
    paths = {"stock_fp32": folder / f"{arch.value}.stock.fp32.tflite",
             "stock_int8": folder / f"{arch.value}.stock.int8.tflite"}
    write_stock_tflite(model, paths["stock_fp32"], False, size)
    write_stock_tflite(model, paths["stock_int8"], True, size)
    return paths
