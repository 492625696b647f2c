"""The small interface every target implements, and what they share.

Adding a target means one new module in ``converters/`` implementing :class:`Converter` (subclass
:class:`ConverterBase` for the defaults) and one line in ``converters/__init__.py``'s registry: its CLI options,
doctor's line, per-layer taps, golden tolerance, app README and bundle verifier all come from the converter, so no
other file changes (``tests/test_dummy_target.py`` proves it).
"""

from __future__ import annotations

import importlib.util
import os
import string
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from mdeploy.errors import BadInputError
from mdeploy.graph.ir import Graph
from mdeploy.manifest import GoldenTolerance, Manifest
from mdeploy.quantize.params import QuantizedGraph
from mdeploy.types import OUTPUT_NAME, OutputsRunner, Precision, Runner, Target

T = TypeVar("T")

# What a one-output runner serves (``Converter.runner``); a multi-output artifact there is a one-line bad input.
ONE_OUTPUT_STAGE = "parity, check and bench (top-1/top-5 against PyTorch)"
FP32_GOLDEN_TOLERANCE = 1e-4  # another CPU's float kernels sum in another order
INT8_GOLDEN_TOLERANCE_LSB = 1.01  # ARM and x86 int8 kernels may round one output step apart (DESIGN.md §5)


@dataclass(frozen=True)
class ArtifactInfo:
    """What the artifact's own metadata carries, so an app team needs nothing else."""

    model_name: str
    preprocess: dict[str, Any]
    labels: tuple[str, ...] = ()
    producer_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class CliOption:
    """One option a target adds to ``mdeploy convert`` (``name`` is the parameter; the flag is ``--name-with-dashes``).
    ``annotation`` is the value's type as typer reads it (an Enum for choices, ``bool`` for a switch)."""

    name: str
    annotation: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


@dataclass(frozen=True)
class Availability:
    """Doctor's line for a target."""

    status: str  # "unavailable", "convert + check" or "convert + check + bench"
    note: str


@dataclass(frozen=True)
class ReadmeParts:
    """The sections every app README shares, rendered once from the manifest by the bundle."""

    contract: str  # the preprocessing contract and what the outputs mean
    golden: str  # how to use golden/ ("" when there is none)
    files: str  # the bundle's files


@dataclass(frozen=True)
class AppReadme:
    file: str  # e.g. "README_android.md"
    text: str


@dataclass(frozen=True)
class BundleRunner:
    """How the bundle's ``verify_bundle.py`` runs this target's artifacts with NumPy and the runtime only.

    ``run(path, inputs) -> {output name: array}`` (or the array, for a one-output target) and the ``helpers`` it
    calls are plain module-level functions whose source is copied into the verifier (so they import inside their
    bodies and use nothing of mdeploy); ``run`` None means the artifacts cannot run there, and ``why_not`` says
    why."""

    runtime: str
    run: Callable[[Path, np.ndarray], dict[str, np.ndarray] | np.ndarray] | None
    why_not: str = ""
    helpers: tuple[Callable[..., Any], ...] = ()


