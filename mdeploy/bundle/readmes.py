"""README_android.md and README_ios.md: what an app engineer needs, with code that preprocesses exactly as the
model was calibrated and checked (the numbers come from the manifest, never typed by hand)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _floats(values: list[float]) -> str:
    return ", ".join(f"{v:.6g}f" for v in values)


def _artifact(manifest: dict[str, Any], target: str, precision: str) -> dict[str, Any] | None:
    return next((a for a in manifest["artifacts"] if a["target"] == target and a["precision"] == precision), None)


def _labels_line(manifest: dict[str, Any]) -> str:
    if manifest.get("labels_file"):
        return f"`{manifest['labels_file']}`: one class name per line, line *i* is output index *i*."
    return "No labels were given at conversion: the outputs are class indices."


def _contract(manifest: dict[str, Any]) -> str:
    p = manifest["preprocess"]
    resize = (f"resize the **short side to {p['resize']} px** (bilinear, antialiased; the long side is "
              f"`floor({p['resize']} * long / short)`), then " if p["resize"] else "")
    return (f"1. Decode the photo upright (apply its EXIF orientation) as 8-bit {p['channel_order']}.\n"
            f"2. {resize}**centre-crop {p['crop']}×{p['crop']}** (offsets `round((size - {p['crop']}) / 2)`).\n"
            f"3. Per channel ({p['channel_order']}): `x = (pixel / {1 / p['scale']:g} - mean) / std` with "
            f"mean `{p['mean']}` and std `{p['std']}`.\n"
            f"4. Outputs: {manifest['output']['meaning']}, one per class; the answer is the arg-max. "
            f"{_labels_line(manifest)}\n")


def _golden(manifest: dict[str, Any]) -> str:
    golden = manifest.get("golden")
    if not golden:
        return ""
    shape = golden["inputs"]["shape"]
    return (f"## Golden vectors (`golden/`)\n"
            f"`inputs.f32`: {golden['samples']} preprocessed inputs, float32 little-endian, shape `{shape}` "
            f"({golden['inputs']['layout']}); the raw photos they came from are in `golden/images/` (where they "
            f"were photos). `<artifact>.f32`: that artifact's outputs on them, shape "
            f"`{golden['pytorch_outputs']['shape']}`; `pytorch.f32`: the PyTorch model's. Test your integration: "
            f"feed `inputs.f32` (transposed to the artifact's layout) and compare with `<artifact>.f32` within the "
            f"tolerance in `manifest.json` (`golden.artifacts.<file>.tolerance`); run your preprocessing on the "
            f"raw photos and compare with `inputs.f32` (resamplers differ slightly: expect a mean |difference| "
            f"below about 0.02, not 0). `python3 verify_bundle.py` does the first check with ONNX Runtime and "
            f"LiteRT and needs nothing else.\n\n")


def android_readme(manifest: dict[str, Any]) -> str:
    artifact = _artifact(manifest, "tflite", "int8") or _artifact(manifest, "tflite", "fp32")
    if artifact is None:
        return ""
    p = manifest["preprocess"]
    (inp,), (out,) = artifact["io"]["inputs"], artifact["io"]["outputs"]
    in_type, out_type = inp["dtype"], out["dtype"]
    shape = inp["shape"]
    quantised_in = in_type in ("int8", "uint8")
    store = ("val q = Math.round(x / IN_SCALE) + IN_ZERO_POINT\n"
             f"                    input.put(q.coerceIn({-128 if in_type == 'int8' else 0}, "
             f"{127 if in_type == 'int8' else 255}).toByte())" if quantised_in else "input.putFloat(x)")
    constants = ""
    if quantised_in:
        constants += f"    const val IN_SCALE = {inp['scale']:.9g}f\n    const val IN_ZERO_POINT = {inp['zero_point']}\n"
    if out_type in ("int8", "uint8"):
        constants += f"    const val OUT_SCALE = {out['scale']:.9g}f\n    const val OUT_ZERO_POINT = {out['zero_point']}\n"
    read = ("val raw = ByteArray(CLASSES).also { output.rewind(); output.get(it) }\n"
            "        return FloatArray(CLASSES) { i -> ((raw[i].toInt()"
            + (" and 0xFF" if out_type == "uint8" else "") + ") - OUT_ZERO_POINT) * OUT_SCALE }"
            if out_type in ("int8", "uint8") else
            "output.rewind()\n        return FloatArray(CLASSES) { output.float }")
    bytes_per_value = 1 if quantised_in else 4
    bgr = p["channel_order"] == "BGR"
    channels = "(p) and 0xFF, (p shr 8) and 0xFF, (p shr 16) and 0xFF" if bgr else \
        "(p shr 16) and 0xFF, (p shr 8) and 0xFF, p and 0xFF"
    return f"""# {manifest['model']['name']} on Android (LiteRT)

