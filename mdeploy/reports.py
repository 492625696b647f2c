"""manifest.json (for machines) and SUMMARY.md (for people) in the output folder, and the console table."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.table import Table

from mdeploy.converters import tool_packages
from mdeploy.converters.base import artifact_files, artifact_size
from mdeploy.detection import detection_record
from mdeploy.manifest import (MANIFEST_VERSION, SCHEMA_FILE, ArtifactIO, ArtifactRecord, DetectionParityRecord,
                              EvaluationInfo, Failure, FloatLayerRecord, Golden, InputSpec, LatencyRecord, Manifest,
                              MixedPrecisionRecord, ModelInfo, OutputParityRecord, OutputSpec, ParityMetricsRecord,
                              ParityRecord, PreprocessRecord, QuantizationInfo, SampleSetRecord, SkippedFile)
from mdeploy.metrics import is_class_scores
from mdeploy.parity import ParityResult, json_number, json_numbers
from mdeploy.paths import feed_file
from mdeploy.reporting.common import limit_notes
from mdeploy.types import INPUT_NAME
from mdeploy import __version__

if TYPE_CHECKING:
    from mdeploy.calibration.dataset import SampleSet
    from mdeploy.detection import DetectorSpec
    from mdeploy.graph.ir import Graph
    from mdeploy.loading import LoadedModel
    from mdeploy.records import Artifact, ConvertOptions, Evaluation
    from mdeploy.quantize.params import QuantizedGraph

# What two conversions from the same inputs on the same machine share (tests/test_bundle.py checks it).
REPRODUCIBILITY = {
    "identical": "every artifact, labels.txt, golden/, the READMEs and int8_channel_scales.npz are byte-identical "
                 "when the same model, data, options and tool versions are converted on the same kind of machine",
    "varies": {
        "manifest.json": "the seconds, latency and timing fields (and the SHA256SUMS line of this file)",
        "SUMMARY.md": "the latency column",
    },
    "across_machines": "int8 parameters come from float arithmetic on calibration data: another CPU or thread count "
                       "may round a weight or range differently; parity is rechecked for every artifact",
}


def sha256_of(path: Path) -> str:
    """Of a file, or of a package directory's files (relative names and contents, in sorted order)."""
    digest = hashlib.sha256()
    for file in artifact_files(path):
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        feed_file(digest, file)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {"mdeploy": __version__, "python": platform.python_version()}
    for name in tool_packages():
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def sample_set_record(samples: SampleSet | None) -> SampleSetRecord | None:
    if samples is None:
        return None
    report = samples.report
    return SampleSetRecord(
        samples=len(samples),
        sha256=samples.sha256,
        files_seen=report.total_files,
        skipped=[SkippedFile(str(item.path), item.reason) for item in report.skipped],
        small_images=report.small_images,
    )


def metrics_record(parity: ParityResult) -> ParityMetricsRecord:
    return ParityMetricsRecord(**json_numbers(parity.metrics.to_dict()))  # type: ignore[arg-type]


def parity_record(parity: ParityResult) -> ParityRecord:
    outputs = [OutputParityRecord(output=result.output or "", passed=result.passed, metrics=metrics_record(result),
                                  thresholds=result.thresholds.to_dict(), failures=list(result.failures),
                                  threshold_notes=dict(result.threshold_notes) or None) for result in parity.outputs]
    return ParityRecord(passed=parity.passed, inputs=parity.inputs, metrics=metrics_record(parity),
                        thresholds=parity.thresholds.to_dict(), failures=list(parity.failures),
                        threshold_notes=dict(parity.threshold_notes) or None, outputs=outputs or None,
                        detection=DetectionParityRecord(**parity.detection.to_dict()) if parity.detection else None)


