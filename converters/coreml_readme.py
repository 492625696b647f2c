"""README_ios.md: the Core ML artifact an iOS app ships, with Swift that feeds it exactly as the model was calibrated
and checked (Vision with a region of interest for an image input, an MLMultiArray for a tensor input).

The text is in ``templates/`` (``README_ios.md.tmpl`` and the two ``ios_*_input.swift.tmpl`` snippets;
``string.Template``: ``$name`` is a value computed here, ``$$`` a literal ``$``); this module only computes the
values."""

from __future__ import annotations

from pathlib import Path

from mdeploy.converters.base import AppReadme, ReadmeParts, render_template
from mdeploy.converters.readme_values import divisor, floats, parity_line, shipped
from mdeploy.manifest import Manifest, PreprocessRecord
from mdeploy.metrics import is_class_scores
from mdeploy.types import Target

README = "README_ios.md"


def _swift_outputs(manifest: Manifest) -> dict[str, str]:
    """What the Swift snippets return: a classifier's logits, or every output of any other model."""
    outputs = manifest.outputs or [manifest.output]
    if len(outputs) == 1 and is_class_scores(tuple(outputs[0].shape)):
        return {"function": "classify", "returns": "MLMultiArray", "observation": "VNClassificationObservation",
                "observation_note": "",
                "prediction": "    return try model.prediction(input: input).logits  // or classLabel / "
                              "classLabel_probs for a classifier"}
    names = [o.name for o in outputs]
    shapes = ", ".join(f"{o.name} {o.shape}" for o in outputs)
    return {"function": "predict", "returns": "[MLMultiArray]", "observation": "VNCoreMLFeatureValueObservation",
            "observation_note": f"  // one per output ({shapes}): featureName, featureValue.multiArrayValue",
            "prediction": "    let output = try model.prediction(input: input)\n"
                          f"    return [{', '.join(f'output.{name}' for name in names)}]  // {shapes}, NCHW maps"}


def _image_input_code(p: PreprocessRecord, class_name: str, outputs: dict[str, str]) -> str:
    """Vision crops and scales the photo: the region of interest is the square the model was checked on."""
    if p.resize:  # the crop is a fixed fraction of the short side
        fraction = f"{p.crop / p.resize:.6g}"
        checked_on = f"short side resized to {p.resize}, centre crop {p.crop}"
        side_text, side = f"{fraction} x the short side", f"min(w, h) * {fraction}"
    else:  # no resize: the crop is a fixed number of pixels
        checked_on = f"no resize, centre crop {p.crop} px"
        side_text, side = f"{p.crop} px", f"CGFloat({p.crop})"
    return render_template("ios_image_input.swift.tmpl", class_name=class_name, checked_on=checked_on,
                           side_text=side_text, side=side, crop=p.crop,
                           **{k: v for k, v in outputs.items() if k in ("function", "observation", "observation_note")})


def ios_readme(manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
    artifact = shipped(manifest, Target.coreml)
    if artifact is None:
        return None
    p, settings = manifest.preprocess, artifact.settings  # settings: what CoremlConverter.settings recorded
    image_input = settings.get("input") == "image"
    class_name = Path(artifact.file).stem.replace(".", "_")
    outputs = _swift_outputs(manifest)
    if image_input:
        code = _image_input_code(p, class_name, outputs)
        note = (f"The normalisation (`/ {divisor(p)}`, mean, std) is inside the model: pass camera pixels as they "
                "are.\n")
    else:
        code = render_template("ios_tensor_input.swift.tmpl", class_name=class_name, mean=floats(p.mean),
                               std=floats(p.std), crop=p.crop, channel_order=p.channel_order, divisor=divisor(p),
                               **{k: v for k, v in outputs.items() if k in ("function", "returns", "prediction")})
        note = ""
    return AppReadme(README, render_template(
        "README_ios.md.tmpl", name=manifest.model.name, file=artifact.file,
        minimum_target=settings.get("minimum_deployment_target"), compute_precision=settings.get("compute_precision"),
        int8=f", {settings['int8']}" if "int8" in settings else "",
        input="an image" if image_input else f"a float32 tensor `{manifest.input.shape}` NCHW",
        parity=parity_line(artifact),
        classifier_labels=", and its classifier labels" if settings.get("classifier") else "",
        contract=parts.contract, code=code, note=note, golden=parts.golden, files=parts.files))
