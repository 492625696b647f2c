"""The records a run passes between its stages: what the user asked for (model, data, limits, targets) and what
each artifact came out as. Frozen where they are options; every command and the manifest writer share them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.bundle.golden import GoldenOutput
from mdeploy.calibration.config import QuantRecipe
from mdeploy.calibration.preprocess import Preprocess
from mdeploy.converters import REGISTRY, Converter
from mdeploy.detection import DetectorSpec
from mdeploy.latency import Latency
from mdeploy.graph.ir import only_output
from mdeploy.parity import Float32Noise, ParityResult, Thresholds
from mdeploy.types import Precision, Target
from mdeploy.zoo import Arch


@dataclass(frozen=True)
class ModelSource:
    path: Path
    arch: Arch | None = None
    trust_pickle: bool = False


@dataclass(frozen=True)
class DataOptions:
    calib: Path | None = None
    eval: Path | None = None
    calib_size: int = 200
    eval_size: int = 500
    seed: int = 0


@dataclass(frozen=True)
class Provenance:
    """Who made the model and on what terms: written into every artifact's own metadata."""

    author: str = ""
    license: str = ""
    description: str = ""
    version: str = ""

    def entries(self) -> dict[str, str]:
        return {key: value for key, value in self.__dict__.items() if value}


@dataclass(frozen=True)
class Limits:
    """Parity thresholds per precision: ``base`` (a config file's, else the defaults) overridden by flags."""

    max_abs_error: float | None = None
    min_snr_db: float | None = None
    min_top1: float | None = None
    base: Mapping[Precision, Thresholds] | None = None

    def thresholds(self, precision: Precision) -> Thresholds:
        start = (self.base or {}).get(precision) or Thresholds.default(precision)
        return start.override(
            max_abs_error=self.max_abs_error if precision is Precision.fp32 else None,
            min_snr_db=self.min_snr_db if precision is Precision.int8 else None,
            min_top1=self.min_top1 if precision is Precision.int8 else None,
        )


@dataclass(frozen=True)
class ConvertOptions:
    model: ModelSource
    out: Path
    targets: tuple[Target, ...] = (Target.onnx,)
    int8: bool = False
    data: DataOptions = DataOptions()
    preprocess: Preprocess = field(default_factory=Preprocess.imagenet)
    labels: Path | None = None
    provenance: Provenance = Provenance()
    recipe: QuantRecipe = field(default_factory=QuantRecipe.default)
    limits: Limits = Limits()
    overwrite: bool = False
    overwrite_any: bool = False  # replace --out even if mdeploy did not write it (never if it holds an input)
    threads: int = 1
    latency_runs: int = 50
    keep_going: bool = False  # a target that fails to convert is recorded in the manifest; the others still ship
    # Configured converters (e.g. TfliteConverter(io="uint8")) replacing the registry's defaults for their target.
    converters: tuple[Converter, ...] = ()
    detector: DetectorSpec | None = None  # --detector: which outputs are a detector's boxes and scores, its anchors

    def converter(self, target: Target) -> Converter:
        return next((c for c in self.converters if c.target == target), REGISTRY[target])


@dataclass
class Artifact:
    target: Target
    precision: Precision
    path: Path  # relative to the output folder
    runtime: str
    parity: ParityResult
    latency: Latency | None
    seconds_to_export: float
    settings: dict[str, Any] = field(default_factory=dict)  # the converter's export choices
    io: dict[str, Any] = field(default_factory=dict)  # the artifact's inputs and outputs, quantisation included
    golden: GoldenOutput | None = None  # its outputs on the first evaluation inputs (the bundle's golden vectors)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.value,
            "precision": self.precision.value,
            "file": str(self.path),
            "runtime": self.runtime,
            "settings": self.settings,
            "io": self.io,
            "parity": self.parity.to_dict(),
            "latency": self.latency.to_dict() if self.latency else None,
            "seconds_to_export": round(self.seconds_to_export, 2),
        }


@dataclass
class Evaluation:
    """The inputs parity runs on and PyTorch's outputs for them."""

    inputs: np.ndarray
    references: tuple[np.ndarray, ...]  # every output of the model, in its order
    description: str
    paths: list[str]
    float32_noise: Float32Noise | None = None  # measured when a limit needs it

    @property
    def reference(self) -> np.ndarray:
        """The only output's reference (a classifier's logits)."""
        return only_output(self.references, "a one-output stage (the demo's labels)")