def output_specs(graph: Graph, detector: DetectorSpec | None = None) -> list[OutputSpec]:
    """The model's outputs as the artifacts name them, at batch 1, in order (a detector's as ``detector`` says)."""
    meanings = detector.meanings() if detector is not None else {}
    return [OutputSpec(name=name, shape=list(graph.shapes[tensor]),
                       meaning=meanings.get(name) or ("raw logits" if is_class_scores(graph.shapes[tensor]) else
                                                      f"raw output (rank {len(graph.shapes[tensor])}, NCHW for a map)"))
            for tensor, name in graph.artifact_names.items()]


def artifact_record(stage: Path, artifact: Artifact) -> ArtifactRecord:
    return ArtifactRecord(
        target=artifact.target.value,
        precision=artifact.precision.value,
        file=str(artifact.path),
        runtime=artifact.runtime,
        settings=artifact.settings,
        io=ArtifactIO(**artifact.io),
        parity=parity_record(artifact.parity),
        latency=LatencyRecord(**artifact.latency.to_dict()) if artifact.latency else None,
        seconds_to_export=round(artifact.seconds_to_export, 2),
        sha256=sha256_of(stage / artifact.path),
        size_bytes=artifact_size(stage / artifact.path),
    )


def write_manifest(stage: Path, options: ConvertOptions, model: LoadedModel, graph: Graph,
                   artifacts: list[Artifact], evaluation: Evaluation, calib: SampleSet | None,
                   eval_set: SampleSet | None, quantized: QuantizedGraph | None,
                   seconds: dict[str, float], failures: list[Failure], golden: Golden) -> Manifest:
    config = model.config
    outputs = output_specs(graph, options.detector)
    scores = [spec for spec in outputs if spec.meaning == "raw logits"]
    classes = scores[0].shape[1] if len(scores) == 1 else 0  # 0: no single class-score output
    manifest = Manifest(
        schema=SCHEMA_FILE,
        manifest_version=MANIFEST_VERSION,
        model=ModelInfo(
            name=model.name,
            source_file=model.source.name,
            source_sha256=model.source_sha256,
            format=model.format.value,
            arch=config.arch.value if config else None,
            width_mult=config.width_mult if config else None,
            num_classes=classes,
            ops=graph.op_histogram(),
        ),
        input=InputSpec(name=INPUT_NAME, shape=list(options.preprocess.input_shape(batch=1)), dtype="float32",
                        layout="NCHW"),
        output=outputs[0],
        preprocess=PreprocessRecord(**options.preprocess.to_dict()),
        labels_file="labels.txt" if (stage / "labels.txt").exists() else None,
        quantization=QuantizationInfo(
            recipe={**options.recipe.to_dict(), **quantized.recipe},  # the quantiser adds samples and time
            float_nodes=sorted(quantized.float_nodes),
            calibration_set=sample_set_record(calib),
            channel_scales_file="int8_channel_scales.npz" if quantized.channel_scales else None,
            mixed_precision=mixed_precision_record(quantized.mixed_precision),
        ) if quantized is not None else None,
        evaluation=EvaluationInfo(inputs=evaluation.description, set=sample_set_record(eval_set)),
        artifacts=[artifact_record(stage, artifact) for artifact in artifacts],
        failures=list(failures),  # targets that failed to convert (only with --keep-going)
        parity_passed=all(a.parity.passed for a in artifacts),
        golden=golden,
        reproducibility=REPRODUCIBILITY,
        seconds=seconds,  # wall time per pipeline stage
        tool_versions=tool_versions(),
        outputs=outputs,
        detection=detection_record(options.detector, {o.name: tuple(o.shape) for o in outputs})
        if options.detector else None,
    )
    manifest.write(stage)
    return manifest


