"""README_android.md: the TFLite artifact an Android app ships, with Kotlin that preprocesses exactly as the model was
calibrated and checked (every number comes from the manifest, never typed by hand).

The text is in ``templates/README_android.md.tmpl`` (``string.Template``: ``$name`` is a value computed here, ``$$``
a literal ``$``); this module only computes the values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mdeploy.converters.base import AppReadme, ReadmeParts, render_template
from mdeploy.converters.readme_values import QUANTISED, divisor, floats, parity_line, shipped
from mdeploy.manifest import Manifest
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


def _kotlin_name(model_name: str) -> str:
    return "".join(part.capitalize() for part in model_name.replace("-", "_").split("_")) + "Model"


def _kotlin_grid(prefix: str, tensor: _Tensor) -> str:
    return (f"    const val {prefix}_SCALE = {tensor.scale:.9g}f\n"
            f"    const val {prefix}_ZERO_POINT = {tensor.zero_point}\n")


def _kotlin_io(inp: _Tensor, out: _Tensor) -> dict[str, object]:
    """The Kotlin lines that depend on the TFLite model's input and output types (float32, int8 or uint8)."""
    store, read = "input.putFloat(x)", "output.rewind()\n        return FloatArray(CLASSES) { output.float }"
    if inp.quantised:
        low, high = (-128, 127) if inp.dtype == "int8" else (0, 255)
        store = ("val q = Math.round(x / IN_SCALE) + IN_ZERO_POINT\n"
                 f"                    input.put(q.coerceIn({low}, {high}).toByte())")
    if out.quantised:
        unsigned = " and 0xFF" if out.dtype == "uint8" else ""
        read = ("val raw = ByteArray(CLASSES).also { output.rewind(); output.get(it) }\n"
                "        return FloatArray(CLASSES) { i -> "
                f"((raw[i].toInt(){unsigned}) - OUT_ZERO_POINT) * OUT_SCALE }}")
    constants = (_kotlin_grid("IN", inp) if inp.quantised else "") + (_kotlin_grid("OUT", out) if out.quantised else "")
    return {"constants": constants, "store": store, "read": read,
            "input_bytes": 1 if inp.quantised else 4, "output_bytes": 1 if out.quantised else 4}


def android_readme(manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
    artifact = shipped(manifest, Target.tflite)
    if artifact is None:
        return None
    p = manifest.preprocess
    (inp,), (out,) = map(_Tensor.of, artifact.io.inputs), map(_Tensor.of, artifact.io.outputs)
    channels = ("(p) and 0xFF, (p shr 8) and 0xFF, (p shr 16) and 0xFF" if p.channel_order == "BGR" else
                "(p shr 16) and 0xFF, (p shr 8) and 0xFF, p and 0xFF")
    return AppReadme(README, render_template(
        "README_android.md.tmpl", name=manifest.model.name, file=artifact.file, precision=artifact.precision,
        runtime=artifact.runtime, shape=inp.shape, in_type=inp.dtype, out_shape=out.shape, out_type=out.dtype,
        parity=parity_line(artifact), contract=parts.contract, kotlin_name=_kotlin_name(manifest.model.name),
        resize=p.resize or 0, crop=p.crop, classes=out.shape[-1], mean=floats(p.mean, "f"), std=floats(p.std, "f"),
        channel_order=p.channel_order, divisor=divisor(p), channels=channels, **_kotlin_io(inp, out),
        golden=parts.golden, files=parts.files))