Model: `{artifact['file']}` ({artifact['precision']}, {artifact['runtime']} was used for its checks), input
`{shape}` {in_type} NHWC, output `{out['shape']}` {out_type}. Parity against the PyTorch model at conversion:
{_parity_line(artifact)}. The file also carries TFLite model metadata (normalisation, labels) for Android Studio's
ML binding; the code below needs none of it.

## Preprocessing (the contract the model was calibrated and checked with)
{_contract(manifest)}
## Kotlin
```kotlin
// build.gradle.kts: implementation("com.google.ai.edge.litert:litert:1.+")
import android.graphics.Bitmap
import org.tensorflow.lite.Interpreter
import java.nio.ByteBuffer
import java.nio.ByteOrder
import kotlin.math.max
import kotlin.math.min

object {_kotlin_name(manifest)} {{
    const val RESIZE = {p['resize'] or 0}   // short side before the crop (0: no resize)
    const val CROP = {p['crop']}
    const val CLASSES = {out['shape'][-1]}
    val MEAN = floatArrayOf({_floats(p['mean'])})  // {p['channel_order']}, after /{1 / p['scale']:g}
    val STD = floatArrayOf({_floats(p['std'])})
{constants}
    /** `photo` must already be upright (ImageDecoder applies EXIF orientation; BitmapFactory does not). */
    fun preprocess(photo: Bitmap): ByteBuffer {{
        var bitmap = photo
        if (RESIZE > 0) {{
            // torchvision's Resize(RESIZE): the short side becomes RESIZE, the long side is truncated
            val short = min(photo.width, photo.height)
            val long = (RESIZE.toLong() * max(photo.width, photo.height) / short).toInt()
            val (w, h) = if (photo.width <= photo.height) RESIZE to long else long to RESIZE
            bitmap = Bitmap.createScaledBitmap(photo, w, h, true)  // bilinear
        }}
        val left = Math.round((bitmap.width - CROP) / 2.0).toInt()
        val top = Math.round((bitmap.height - CROP) / 2.0).toInt()
        val pixels = IntArray(CROP * CROP)
        bitmap.getPixels(pixels, 0, CROP, left, top, CROP, CROP)
        val input = ByteBuffer.allocateDirect(CROP * CROP * 3 * {bytes_per_value}).order(ByteOrder.nativeOrder())
        for (p in pixels) {{
            val channels = intArrayOf({channels})
            for (c in 0 until 3) {{
                val x = (channels[c] / {1 / p['scale']:g}f - MEAN[c]) / STD[c]
                {store}
            }}
        }}
        input.rewind()
        return input
    }}

    fun classify(interpreter: Interpreter, photo: Bitmap): FloatArray {{
        val output = ByteBuffer.allocateDirect(CLASSES * {1 if out_type in ('int8', 'uint8') else 4})
            .order(ByteOrder.nativeOrder())
        interpreter.run(preprocess(photo), output)
        {read}
    }}
}}

// val interpreter = Interpreter(loadModelFile(context, "{artifact['file']}"), Interpreter.Options().setNumThreads(2))
// val scores = {_kotlin_name(manifest)}.classify(interpreter, photo); val best = scores.indices.maxBy {{ scores[it] }}
```
Android's bilinear `createScaledBitmap` is not antialiased like PIL's: on large downscales, first halve the photo
with `createScaledBitmap` until it is less than twice the target size, then resize. Check with the golden vectors.

{_golden(manifest)}## Files
{_files(manifest)}"""


def _kotlin_name(manifest: dict[str, Any]) -> str:
    return "".join(part.capitalize() for part in manifest["model"]["name"].replace("-", "_").split("_")) + "Model"


def _parity_line(artifact: dict[str, Any]) -> str:
    m = artifact["parity"]["metrics"]
    return (f"top-1 agreement {m['top1_agreement']:.1%}, SNR {m['snr_db']:.1f} dB, max |error| "
            f"{m['max_abs_error']:.3g} on {artifact['parity']['inputs']}")


def ios_readme(manifest: dict[str, Any]) -> str:
    artifact = _artifact(manifest, "coreml", "int8") or _artifact(manifest, "coreml", "fp32")
    if artifact is None:
        return ""
    p = manifest["preprocess"]
    image_input = artifact["settings"].get("input") == "image"
    crop_fraction = p["crop"] / p["resize"] if p["resize"] else 1.0
    class_name = Path(artifact["file"]).stem.replace(".", "_")
    if image_input:
        code = f"""import CoreML
