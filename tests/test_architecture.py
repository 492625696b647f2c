"""The module structure stays a layered graph (README, "Architecture"): every import goes down the layer order or
stays within a layer, no import circles anywhere, and ``converters/`` and ``calibration/`` are only ever imported
as ``mdeploy.converters`` and ``mdeploy.calibration`` (where they are installed). Imports inside functions and
``TYPE_CHECKING`` blocks count: they are dependencies all the same."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the package name it installs as (pyproject.toml's package-dir).
SOURCES = {"mdeploy": "mdeploy", "converters": "mdeploy.converters", "calibration": "mdeploy.calibration"}
# Lowest first. A module belongs to the layer of the longest prefix that names it (or a package above it).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("mdeploy.__init__", "mdeploy.types", "mdeploy.errors", "mdeploy.metrics", "mdeploy.ui")),
    ("foundations", ("mdeploy.outputs", "mdeploy.manifest", "mdeploy.families", "mdeploy.paths", "mdeploy.apt", "mdeploy.model_archive",
                     "mdeploy.graph", "mdeploy.calibration", "mdeploy.zoo", "mdeploy.reporting")),
    ("numerics", ("mdeploy.quantize", "mdeploy.loading", "mdeploy.parity", "mdeploy.config", "mdeploy.baseline",
                  "mdeploy.latency", "mdeploy.agreement", "mdeploy.detection")),
    ("targets", ("mdeploy.converters",)),
    ("services", ("mdeploy.bundle", "mdeploy.diagnose", "mdeploy.arm", "mdeploy.artifacts", "mdeploy.records",
                  "mdeploy.samples", "mdeploy.reports", "mdeploy.demo_assets")),
    ("commands", ("mdeploy.bench", "mdeploy.pipeline", "mdeploy.check")),
    ("interfaces", ("mdeploy.cli", "mdeploy.demo", "mdeploy.demo_ocr")),
]
# Run outside mdeploy (in the app team's Python, in the ARM guest): they import nothing of it. tflite_io is also
# mdeploy's own, copied into the guest and (its functions) into the bundle's verifier.
STANDALONE = {"mdeploy.data.verify_bundle", "mdeploy.arm.guest_runner", "mdeploy.converters.tflite_io"}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__") if parts[-1] == "__init__" else name] = path
    return found


MODULES = modules()


def imports(name: str) -> set[str]:
    """Every module of ours that ``name`` imports: ``from a.b import c`` is ``a.b.c`` if that is a module, else
    ``a.b``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {module for module in found if module in MODULES and module != name}


def layer_of(name: str) -> int:
    candidates = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
                  if name == prefix or name.startswith(prefix + ".") or (prefix == "mdeploy.__init__" and name == "mdeploy")]
    assert candidates, f"{name} belongs to no layer: add it to LAYERS in {__file__} (and to the README's list)"
    return max(candidates)[1]


GRAPH = {name: imports(name) for name in MODULES}


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        if name not in STANDALONE:
            layer_of(name)


def test_standalone_scripts_import_nothing_of_mdeploy() -> None:
    assert {name: GRAPH[name] for name in STANDALONE} == {name: set() for name in STANDALONE}


def test_imports_go_down_the_layer_order() -> None:
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in GRAPH.items() if a not in STANDALONE for b in sorted(targets)
              if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles() -> None:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, cycles


@pytest.mark.parametrize("folder", ["mdeploy", "converters", "calibration", "tests", "bench"])
def test_converters_and_calibration_are_imported_inside_the_mdeploy_namespace(folder: str) -> None:
    stray = []
    for path in sorted((REPO / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            stray += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("converters", "calibration")]
    assert not stray, stray


def test_pyproject_installs_every_package_folder_under_mdeploy() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    packages = {name.rpartition(".")[0] if Path(MODULES[name]).name != "__init__.py" else name
                for name in MODULES}
    assert set(config["packages"]) == packages - {"mdeploy.data"}
    assert config["package-dir"] == {package: folder for folder, package in SOURCES.items() if folder != "mdeploy"}
