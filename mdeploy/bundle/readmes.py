"""The app READMEs of the bundle (README_android.md, README_ios.md, one per target that writes one): this module
renders the sections they all share from the typed manifest (the preprocessing contract, the golden vectors, the
bundle's files) and asks the converter of each target in the manifest for its README
(:meth:`mdeploy.converters.base.Converter.app_readme`), which holds the target's code snippet.

The shared text is in ``templates/`` (``string.Template``: ``$name`` is a value computed here, ``$$`` a literal
``$``); this module only computes the values."""

from __future__ import annotations

from pathlib import Path

from mdeploy.converters import REGISTRY
from mdeploy.converters.base import ReadmeParts, render_template
from mdeploy.converters.readme_values import divisor
from mdeploy.manifest import Manifest

PACKAGE = "mdeploy.bundle"  # whose templates/ hold the shared sections


def _contract(manifest: Manifest) -> str:
    p = manifest.preprocess
    resize = (f"resize the **short side to {p.resize} px** (bilinear, antialiased; the long side is "
              f"`floor({p.resize} * long / short)`), then " if p.resize else "")
    labels = (f"`{manifest.labels_file}`: one class name per line, line *i* is output index *i*."
              if manifest.labels_file else "No labels were given at conversion: the outputs are class indices.")
    outputs = manifest.outputs or [manifest.output]
    if len(outputs) == 1 and outputs[0].meaning == "raw logits":
        text = f"{outputs[0].meaning}, one per class; the answer is the arg-max. {labels}"
    else:
        text = ("; ".join(f"`{o.name}` `{o.shape}` ({o.meaning})" for o in outputs) + ", in this order, each "
                "as the PyTorch model returns it (an artifact in NHWC gives maps as NHWC; its README says)."
                + (f" {labels}" if manifest.labels_file else ""))
    return render_template("contract.md.tmpl", PACKAGE, channel_order=p.channel_order, resize=resize, crop=p.crop,
                           divisor=divisor(p), mean=p.mean, std=p.std, outputs=text) + _detection(manifest)


def _detection(manifest: Manifest) -> str:
    """How to decode a detector's boxes and scores with the bundle's anchors ("" when it is no detector)."""
    detection = manifest.detection
    if detection is None:
        return ""
    shapes = {o.name: o.shape for o in manifest.outputs or [manifest.output]}
    scales = dict(zip(detection.box_order, detection.box_scales, strict=True))
    if detection.score_function == "softmax":
        score_text = "softmax over the last axis of the logits"
    else:
        score_text = "sigmoid of each logit"
    score_text += (f"; column {detection.background_class} is background, not a class: skip it."
                   if detection.background_class is not None else "; every column is a class (no background).")
    height, width = manifest.input.shape[-2:]
    return render_template("detection.md.tmpl", PACKAGE, boxes=detection.boxes_output,
                           boxes_shape=shapes[detection.boxes_output], scores=detection.scores_output,
                           scores_shape=shapes[detection.scores_output], anchors_file=detection.anchors_file,
                           anchors=detection.anchors, anchor_format=detection.anchor_format,
                           order=", ".join(detection.box_order), sx=f"{scales['dx']:g}", sy=f"{scales['dy']:g}",
                           sw=f"{scales['dw']:g}", sh=f"{scales['dh']:g}", width=width, height=height,
                           score_text=score_text, top_k=detection.top_k, postprocess=_postprocess(manifest))


def _postprocess(manifest: Manifest) -> str:
    found = manifest.detection.postprocess if manifest.detection else None
    if found is None:
        return ""
    return (f"\n\nAndroid: `{found.file}` is the fp32 TFLite model with `{found.op}` appended (decoding as above, "
            f"{found.nms}; score >= {found.score_threshold:g}, IoU > {found.iou_threshold:g} suppressed, at most "
            f"{found.max_detections} detections). Its outputs: `detection_boxes` `[1, {found.max_detections}, 4]` "
            "(ymin, xmin, ymax, xmax, normalised), `detection_classes` (0-based, background excluded), "
            "`detection_scores`, `num_detections`. "
            + ("It carries the TFLite Support metadata the Task Library's `ObjectDetector` reads (image input with "
               "its normalisation; `location`, `category`, `score`, `number of detections`); the Task Library "
               "resizes the whole photo to the input instead of cropping: crop it first for the same framing."
               if found.object_detector_metadata else
               "It carries no TFLite Support metadata (no mean/std to state), so the Task Library cannot load it; a "
               "plain `Interpreter` runs it.") + "\n")


