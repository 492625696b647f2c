"""README_android.md and README_ios.md: what an app engineer needs, with code that preprocesses exactly as the
model was calibrated and checked (the numbers come from the manifest, never typed by hand).

The text is in ``templates/`` (``string.Template``: ``$name`` is a value computed here, ``$$`` a literal ``$``);
this module only computes the values."""

from __future__ import annotations

import string
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from mdeploy.manifest import Manifest

QUANTISED = ("int8", "uint8")


@cache
def _template(name: str) -> string.Template:
    return string.Template((resources.files("mdeploy.bundle") / "templates" / name).read_text(encoding="utf-8"))


def _render(template: str, /, **values: object) -> str:
    return _template(template).substitute(values)  # substitute, not safe_substitute: a missing value raises KeyError


def _floats(values: list[float], suffix: str = "") -> str:
    return ", ".join(f"{v:.6g}{suffix}" for v in values)


def _divisor(p: dict[str, Any]) -> str:
    return f"{1 / p['scale']:g}"


def _artifact(manifest: dict[str, Any], target: str, precision: str) -> dict[str, Any] | None:
    return next((a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == precision), None)


def _contract(manifest: dict[str, Any]) -> str:
    p = manifest["preprocess"]
    resize = (f"resize the **short side to {p['resize']} px** (bilinear, antialiased; the long side is "
              f"`floor({p['resize']} * long / short)`), then " if p["resize"] else "")
    labels = (f"`{manifest['labels_file']}`: one class name per line, line *i* is output index *i*."
              if manifest.get("labels_file") else "No labels were given at conversion: the outputs are class indices.")
    return _render("contract.md.tmpl", channel_order=p["channel_order"], resize=resize, crop=p["crop"],
                   divisor=_divisor(p), mean=p["mean"], std=p["std"], meaning=manifest["output"]["meaning"],
                   labels=labels)


def _golden(manifest: dict[str, Any]) -> str:
    golden = manifest.get("golden")
    if not golden:
        return ""
    return _render("golden.md.tmpl", samples=golden["samples"], shape=golden["inputs"]["shape"],
                   layout=golden["inputs"]["layout"], outputs_shape=golden["pytorch_outputs"]["shape"]) + "\n"


def _parity_line(artifact: dict[str, Any]) -> str:
    m = artifact["parity"]["metrics"]
    return (f"top-1 agreement {m['top1_agreement']:.1%}, SNR {m['snr_db']:.1f} dB, max |error| "
            f"{m['max_abs_error']:.3g} on {artifact['parity']['inputs']}")


def _files(manifest: dict[str, Any]) -> str:
    lines = [f"- `{a['file']}` ({a['target']} {a['precision']}, sha256 `{a['sha256'][:16]}…`)"
             for a in manifest["artifacts"]]
    lines.append("- `manifest.json` (schema `manifest.schema.json`): every number above, machine-readable")
    lines.append("- `SHA256SUMS`: `sha256sum -c SHA256SUMS` checks every file")
    return "\n".join(lines)


def _kotlin_name(manifest: dict[str, Any]) -> str:
    return "".join(part.capitalize() for part in manifest["model"]["name"].replace("-", "_").split("_")) + "Model"


def _kotlin_grid(prefix: str, tensor: dict[str, Any]) -> str:
    return (f"    const val {prefix}_SCALE = {tensor['scale']:.9g}f\n"
            f"    const val {prefix}_ZERO_POINT = {tensor['zero_point']}\n")


def _kotlin_io(inp: dict[str, Any], out: dict[str, Any]) -> dict[str, object]:
    """The Kotlin lines that depend on the TFLite model's input and output types (float32, int8 or uint8)."""
    quantised_in, quantised_out = inp["dtype"] in QUANTISED, out["dtype"] in QUANTISED
    store, read = "input.putFloat(x)", "output.rewind()\n        return FloatArray(CLASSES) { output.float }"
    if quantised_in:
        low, high = (-128, 127) if inp["dtype"] == "int8" else (0, 255)
        store = ("val q = Math.round(x / IN_SCALE) + IN_ZERO_POINT\n"
                 f"                    input.put(q.coerceIn({low}, {high}).toByte())")
    if quantised_out:
        unsigned = " and 0xFF" if out["dtype"] == "uint8" else ""
        read = ("val raw = ByteArray(CLASSES).also { output.rewind(); output.get(it) }\n"
                "        return FloatArray(CLASSES) { i -> "
                f"((raw[i].toInt(){unsigned}) - OUT_ZERO_POINT) * OUT_SCALE }}")
    constants = (_kotlin_grid("IN", inp) if quantised_in else "") + (_kotlin_grid("OUT", out) if quantised_out else "")
    return {"constants": constants, "store": store, "read": read,
            "input_bytes": 1 if quantised_in else 4, "output_bytes": 1 if quantised_out else 4}


