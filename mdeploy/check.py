"""``mdeploy check``: parity of existing artifacts (one file or a whole output folder) against the PyTorch model,
agreement between them, a per-layer diagnosis where parity fails (or on request), and a regression gate against
an earlier report. The result is one JSON-ready report (``CheckReport.to_dict``) that every report format reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.calibration.preprocess import Preprocess
from mdeploy.converters import REGISTRY
from mdeploy.types import Precision, Target
from mdeploy.agreement import AgreementMatrix, agreement
from mdeploy.baseline import compare_with_baseline
from mdeploy.artifacts import inspect_artifact, precision_of, read_manifest, target_of
from mdeploy.bench import BenchOptions, bench_folder
from mdeploy.config import Tolerances
from mdeploy.errors import BadInputError, ConversionError, MdeployError, first_line
from mdeploy.graph.ir import Graph
from mdeploy.loading import LoadedModel, load_model
from mdeploy.manifest import Manifest
from mdeploy.parity import Float32Noise, ParityResult, judge, judge_outputs, run_batches_outputs, torch_outputs
from mdeploy.paths import checksum_mismatches, manifest_paths, resolve_inside
from mdeploy.records import DataOptions, Limits, ModelSource
from mdeploy.samples import load_samples
from mdeploy.quantize.equalize import apply_scales
from mdeploy.ui import Reporter, SilentReporter

REPORT_VERSION = "1.0"
DIAGNOSIS_SAMPLES = 8


@dataclass(frozen=True)
class CheckOptions:
    artifact: Path  # an artifact file or an output folder with manifest.json
    model: ModelSource
    data: DataOptions
    preprocess: Preprocess | None = None  # None: read it from the manifest or the artifact's metadata
    limits: Limits = Limits()
    threads: int = 1
    explain: bool = False  # diagnose every artifact, not only the failing ones
    baseline: Path | None = None
    tolerances: Tolerances = Tolerances()
    bench: BenchOptions | None = None  # also time the folder's artifacts (into the same report)
    arm_cpus: tuple[str, ...] = ()  # also run the ONNX/TFLite artifacts on these emulated ARM CPU models
    precision: Precision | None = None  # None: from the file name (NAME.fp32.*, NAME.int8.*), else from the file


@dataclass(frozen=True)
class CheckedArtifact:
    path: Path
    target: Target
    precision: Precision
    runtime: str
    parity: ParityResult
    diagnosis: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "target": self.target.value, "precision": self.precision.value,
                "runtime": self.runtime, "parity": self.parity.to_dict(), "diagnosis": self.diagnosis}


@dataclass(frozen=True)
class CheckReport:
    model: LoadedModel
    inputs: str
    artifacts: list[CheckedArtifact]
    agreement: AgreementMatrix | None
    baseline: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    arm: dict[str, Any] | None = None

    @property
    def arm_passed(self) -> bool:
        return self.arm is None or all(r["parity"]["passed"] for r in self.arm["results"])

    @property
    def passed(self) -> bool:
        baseline_passed = self.baseline is None or self.baseline["passed"]
        return all(a.parity.passed for a in self.artifacts) and baseline_passed and self.arm_passed

    def to_dict(self) -> dict[str, Any]:
        return {
            "report_version": REPORT_VERSION,
            "kind": "check",
            "passed": self.passed,
            "model": {"file": self.model.source.name, "sha256": self.model.source_sha256, "name": self.model.name},
            "inputs": self.inputs,
            "artifacts": [a.to_dict() for a in self.artifacts],
            "agreement": self.agreement.to_dict() if self.agreement else None,
            "baseline": self.baseline,
            "bench": self.bench,
            "arm": self.arm,
        }


def artifacts_to_check(artifact: Path) -> tuple[list[Path], Manifest | None]:
    """The artifacts to check and the manifest beside them. Every path the manifest names must stay inside its
    folder, and the artifacts must still be what was converted (the folder's ``SHA256SUMS``, when it has one)."""
    if artifact.is_dir() and not any(artifact.name.endswith(c.suffix) for c in REGISTRY.values()):
        manifest_path = artifact / "manifest.json"
        if not manifest_path.is_file():
            raise BadInputError(f"{artifact} has no manifest.json: pass an mdeploy output folder or one artifact file")
        manifest = read_manifest(manifest_path)
        listed = manifest_paths(artifact, manifest)
        verify_checksums(artifact, [name for name, path in listed.items() if path.exists()])
        return list(listed.values()), manifest
    if not artifact.exists():
        raise BadInputError(f"{artifact} does not exist: pass an artifact file or an mdeploy output folder")
    manifest_path = artifact.parent / "manifest.json"
    if not manifest_path.is_file():
        return [artifact], None
    manifest = read_manifest(manifest_path)
    listed = manifest_paths(artifact.parent, manifest)
    if artifact.name in listed:  # one artifact of an output folder: it too must be what was converted
        verify_checksums(artifact.parent, [artifact.name])
    return [artifact], manifest


def verify_checksums(folder: Path, names: list[str]) -> None:
    mismatches = checksum_mismatches(folder, names)
    if mismatches:
        listed = "; ".join(f"{name}: {reason}" for name, reason in mismatches.items())
        raise BadInputError(f"{folder} holds artifacts that are not what mdeploy convert wrote ({listed}): convert "
                            "again, or restore them (if you changed them on purpose, update SHA256SUMS)")


def resolve_preprocess(options: CheckOptions, manifest: Manifest | None, files: list[Path]) -> Preprocess:
    if options.preprocess is not None:
        return options.preprocess
    if manifest is not None:
        return Preprocess.from_dict(manifest.preprocess.to_dict())
    embedded = embedded_preprocess(files[0])
    if embedded is not None:
        return embedded
    raise BadInputError("no manifest.json beside the artifact and no preprocessing in its metadata: "
                        "pass --input-size and --mean/--std")


def embedded_preprocess(path: Path) -> Preprocess | None:
    """The preprocessing mdeploy writes into every artifact's own metadata."""
    metadata = inspect_artifact(path).get("metadata", {})
    try:
        return Preprocess.from_dict(json.loads(metadata["mdeploy.preprocess"]))
    except (KeyError, ValueError, TypeError, BadInputError):
        return None


def run_artifact(path: Path, inputs: np.ndarray, threads: int, reporter: Reporter) -> dict[str, np.ndarray]:
    """Every output of the artifact over ``inputs``, by its name, in the artifact's order."""
    converter = REGISTRY[target_of(path)]
    try:
        run = converter.outputs_runner(path, threads=threads)
    except MdeployError:
        raise
    except Exception as err:  # the runtime's own error types; the user needs to know the file is unusable
        raise BadInputError(f"{path} cannot be loaded by {converter.runtime_name} ({first_line(err)}): convert again") \
            from err
    names: list[str] = []

    def outputs(batch: np.ndarray) -> tuple[np.ndarray, ...]:
        returned = run(batch)
        names[:] = list(returned)
        return tuple(returned.values())

    try:
        with reporter.track(f"{path.name} on {converter.runtime_name}", len(inputs)) as advance:
            values = run_batches_outputs(outputs, inputs, advance)
    except MemoryError:
        raise
    except Exception as err:
        raise ConversionError(f"{path.name} failed while running on {converter.runtime_name}: {first_line(err)}") \
            from err
    return dict(zip(names, values, strict=True))


def artifact_graph(graph: Graph, path: Path, precision: Precision, manifest: Manifest | None) -> Graph | None:
    """For an int8 artifact quantised with equalisation: the rescaled float graph it was written from."""
    record = manifest.quantization if manifest is not None else None
    scales_file = record.channel_scales_file if record is not None else None
    if precision is not Precision.int8 or not scales_file:
        return None
    scales_path = resolve_inside(path.parent, scales_file, f"quantization.channel_scales_file of "
                                                           f"{path.parent / 'manifest.json'}")
    if not scales_path.is_file():
        return None
    with np.load(scales_path) as scales:
        return apply_scales(graph, {name: scales[name] for name in scales.files})


def diagnosis_of(graph: Graph, path: Path, precision: Precision, inputs: np.ndarray, manifest: Manifest | None,
                 reporter: Reporter) -> dict[str, Any]:
    """``graph``: the PyTorch model's IR, the float reference every layer is compared with."""
    from mdeploy.diagnose import diagnose

    target = target_of(path)
    try:
        found = diagnose(graph, path, target, inputs[:DIAGNOSIS_SAMPLES], REGISTRY[target].runtime_name,
                         artifact_graph(graph, path, precision, manifest))
    except BadInputError as err:  # a target without per-layer taps: say so in the report
        return {"artifact": path.name, "unavailable_reason": str(err)}
    reporter.step(f"diagnosis of {path.name}: {found.summary()}")
    return found.to_dict()


def check(options: CheckOptions, reporter: Reporter | None = None) -> CheckReport:
    reporter = reporter or SilentReporter()
    if options.data.eval is None:
        raise BadInputError("check needs real inputs: pass --eval FOLDER (images or .npy/.npz tensors)")
    files, manifest = artifacts_to_check(options.artifact)
    for path in files:
        if not path.exists():
            raise BadInputError(f"{path} is listed in the manifest but missing: convert again")
    if options.bench is not None and (manifest is None or not options.artifact.is_dir()):
        raise BadInputError("--bench times an output folder: pass the folder mdeploy convert wrote, not one file")
    preprocess = resolve_preprocess(options, manifest, files)
    precisions = {path: precision_of(path, options.precision) for path in files}  # may read the files: before the work
    model = load_model(options.model.path, arch=options.model.arch, allow_pickle=options.model.trust_pickle)
    samples = load_samples(options.data.eval, preprocess, options.data.eval_size, options.data.seed, "evaluation",
                           reporter, 1)
    inputs = samples.to_array()
    with reporter.track("PyTorch reference", len(inputs)) as advance:
        references = run_batches_outputs(torch_outputs(model.module), inputs, advance)
    if options.arm_cpus and len(references) > 1:
        raise BadInputError(f"--platform linux-arm64 runs models with one output so far, and "
                            f"{options.model.path.name} has {len(references)}: leave --platform out")
    description = f"{len(inputs)} samples from {options.data.eval}"
    noise = Float32Noise(model.module, inputs, references)
    outputs: dict[str, tuple[np.ndarray, ...]] = {}
    results = []
    graph: Graph | None = None  # the model's IR, traced once and only if a diagnosis needs it
    for path in files:
        named = run_artifact(path, inputs, options.threads, reporter)
        outputs[path.name] = tuple(named.values())
        precision = precisions[path]
        parity = judge_outputs(references, outputs[path.name], tuple(named), options.limits.thresholds(precision),
                               description, noise)
        diagnosis = None
        if options.explain or not parity.passed:
            if graph is None:
                from mdeploy.graph.from_torch import graph_from_torch

                graph = graph_from_torch(model.module, preprocess.input_shape(batch=1))
            diagnosis = diagnosis_of(graph, path, precision, inputs, manifest, reporter)
        results.append(CheckedArtifact(path, target_of(path), precision, REGISTRY[target_of(path)].runtime_name,
                                       parity, diagnosis))
    bench = None
    if options.bench is not None:
        bench = bench_folder(options.bench, reporter)
    arm = None
    if options.arm_cpus:
        from mdeploy.arm.parity import arm_parity

        def judge_one(path: Path, arm_outputs: np.ndarray, inputs_description: str) -> ParityResult:
            return judge(references[0][: len(arm_outputs)], arm_outputs,
                         options.limits.thresholds(precisions[path]), inputs_description)

        arm = arm_parity(files, inputs, options.arm_cpus, judge_one, reporter.step)
    report = CheckReport(model, description, results, agreement(outputs), bench=bench, arm=arm)
    if options.baseline is not None:
        report = replace(report, baseline=compare_with_baseline(report.to_dict(), options.baseline,
                                                                options.tolerances))
    return report
