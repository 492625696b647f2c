"""The bundle's ``verify_bundle.py``: the generic checks of ``mdeploy/data/verify_bundle.py`` (SHA256SUMS, manifest,
golden comparisons) with, at its marker line, how each registered target runs its artifacts: the source of every
converter's :class:`~mdeploy.converters.base.BundleRunner` functions (``inspect.getsource``), registered by target
name. The script stays standalone (NumPy and the runtimes only) and the same converters give the same bytes.
"""

from __future__ import annotations

import ast
import inspect
import json
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from mdeploy.converters import REGISTRY, Converter

VERIFIER_FILE = "verify_bundle.py"
MARKER = "# --- mdeploy: target runners ---\n"


def static_verifier() -> str:
    return (resources.files("mdeploy") / "data" / VERIFIER_FILE).read_text(encoding="utf-8")


def compose_verifier(converters: Mapping[str, Converter] | None = None) -> str:
    """The verifier with the runners of ``converters`` (default: every registered target) written in."""
    static = static_verifier()
    if static.count(MARKER) != 1:
        raise AssertionError(f"mdeploy/data/{VERIFIER_FILE} must hold the line {MARKER.strip()!r} exactly once")
    taken = top_level_names(static)
    sources: dict[str, str] = {}  # function name -> its source, each once (targets may share helpers)
    registrations = []
    for target, converter in (REGISTRY if converters is None else converters).items():
        runner = converter.bundle_runner()
        if runner is None:
            registrations.append(registration(target, converter.suffix, target, None,
                                              f"{VERIFIER_FILE} cannot run {target} artifacts"))
            continue
        for function in (*runner.helpers, *([runner.run] if runner.run is not None else [])):
            add_source(sources, function, taken)
        registrations.append(registration(target, converter.suffix, runner.runtime,
                                          runner.run.__name__ if runner.run is not None else None, runner.why_not))
    block = "".join(f"\n\n{source}" for source in sources.values()) + "\n\n" + "".join(registrations)
    composed = static.replace(MARKER, MARKER + block.lstrip("\n"))
    compile(composed, VERIFIER_FILE, "exec")  # a source that does not parse fails here, not in an app team's hands
    return composed


def add_source(sources: dict[str, str], function: Callable[..., Any], taken: set[str]) -> None:
    name = function.__name__
    if not inspect.isfunction(function) or name == "<lambda>" or function.__qualname__ != name:
        raise TypeError(f"{function!r}: a bundle runner's functions must be plain module-level functions")
    source = inspect.getsource(function).rstrip() + "\n"
    if name in taken or sources.get(name, source) != source:
        raise ValueError(f"{name} ({function.__module__}) would replace another function of {VERIFIER_FILE}: "
                         "rename it")
    sources[name] = source


def registration(target: str, suffix: str, runtime: str, run: str | None, why_not: str) -> str:
    values = ", ".join([json.dumps(str(target)), json.dumps(suffix), json.dumps(runtime), run or "None",
                        *([json.dumps(why_not)] if why_not else [])])
    return f"register({values})\n"


def top_level_names(source: str) -> set[str]:
    """What the static verifier defines or imports at module level (a runner's function must not replace one)."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names