def android_readme(manifest: dict[str, Any]) -> str:
    artifact = _artifact(manifest, "tflite", "int8") or _artifact(manifest, "tflite", "fp32")
    if artifact is None:
        return ""
    p = manifest["preprocess"]
    (inp,), (out,) = artifact["io"]["inputs"], artifact["io"]["outputs"]
    channels = ("(p) and 0xFF, (p shr 8) and 0xFF, (p shr 16) and 0xFF" if p["channel_order"] == "BGR" else
                "(p shr 16) and 0xFF, (p shr 8) and 0xFF, p and 0xFF")
    return _render(
        "README_android.md.tmpl", name=manifest["model"]["name"], file=artifact["file"],
        precision=artifact["precision"], runtime=artifact["runtime"], shape=inp["shape"], in_type=inp["dtype"],
        out_shape=out["shape"], out_type=out["dtype"], parity=_parity_line(artifact), contract=_contract(manifest),
        kotlin_name=_kotlin_name(manifest), resize=p["resize"] or 0, crop=p["crop"], classes=out["shape"][-1],
        mean=_floats(p["mean"], "f"), std=_floats(p["std"], "f"), channel_order=p["channel_order"],
        divisor=_divisor(p), channels=channels, **_kotlin_io(inp, out), golden=_golden(manifest),
        files=_files(manifest))


def ios_readme(manifest: dict[str, Any]) -> str:
    artifact = _artifact(manifest, "coreml", "int8") or _artifact(manifest, "coreml", "fp32")
    if artifact is None:
        return ""
    p, settings = manifest["preprocess"], artifact["settings"]
    image_input = settings.get("input") == "image"
    class_name = Path(artifact["file"]).stem.replace(".", "_")
    note = ""
    if image_input:
        if p["resize"]:  # the crop is a fixed fraction of the short side
            fraction = f"{p['crop'] / p['resize']:.6g}"
            checked_on = f"short side resized to {p['resize']}, centre crop {p['crop']}"
            side_text, side = f"{fraction} x the short side", f"min(w, h) * {fraction}"
        else:  # no resize: the crop is a fixed number of pixels
            checked_on = f"no resize, centre crop {p['crop']} px"
            side_text, side = f"{p['crop']} px", f"CGFloat({p['crop']})"
        code = _render("ios_image_input.swift.tmpl", class_name=class_name, checked_on=checked_on,
                       side_text=side_text, side=side, crop=p["crop"])
        note = (f"The normalisation (`/ {_divisor(p)}`, mean, std) is inside the model: pass camera pixels as they "
                "are.\n")
    else:
        code = _render("ios_tensor_input.swift.tmpl", class_name=class_name, mean=_floats(p["mean"]),
                       std=_floats(p["std"]), crop=p["crop"], channel_order=p["channel_order"], divisor=_divisor(p))
    return _render(
        "README_ios.md.tmpl", name=manifest["model"]["name"], file=artifact["file"],
        minimum_target=settings.get("minimum_deployment_target"), compute_precision=settings.get("compute_precision"),
        int8=f", {settings['int8']}" if "int8" in settings else "",
        input="an image" if image_input else f"a float32 tensor `{manifest['input']['shape']}` NCHW",
        parity=_parity_line(artifact),
        classifier_labels=", and its classifier labels" if settings.get("classifier") else "",
        contract=_contract(manifest), code=code, note=note, golden=_golden(manifest), files=_files(manifest))


def write_readmes(stage: Path, manifest: Manifest | dict[str, Any]) -> list[str]:
    """The READMEs for the platforms ``manifest`` has artifacts for; the renderers read its JSON form (the trimmed
    manifests of tests/test_readmes.py are such dicts)."""
    data = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    written = []
    for name, render in (("README_android.md", android_readme), ("README_ios.md", ios_readme)):
        text = render(data)
        if text:
            (stage / name).write_text(text, encoding="utf-8")
            written.append(name)
    return written
