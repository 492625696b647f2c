"""README_executorch.md: the ExecuTorch program an Android or iOS app ships, with Kotlin and Swift that feed it
exactly as the model was calibrated and checked (every number comes from the manifest, never typed by hand).

The text is in ``templates/README_executorch.md.tmpl`` (``string.Template``: ``$name`` is a value computed here,
``$$`` a literal ``$``); this module only computes the values."""

from __future__ import annotations

from pathlib import Path

from mdeploy.converters.base import AppReadme, ReadmeParts, render_template
from mdeploy.converters.readme_values import (divisor, floats, kotlin_channels, kotlin_object_name, parity_line,
                                              shipped)
from mdeploy.manifest import Manifest
from mdeploy.metrics import is_class_scores

README = "README_executorch.md"


def executorch_readme(manifest: Manifest, parts: ReadmeParts, target: str = "pte") -> AppReadme | None:
    artifact = shipped(manifest, target)
    if artifact is None:
        return None
    p = manifest.preprocess
    (inp,), outs = artifact.io.inputs, artifact.io.outputs
    if len(outs) == 1 and is_class_scores(tuple(outs[0]["shape"])):
        returns = f"outputs[0]: the {outs[0]['shape'][-1]} class logits (arg-max: the class)."
    else:
        returns = "Every output, in the model's order, row-major: " + ", ".join(
            f"{o['name']} {o['shape']}" for o in outs) + " (rank-4 maps are NCHW)."
    int8 = (" int8 inside: the program quantises its input and dequantises its outputs itself, on the grids in its "
            "`metadata` (`mdeploy.io`)." if artifact.precision == "int8" else "")
    return AppReadme(README, render_template(
        "README_executorch.md.tmpl", name=manifest.model.name, file=artifact.file, stem=Path(artifact.file).stem,
        precision=artifact.precision, executorch=artifact.settings["executorch"],
        runtime=artifact.runtime, shape=inp["shape"], outputs=", ".join(f"`{o['shape']}` {o['dtype']}" for o in outs),
        int8=int8, parity=parity_line(artifact), contract=parts.contract,
        kotlin_name=kotlin_object_name(manifest.model.name, "Program"),
        resize=p.resize or 0, crop=p.crop, mean=floats(p.mean, "f"), std=floats(p.std, "f"),
        swift_mean=floats(p.mean), swift_std=floats(p.std),
        channel_order=p.channel_order, divisor=divisor(p), channels=kotlin_channels(p), returns=returns,
        golden=parts.golden, files=parts.files))
