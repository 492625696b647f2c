"""README_android.md: the TFLite artifact an Android app ships, with Kotlin that preprocesses exactly as the model was
calibrated and checked (every number comes from the manifest, never typed by hand).

The text is in ``templates/README_android.md.tmpl`` (``string.Template``: ``$name`` is a value computed here, ``$$``
a literal ``$``); this module only computes the values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mdeploy.converters.base import AppReadme, ReadmeParts, render_template
from mdeploy.converters.readme_values import (QUANTISED, divisor, floats, kotlin_channels, kotlin_object_name,
                                              parity_line, shipped)
from mdeploy.manifest import Manifest
from mdeploy.metrics import is_class_scores
from mdeploy.types import Target

README = "README_android.md"


@dataclass(frozen=True)
class _Tensor:
    """One I/O tensor as :meth:`TfliteConverter.inspect` records it in the manifest's ``io``."""

    dtype: str
    shape: list[int]
    scale: float | None = None  # quantised I/O only
    zero_point: int | None = None

    @classmethod
    def of(cls, described: dict[str, Any]) -> _Tensor:
        return cls(described["dtype"], described["shape"], described.get("scale"), described.get("zero_point"))

    @property
    def quantised(self) -> bool:
        return self.dtype in QUANTISED


def _kotlin_grid(prefix: str, tensor: _Tensor) -> str:
    return (f"    const val {prefix}_SCALE = {tensor.scale:.9g}f\n"
            f"    const val {prefix}_ZERO_POINT = {tensor.zero_point}\n")


def _kotlin_io(inp: _Tensor, outs: list[_Tensor], kotlin_name: str) -> dict[str, object]:
    """The Kotlin lines that depend on the TFLite model's input and output types (float32, int8 or uint8) and on its
    outputs: ``classify`` for one class-score output, ``run`` (every output) otherwise."""
    store = "input.putFloat(x)"
    if inp.quantised:
        low, high = (-128, 127) if inp.dtype == "int8" else (0, 255)
        store = ("val q = Math.round(x / IN_SCALE) + IN_ZERO_POINT\n"
                 f"                    input.put(q.coerceIn({low}, {high}).toByte())")
    constants = _kotlin_grid("IN", inp) if inp.quantised else ""
    if len(outs) == 1 and is_class_scores(tuple(outs[0].shape)):
        (out,) = outs
        run, usage = _kotlin_classify(out), (f"// val scores = {kotlin_name}.classify(interpreter, photo); "
                                             "val best = scores.indices.maxBy { scores[it] }")
        outputs_constants = f"    const val CLASSES = {out.shape[-1]}\n"
        constants += _kotlin_grid("OUT", out) if out.quantised else ""
    else:
        run, usage = _kotlin_run(outs), f"// val outputs = {kotlin_name}.run(interpreter, photo)  // one FloatArray each"
        outputs_constants = _kotlin_outputs(outs)
    return {"constants": constants, "store": store, "run": run, "usage": usage, "outputs_constants": outputs_constants,
            "input_bytes": 1 if inp.quantised else 4}


def _kotlin_classify(out: _Tensor) -> str:
    read = "output.rewind()\n        return FloatArray(CLASSES) { output.float }"
    if out.quantised:
        unsigned = " and 0xFF" if out.dtype == "uint8" else ""
        read = ("val raw = ByteArray(CLASSES).also { output.rewind(); output.get(it) }\n"
                "        return FloatArray(CLASSES) { i -> "
                f"((raw[i].toInt(){unsigned}) - OUT_ZERO_POINT) * OUT_SCALE }}")
    return ("    fun classify(interpreter: Interpreter, photo: Bitmap): FloatArray {\n"
            f"        val output = ByteBuffer.allocateDirect(CLASSES * {1 if out.quantised else 4})\n"
            "            .order(ByteOrder.nativeOrder())\n"
            "        interpreter.run(preprocess(photo), output)\n"
            f"        {read}\n"
            "    }")


def _kotlin_outputs(outs: list[_Tensor]) -> str:
    shapes = ", ".join(f"intArrayOf({', '.join(map(str, out.shape))})" for out in outs)
    lines = ("    // Every output in the model's order, row-major in these shapes (a rank-4 map is NHWC)\n"
             f"    val OUTPUT_SHAPES = arrayOf({shapes})\n")
    if outs[0].quantised:
        lines += (f"    val OUT_SCALES = floatArrayOf({', '.join(f'{o.scale:.9g}f' for o in outs)})\n"
                  f"    val OUT_ZERO_POINTS = intArrayOf({', '.join(str(o.zero_point) for o in outs)})\n")
    return lines


def _kotlin_run(outs: list[_Tensor]) -> str:
    quantised, unsigned = outs[0].quantised, " and 0xFF" if outs[0].dtype == "uint8" else ""
    size = 1 if quantised else 4
    read = (f"FloatArray(buffer.capacity()) {{ ((buffer.get().toInt(){unsigned}) - OUT_ZERO_POINTS[i]) * OUT_SCALES[i] }}"
            if quantised else "FloatArray(buffer.capacity() / 4) { buffer.float }")
    return ("    fun run(interpreter: Interpreter, photo: Bitmap): List<FloatArray> {\n"
            "        val buffers = OUTPUT_SHAPES.map { shape ->\n"
            f"            ByteBuffer.allocateDirect(shape.fold(1) {{ a, b -> a * b }} * {size}).order(ByteOrder.nativeOrder())\n"
            "        }\n"
            "        interpreter.runForMultipleInputsOutputs(arrayOf<Any>(preprocess(photo)),\n"
            "            buffers.indices.associateWith { buffers[it] as Any })\n"
            "        return buffers.mapIndexed { i, buffer ->\n"
            "            buffer.rewind()\n"
            f"            {read}\n"
            "        }\n"
            "    }")


def android_readme(manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
    artifact = shipped(manifest, Target.tflite)
    if artifact is None:
        return None
    p = manifest.preprocess
    (inp,), outs = map(_Tensor.of, artifact.io.inputs), [_Tensor.of(o) for o in artifact.io.outputs]
    kotlin_name = kotlin_object_name(manifest.model.name, "Model")
    return AppReadme(README, render_template(
        "README_android.md.tmpl", name=manifest.model.name, file=artifact.file, precision=artifact.precision,
        runtime=artifact.runtime, shape=inp.shape, in_type=inp.dtype,
        outputs=", ".join(f"`{o.shape}` {o.dtype}" for o in outs), parity=parity_line(artifact),
        contract=parts.contract, kotlin_name=kotlin_name, resize=p.resize or 0, crop=p.crop,
        mean=floats(p.mean, "f"), std=floats(p.std, "f"), channel_order=p.channel_order, divisor=divisor(p),
        channels=kotlin_channels(p), **_kotlin_io(inp, outs, kotlin_name),
        golden=parts.golden, files=parts.files))