import Vision

/// `photo` upright (UIImage.imageOrientation mapped to CGImagePropertyOrientation).
func classify(_ photo: CGImage, orientation: CGImagePropertyOrientation) throws -> [VNClassificationObservation] {{
    let model = try VNCoreMLModel(for: {class_name}(configuration: MLModelConfiguration()).model)
    let request = VNCoreMLRequest(model: model)
    // The model was checked on: short side resized to {p['resize']}, centre crop {p['crop']}. That is the central
    // square of side {crop_fraction:.6g} x the short side, scaled to {p['crop']}: give Vision exactly that region.
    let w = CGFloat(photo.width), h = CGFloat(photo.height), side = min(w, h) * {crop_fraction:.6g}
    request.regionOfInterest = CGRect(x: (w - side) / 2 / w, y: (h - side) / 2 / h, width: side / w, height: side / h)
    request.imageCropAndScaleOption = .scaleFill  // the region is already square
    try VNImageRequestHandler(cgImage: photo, orientation: orientation).perform([request])
    return request.results as? [VNClassificationObservation] ?? []
}}
```
The normalisation (`/ {1 / p['scale']:g}`, mean, std) is inside the model: pass camera pixels as they are."""
    else:
        code = f"""import CoreML

let mean: [Float] = [{", ".join(f"{v:.6g}" for v in p['mean'])}], std: [Float] = [{", ".join(f"{v:.6g}" for v in p['std'])}]

/// `pixels`: the {p['crop']}x{p['crop']} crop, {p['channel_order']}, 8-bit, row-major (resize and crop as above).
func classify(_ pixels: [UInt8]) throws -> MLMultiArray {{
    let input = try MLMultiArray(shape: [1, 3, {p['crop']}, {p['crop']}], dataType: .float32)
    let plane = {p['crop']} * {p['crop']}
    for i in 0..<plane {{
        for c in 0..<3 {{
            input[c * plane + i] = NSNumber(value: (Float(pixels[i * 3 + c]) / {1 / p['scale']:g} - mean[c]) / std[c])
        }}
    }}
    let model = try {class_name}(configuration: MLModelConfiguration())
    return try model.prediction(input: input).logits  // or classLabel / classLabel_probs for a classifier
}}
```"""
    return f"""# {manifest['model']['name']} on iOS (Core ML)

Model: `{artifact['file']}` (ML program, minimum {artifact['settings'].get('minimum_deployment_target')},
{artifact['settings'].get('compute_precision')} compute{', ' + artifact['settings']['int8'] if 'int8' in artifact['settings'] else ''}),
input {'an image' if image_input else 'a float32 tensor `' + str(manifest['input']['shape']) + '` NCHW'}.
Checked on Linux with the **MIL reference executor, not Core ML** ({_parity_line(artifact)}): run the golden
vectors on a device before shipping. Labels and normalisation are also in the model's metadata
(`mdeploy.labels`, `mdeploy.preprocess`{', and its classifier labels' if artifact['settings'].get('classifier') else ''}).

## Preprocessing (the contract the model was calibrated and checked with)
{_contract(manifest)}
## Swift
```swift
{code}
```

{_golden(manifest)}## Files
{_files(manifest)}"""


def _files(manifest: dict[str, Any]) -> str:
    lines = [f"- `{a['file']}` ({a['target']} {a['precision']}, sha256 `{a['sha256'][:16]}…`)" for a in manifest["artifacts"]]
    lines.append("- `manifest.json` (schema `manifest.schema.json`): every number above, machine-readable")
    lines.append("- `SHA256SUMS`: `sha256sum -c SHA256SUMS` checks every file")
    return "\n".join(lines) + "\n"


def write_readmes(stage: Path, manifest: dict[str, Any]) -> list[str]:
    written = []
    for name, render in (("README_android.md", android_readme), ("README_ios.md", ios_readme)):
        text = render(manifest)
        if text:
            (stage / name).write_text(text, encoding="utf-8")
            written.append(name)
    return written