def is_mdeploy_output(folder: Path) -> bool:
    """Whether ``folder`` is an output folder mdeploy wrote (its manifest.json says so): only such a folder is
    replaced by ``convert --overwrite``."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (isinstance(manifest, dict) and manifest.get("$schema") == "manifest.schema.json"
            and "manifest_version" in manifest and isinstance(manifest.get("tool_versions"), dict)
            and "mdeploy" in manifest["tool_versions"])


def fmt(value: Any, spec: str) -> str:
    """A metric formatted with ``spec``, or as given when JSON spelled it out ("inf", "nan")."""
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def percent(value: Any, suffix: str = "") -> str:
    return "-" if value is None else fmt(value * 100 if isinstance(value, (int, float)) else value, ".1f") + "%" + suffix


def summary_rows(manifest: Manifest) -> list[list[str]]:
    """One row per artifact, or per artifact and output when the model has several. The top-1 column holds
    per-pixel arg-max agreement ("px") for a segmentation map, "-" for other dense outputs."""
    rows = []
    for artifact in manifest.artifacts:
        latency = artifact.latency
        p50: Any = latency.p50_ms if latency and latency.p50_ms is not None else \
            "n/a (reference executor)" if latency is None or not latency.to_dict() else "-"
        parts = [(f"{artifact.file} {o.output}", o.metrics, o.passed, o.failures) for o in artifact.parity.outputs or ()]
        for name, metrics, passed, failures in parts or [(artifact.file, artifact.parity.metrics,
                                                          artifact.parity.passed, artifact.parity.failures)]:
            top1 = percent(metrics.top1_agreement) if metrics.top1_agreement is not None \
                else percent(metrics.pixel_agreement, " px")
            rows.append([
                name,
                artifact.runtime,
                fmt(metrics.max_abs_error, ".2e"),
                fmt(metrics.snr_db, ".1f"),
                top1,
                percent(metrics.top5_agreement),
                fmt(p50, ".2f"),
                f"{artifact.size_bytes / 1e6:.1f} MB",
                "pass" if passed else "FAIL: " + "; ".join(failures),
            ])
    return rows


HEADERS = ["artifact", "runtime", "max abs err", "SNR dB", "top-1", "top-5", "p50 ms", "size", "parity"]


def manifest_limit_notes(manifest: Manifest) -> list[str]:
    return limit_notes([artifact.to_dict() for artifact in manifest.artifacts])


def console_table(manifest: Manifest) -> Table:
    notes = manifest_limit_notes(manifest)
    table = Table(title=f"{manifest.model.name}: parity vs PyTorch fp32 on {manifest.evaluation.inputs}",
                  caption="limits: " + "; ".join(notes) if notes else None, caption_justify="left")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("artifact", "runtime", "parity") else "right")
    for row in summary_rows(manifest):
        table.add_row(*row, style=None if row[-1] == "pass" else "red")
    return table


DETECTION_HEADERS = ["artifact", "top-k agreement", "box err mean px", "box err max px", "score max err"]


def detection_rows(manifest: Manifest) -> list[list[str]]:
    """One row per artifact of a detector (``convert --detector``): its boxes and scores decoded with the anchors
    against PyTorch's (mdeploy.detection.detection_metrics)."""
    rows = []
    for artifact in manifest.artifacts:
        found = artifact.parity.detection
        if found is not None:
            rows.append([artifact.file, percent(found.topk_agreement), fmt(found.box_error_px_mean, ".3g"),
                         fmt(found.box_error_px_max, ".3g"), fmt(found.score_max_abs_error, ".2e")])
    return rows


def detection_caption(manifest: Manifest) -> str:
    detection = manifest.detection
    assert detection is not None
    limits = "; ".join(f"{precision}: {', '.join(f'{k} {v:g}' for k, v in values.items())}"
                       for precision, values in detection.limits.items())
    return (f"PyTorch's top-{detection.top_k} (anchor, class) pairs by {detection.score_function} score; box error: "
            f"max |corner difference| of the decoded boxes of their anchors, in input pixels; "
            + (f"limits {limits}" if limits else "reported only (no limits set: see README, Detectors)"))


def detection_table(manifest: Manifest) -> Table | None:
    """The console table of :func:`detection_rows`, None when the model was not converted as a detector."""
    if manifest.detection is None:
        return None
    table = Table(title=f"{manifest.model.name}: detections vs PyTorch fp32 ({manifest.detection.anchors} anchors)",
                  caption=detection_caption(manifest), caption_justify="left")
    for header in DETECTION_HEADERS:
        table.add_column(header, justify="left" if header == "artifact" else "right")
    for row in detection_rows(manifest):
        table.add_row(*row)
    return table