def _golden(manifest: Manifest) -> str:
    golden = manifest.golden
    if not golden.samples:  # no golden vectors were written
        return ""
    if golden.pytorch_by_output:  # several outputs: one array per artifact and output
        shapes = ", ".join(f"`{name}` `{array.shape}`" for name, array in golden.pytorch_by_output.items())
        text = (f"`<artifact>.<output>.f32`: that artifact's outputs on them, one file per output ({shapes}, "
                "NCHW maps); `pytorch.<output>.f32`: the PyTorch model's.")
        key, golden_file = "file>:<output", "<artifact>.<output>.f32"
    else:
        text = (f"`<artifact>.f32`: that artifact's outputs on them, shape `{golden.pytorch_outputs.shape}`; "
                "`pytorch.f32`: the PyTorch model's.")
        key, golden_file = "file", "<artifact>.f32"
    return render_template("golden.md.tmpl", PACKAGE, samples=golden.samples, shape=golden.inputs.shape,
                           layout=golden.inputs.layout, outputs_text=text, key=key,
                           golden_file=golden_file, verifier=_verifier(manifest)) + "\n"


def _verifier(manifest: Manifest) -> str:
    """What ``verify_bundle.py`` can check of these artifacts: the runtimes of the targets present that it runs."""
    present = {a.target for a in manifest.artifacts}
    runtimes = [runner.runtime for target, converter in REGISTRY.items() if target in present
                and (runner := converter.bundle_runner()) is not None and runner.run is not None]
    if not runtimes:
        return "`python3 verify_bundle.py` checks `SHA256SUMS` only: it runs none of these artifacts."
    named = ", ".join(runtimes[:-1]) + " and " + runtimes[-1] if len(runtimes) > 1 else runtimes[0]
    return f"`python3 verify_bundle.py` does the first check with {named} and needs nothing else."


def _files(manifest: Manifest) -> str:
    lines = [f"- `{a.file}` ({a.target} {a.precision}, sha256 `{a.sha256[:16]}…`)" for a in manifest.artifacts]
    if (detection := manifest.detection) is not None:
        lines.append(f"- `{detection.anchors_file}`: the detector's anchors ({detection.anchor_format})")
        if manifest.detection.postprocess is not None:
            lines.append(f"- `{manifest.detection.postprocess.file}`: the fp32 TFLite with "
                         f"{manifest.detection.postprocess.op} appended")
    lines.append("- `manifest.json` (schema `manifest.schema.json`): every number above, machine-readable")
    lines.append("- `SHA256SUMS`: `sha256sum -c SHA256SUMS` checks every file")
    return "\n".join(lines)


def render_readmes(manifest: Manifest) -> dict[str, str]:
    """File name -> text of the READMEs of the targets ``manifest`` has artifacts for, in the registry's order."""
    parts = ReadmeParts(contract=_contract(manifest), golden=_golden(manifest), files=_files(manifest))
    present = {a.target for a in manifest.artifacts}
    readmes = {}
    for target, converter in REGISTRY.items():
        readme = converter.app_readme(manifest, parts) if target in present else None
        if readme is not None:
            readmes[readme.file] = readme.text
    return readmes


def write_readmes(stage: Path, manifest: Manifest) -> list[str]:
    """Writes :func:`render_readmes` into ``stage``; returns the file names written."""
    readmes = render_readmes(manifest)
    for name, text in readmes.items():
        (stage / name).write_text(text, encoding="utf-8")
    return list(readmes)
