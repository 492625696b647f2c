"""``mdeploy doctor``: versions, which targets work here and why not, and the ARM sandbox's state."""

from __future__ import annotations

import importlib.metadata
import platform
from typing import Any

from rich.table import Table

from converters import REGISTRY
from converters.base import missing_modules
from mdeploy import __version__
from mdeploy.cli.app import app, stdout
from mdeploy.cli.options import JsonOpt
from mdeploy.pipeline import dump_json

PACKAGES = ("torch", "numpy", "onnx", "onnxruntime", "ai-edge-litert", "flatbuffers", "coremltools")


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def target_rows() -> list[dict[str, Any]]:
    rows = []
    for target, converter in REGISTRY.items():
        missing = missing_modules(converter)
        if missing:
            status, note = "unavailable", f"needs {', '.join(missing)}: pip install 'mdeploy[{target.value}]'"
        elif not converter.times_latency:
            status, note = "convert + check", f"parity on the {converter.runtime_name}; no latency on this OS"
        else:
            status, note = "convert + check + bench", f"runs on {converter.runtime_name}"
        rows.append({"target": target.value, "status": status, "note": note})
    return rows


def diagnosis() -> dict[str, Any]:
    from mdeploy.arm import sandbox_status

    return {
        "mdeploy": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "packages": {name: package_version(name) for name in PACKAGES},
        "targets": target_rows(),
        "arm_sandbox": sandbox_status().to_dict(),
    }


@app.command()
def doctor(json_output: JsonOpt = False) -> None:
    """Versions, available targets (and why any is not), and the ARM sandbox's state."""
    report = diagnosis()
    if json_output:
        print(dump_json(report))
        return
    stdout.print(f"mdeploy {report['mdeploy']} on Python {report['python']}, {report['machine']}", highlight=False)
    stdout.print(", ".join(f"{name} {version or '[red]missing[/red]'}" for name, version in report["packages"].items()),
                 highlight=False, soft_wrap=True)
    table = Table(title="targets")
    for header in ("target", "status", "note"):
        table.add_column(header)
    for row in report["targets"]:
        table.add_row(row["target"], row["status"], row["note"], style="red" if row["status"] == "unavailable" else None)
    stdout.print(table)
    arm = report["arm_sandbox"]
    stdout.print(f"ARM sandbox ({arm['path']}): {'ready' if arm['ready'] else 'not ready'}: {arm['reason']}",
                 highlight=False, soft_wrap=True)
