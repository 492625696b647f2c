"""The small interface every target implements, and what they share.

Adding a target means one new module in ``converters/`` implementing :class:`Converter` and one line in
``converters/__init__.py``'s registry.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mdeploy.errors import BadInputError
from mdeploy.graph.ir import Graph
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.types import Precision, Runner, Target


@dataclass(frozen=True)
class ArtifactInfo:
    """What the artifact's own metadata carries, so an app team needs nothing else."""

    model_name: str
    preprocess: dict[str, Any]
    labels: tuple[str, ...] = ()
    producer_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)


class Converter(Protocol):
    target: Target
    suffix: str  # file suffix of the artifact, e.g. ".onnx"
    runtime_name: str  # what runs it in parity checks, named in every report
    requires: tuple[str, ...]  # importable modules it needs

    @property
    def times_latency(self) -> bool:
        """False where the runner is a reference executor, whose timings say nothing about a device."""

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        """Write the artifact: fp32 when ``quantized`` is None, int8 otherwise."""

    def runner(self, path: Path, threads: int = 1) -> Runner:
        """Load the artifact into its runtime."""

    def inspect(self, path: Path) -> dict[str, Any]:
        """Inputs, outputs, op histogram, size and quantisation parameters of an artifact."""

    def settings(self, precision: Precision) -> dict[str, Any]:
        """The export choices an artifact of this precision is written with (recorded in the manifest)."""


def require_content(path: Path, what: str) -> None:
    """A zero-byte artifact (an interrupted write or copy) gets its own message, not the parser's."""
    if Path(path).is_file() and Path(path).stat().st_size == 0:
        raise BadInputError(f"{path} is empty (0 bytes), not {what}: the conversion or the copy was interrupted; "
                            "convert again")


def artifact_files(path: Path) -> list[Path]:
    """The files of an artifact: itself, or every file of a package directory (.mlpackage), in a stable order."""
    return [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())


def artifact_size(path: Path) -> int:
    return sum(p.stat().st_size for p in artifact_files(path))


def missing_modules(converter: Converter) -> list[str]:
    return [name for name in converter.requires if importlib.util.find_spec(name) is None]
