"""``mdeploy check``: parity of existing artifacts (one file or a whole output folder) against the PyTorch model."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from calibration.preprocess import Preprocess
from converters import REGISTRY, Precision, Target
from mdeploy.errors import BadInputError
from mdeploy.loading import load_model
from mdeploy.parity import ParityResult, judge, run_batches, torch_runner
from mdeploy.pipeline import DataOptions, Limits, ModelSource, load_samples
from mdeploy.ui import Reporter, SilentReporter


@dataclass(frozen=True)
class CheckOptions:
    artifact: Path  # an artifact file or an output folder with manifest.json
    model: ModelSource
    data: DataOptions
    preprocess: Preprocess | None = None  # None: read it from the manifest or the artifact's metadata
    limits: Limits = Limits()
    threads: int = 1


@dataclass(frozen=True)
class CheckedArtifact:
    path: Path
    target: Target
    precision: Precision
    runtime: str
    parity: ParityResult

    def to_dict(self) -> dict[str, Any]:
        return {"file": str(self.path), "target": self.target.value, "precision": self.precision.value,
                "runtime": self.runtime, "parity": self.parity.to_dict()}


def target_of(path: Path) -> Target:
    for target, converter in REGISTRY.items():
        if path.name.endswith(converter.suffix):
            return target
    known = ", ".join(c.suffix for c in REGISTRY.values())
    raise BadInputError(f"{path} is not an artifact mdeploy knows (expected a file ending in {known})")


def precision_of(path: Path) -> Precision:
    for precision in Precision:
        if f".{precision.value}." in path.name:
            return precision
    raise BadInputError(f"cannot tell the precision of {path.name}: mdeploy names artifacts NAME.fp32.* or NAME.int8.*")


def artifacts_to_check(artifact: Path) -> tuple[list[Path], dict[str, Any] | None]:
    if artifact.is_dir() and not any(artifact.name.endswith(c.suffix) for c in REGISTRY.values()):
        manifest_path = artifact / "manifest.json"
        if not manifest_path.is_file():
            raise BadInputError(f"{artifact} has no manifest.json: pass an mdeploy output folder or one artifact file")
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            files = [artifact / entry["file"] for entry in manifest["artifacts"]]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise BadInputError(f"{manifest_path} is not a valid mdeploy manifest ({err}): convert again") from err
        return files, manifest
    if not artifact.exists():
        raise BadInputError(f"{artifact} does not exist: pass an artifact file or an mdeploy output folder")
    manifest_path = artifact.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8")) if manifest_path.is_file() else None
    return [artifact], manifest


def resolve_preprocess(options: CheckOptions, manifest: dict[str, Any] | None, files: list[Path]) -> Preprocess:
    if options.preprocess is not None:
        return options.preprocess
    if manifest is not None and "preprocess" in manifest:
        return Preprocess.from_dict(manifest["preprocess"])
    embedded = embedded_preprocess(files[0])
    if embedded is not None:
        return embedded
    raise BadInputError("no manifest.json beside the artifact and no preprocessing in its metadata: "
                        "pass --input-size and --mean/--std")


def embedded_preprocess(path: Path) -> Preprocess | None:
    """The preprocessing mdeploy writes into every artifact's own metadata."""
    try:
        metadata = REGISTRY[target_of(path)].inspect(path).get("metadata", {})
        return Preprocess.from_dict(json.loads(metadata["mdeploy.preprocess"]))
    except (KeyError, ValueError, TypeError, BadInputError):
        return None


def check(options: CheckOptions, reporter: Reporter | None = None) -> list[CheckedArtifact]:
    reporter = reporter or SilentReporter()
    if options.data.eval is None:
        raise BadInputError("check needs real inputs: pass --eval FOLDER (images or .npy/.npz tensors)")
    files, manifest = artifacts_to_check(options.artifact)
    for path in files:
        if not path.exists():
            raise BadInputError(f"{path} is listed in the manifest but missing: convert again")
    preprocess = resolve_preprocess(options, manifest, files)
    model = load_model(options.model.path, arch=options.model.arch, allow_pickle=options.model.trust_pickle)
    samples = load_samples(options.data.eval, preprocess, options.data.eval_size, options.data.seed, "evaluation",
                           reporter, 1)
    inputs = samples.to_array()
    with reporter.track("PyTorch reference", len(inputs)) as advance:
        reference = run_batches(torch_runner(model.module), inputs, advance)
    description = f"{len(inputs)} samples from {options.data.eval}"
    results = []
    for path in files:
        target, precision = target_of(path), precision_of(path)
        converter = REGISTRY[target]
        try:
            run = converter.runner(path, threads=options.threads)
        except Exception as err:  # the runtime's own error types; the user needs to know the file is unusable
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadInputError(f"{path} cannot be loaded by {converter.runtime_name} ({first_line}): convert again") from err
        with reporter.track(f"{path.name} on {converter.runtime_name}", len(inputs)) as advance:
            outputs = run_batches(run, inputs, advance)
        parity = judge(reference, outputs, options.limits.thresholds(precision), description)
        results.append(CheckedArtifact(path, target, precision, converter.runtime_name, parity))
    return results