MIXED_SOURCES_SHOWN = 4  # SUMMARY.md names the first grids the search removed (the largest noise); the manifest all


def mixed_precision_record(choice: Any) -> MixedPrecisionRecord | None:
    """A ``mdeploy.quantize.mixed.MixedPrecision`` as the manifest records it (None: full int8 was asked for)."""
    if choice is None:
        return None
    layers = [FloatLayerRecord(c.tensor, c.source, list(c.nodes), c.noise_share) for c in choice.choices]
    return MixedPrecisionRecord(choice.target_snr_db, choice.samples, json_number(choice.int8_snr_db),
                                json_number(choice.snr_db), choice.reached, choice.float_macs_share,
                                json_number(choice.ceiling_db), layers)


def mixed_precision_summary(record: MixedPrecisionRecord) -> str:
    """The console's and SUMMARY.md's line on the layers kept in float."""
    if not record.layers and not record.reached:
        return (f"Mixed precision: the {record.target_snr_db:g} dB target is out of reach: full int8 gives "
                f"{float(record.int8_snr_db):.1f} dB on {record.samples} held-back calibration samples and even every "
                f"layer in float about {float(record.ceiling_db):.1f} dB (the int8 grids of the model's I/O stay), so "
                "full int8 was kept.")
    if not record.layers:
        return (f"Mixed precision: not needed: full int8 reached {float(record.int8_snr_db):.1f} dB on "
                f"{record.samples} held-back calibration samples (target {record.target_snr_db:g} dB).")
    nodes = sorted({node for layer in record.layers for node in layer.nodes})
    shown = MIXED_SOURCES_SHOWN
    sources = ", ".join(f"`{layer.source}`" for layer in record.layers[:shown])
    sources += f" and {len(record.layers) - shown} more" if len(record.layers) > shown else ""
    verdict = "reaching" if record.reached else "short of"
    return (f"Mixed precision: {len(nodes)} layers compute in float ({record.float_macs_share:.0%} of the "
            f"multiply-accumulates) around the grids of {sources}: {float(record.snr_db):.1f} dB on {record.samples} "
            f"held-back calibration samples against {float(record.int8_snr_db):.1f} dB in full int8, {verdict} the "
            f"{record.target_snr_db:g} dB target (manifest.json: quantization.mixed_precision).")


def write_summary(stage: Path, manifest: Manifest) -> None:
    model = manifest.model
    lines = [
        f"# {model.name} — mdeploy conversion",
        "",
        f"Source: `{model.source_file}` ({model.format}), sha256 `{model.source_sha256[:16]}…`.",
        f"Input: `{manifest.input.shape}` float32 NCHW, preprocessing: `{json.dumps(manifest.preprocess.to_dict())}`.",
        f"Parity vs PyTorch fp32 on {manifest.evaluation.inputs}: "
        f"**{'PASSED' if manifest.parity_passed else 'FAILED'}**.",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(manifest)]
    notes = manifest_limit_notes(manifest)
    lines += ["", "Limits:", *(f"- {note}" for note in notes)] if notes else []
    if manifest.quantization is not None and manifest.quantization.mixed_precision is not None:
        lines += ["", mixed_precision_summary(manifest.quantization.mixed_precision)]
    if manifest.detection is not None:
        lines += ["", "Detections (boxes decoded with `anchors.npy`):", "",
                  "| " + " | ".join(DETECTION_HEADERS) + " |", "|" + "---|" * len(DETECTION_HEADERS),
                  *("| " + " | ".join(row) + " |" for row in detection_rows(manifest)), "",
                  detection_caption(manifest) + "."]
    lines += ["", "Latency: batch 1, median of timed runs after warm-up on this machine's CPU "
              f"({platform.machine()}); not a phone measurement.", ""]
    (stage / "SUMMARY.md").write_text("\n".join(lines), encoding="utf-8")