class Converter(Protocol):
    target: Target
    suffix: str  # file suffix of the artifact, e.g. ".onnx"
    runtime_name: str  # what runs it in parity checks, named in every report
    requires: tuple[str, ...]  # importable modules it needs
    packages: tuple[str, ...]  # the pip distributions whose versions the manifest and doctor record
    taps_runtime: str | None  # what runs the artifact for a per-layer diagnosis; None: no taps for this target
    taps_unavailable: str  # why not, when taps_runtime is None (the diagnosis says it instead of a table)
    arm_format: str | None  # the ARM guest runner's name for this format; None: not run under emulation
    arm_unavailable: str  # why not, when arm_format is None (reports name it beside the skipped file)

    @property
    def times_latency(self) -> bool:
        """False where the runner is a reference executor, whose timings say nothing about a device."""

    def export(self, graph: Graph, quantized: QuantizedGraph | None, path: Path, info: ArtifactInfo) -> None:
        """Write the artifact: fp32 when ``quantized`` is None, int8 otherwise."""

    def runner(self, path: Path, threads: int = 1) -> Runner:
        """Load a one-output artifact into its runtime (BadInputError for several, naming ONE_OUTPUT_STAGE)."""

    def outputs_runner(self, path: Path, threads: int = 1) -> OutputsRunner:
        """Load the artifact into its runtime: every output by its artifact name, in the model's order."""

    def inspect(self, path: Path) -> dict[str, Any]:
        """Inputs, outputs, op histogram, size and quantisation parameters of an artifact."""

    def settings(self, precision: Precision) -> dict[str, Any]:
        """The export choices an artifact of this precision is written with (recorded in the manifest)."""

    def cli_options(self) -> tuple[CliOption, ...]:
        """The options this target adds to ``mdeploy convert``."""

    def configured(self, values: Mapping[str, Any], int8: bool) -> Converter:
        """This converter with the user's values of :meth:`cli_options` (raises BadInputError on a bad combination)."""

    def availability(self) -> Availability:
        """What works here and, if not, why and the fix."""

    def layer_taps(self, path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
        """Every IR tensor the artifact exposes, NCHW float32, for ``inputs`` (N, C, H, W)."""

    def golden_tolerance(self, precision: Precision, output_scale: float | None) -> GoldenTolerance:
        """How close another run of the artifact must come to the bundle's golden outputs."""

    @property
    def int8_takes_float_input(self) -> bool:
        """Whether the int8 artifact's input is float, so that a mixed-precision model whose first layers compute
        in float needs no int8 grid on it."""

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
        """The README an app team of this target reads, or None."""

    def bundle_runner(self) -> BundleRunner | None:
        """How ``verify_bundle.py`` runs the artifacts, or None when it does not know this target."""


class ConverterBase:
    """The defaults of everything optional in :class:`Converter`: no options, no taps, no app README."""

    target: Target
    runtime_name: str
    requires: tuple[str, ...] = ()
    packages: tuple[str, ...] = ()
    taps_runtime: str | None = None
    taps_unavailable: str = "no per-layer taps are implemented for this target"
    arm_format: str | None = None
    arm_unavailable: str = "the ARM sandbox has no runtime for this target"

    @property
    def times_latency(self) -> bool:
        return True

    @property
    def int8_takes_float_input(self) -> bool:
        return True

    def cli_options(self) -> tuple[CliOption, ...]:
        return ()

    def configured(self, values: Mapping[str, Any], int8: bool) -> Converter:
        return self  # type: ignore[return-value]

    def availability(self) -> Availability:
        missing = missing_modules(self)  # type: ignore[arg-type]
        if missing:
            return Availability("unavailable", f"needs {', '.join(missing)}: pip install 'mdeploy[{self.target}]'")
        if not self.times_latency:
            return Availability("convert + check", f"parity on the {self.runtime_name}; no latency on this OS")
        return Availability("convert + check + bench", f"runs on {self.runtime_name}")

    def outputs_runner(self, path: Path, threads: int = 1) -> OutputsRunner:
        run = self.runner(path, threads)  # type: ignore[attr-defined]  # a target that knows one output only

        return lambda batch: {OUTPUT_NAME: run(batch)}

    def layer_taps(self, path: Path, graph: Graph, inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise BadInputError(f"per-layer diagnosis is not available for {self.target} artifacts")

    def golden_tolerance(self, precision: Precision, output_scale: float | None) -> GoldenTolerance:
        if precision == Precision.int8 and output_scale:
            # Four significant digits, not a number of decimals: a tiny output scale must not round to 0.
            return GoldenTolerance(max_abs_error=float(f"{INT8_GOLDEN_TOLERANCE_LSB * output_scale:.4g}"),
                                   note="one int8 output step: ARM and x86 kernels may round differently")
        return GoldenTolerance(max_abs_error=FP32_GOLDEN_TOLERANCE)

    def app_readme(self, manifest: Manifest, parts: ReadmeParts) -> AppReadme | None:
        return None

    def bundle_runner(self) -> BundleRunner | None:
        return None


@cache
def template(package: str, name: str) -> string.Template:
    return string.Template((resources.files(package) / "templates" / name).read_text(encoding="utf-8"))


def render_template(name: str, package: str = "mdeploy.converters", /, **values: object) -> str:
    """``templates/NAME`` of ``package`` with ``values`` (``$name``; ``$$`` is a literal ``$``). ``substitute``, not
    ``safe_substitute``: a value the template names but nobody computed raises KeyError."""
    return template(package, name).substitute(values)


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


def ir_tensors(graph: Graph) -> list[str]:
    """The graph's input and every node's output: what per-layer taps look for in an artifact."""
    return [graph.input_name] + [node.output for node in graph.nodes]


def capture_stderr(fn: Callable[[], T]) -> tuple[T, str]:
    """Runs ``fn`` with file descriptor 2 redirected to a temporary file (native libraries log there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        text = sink.read().decode("utf-8", "replace")
    return result, text


def missing_modules(converter: Converter) -> list[str]:
    return [name for name in converter.requires if importlib.util.find_spec(name) is None]
