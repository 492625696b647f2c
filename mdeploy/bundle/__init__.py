"""The hand-off bundle: the output folder an Android or iOS engineer can use without asking anyone anything.

Besides the artifacts, ``manifest.json`` and ``labels.txt``: golden vectors (``golden.py``), the manifest's JSON
Schema, a README per platform with code that matches the preprocessing (``readmes.py``: the shared sections; the
code is each target's converter's ``app_readme``), a verifier that needs only
NumPy and the runtimes, and ``SHA256SUMS`` over every file (written last).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from mdeploy.bundle.golden import GoldenOutput, write_golden
from mdeploy.paths import CHECKSUMS_FILE, sha256_file
from mdeploy.bundle.readmes import write_readmes
from mdeploy.bundle.verifier import VERIFIER_FILE, compose_verifier

SCHEMA_FILE = "manifest.schema.json"

__all__ = ["GoldenOutput", "copy_static_files", "write_checksums", "write_golden", "write_readmes"]


def copy_static_files(stage: Path) -> list[str]:
    """The manifest's schema (the package's data) and the stand-alone verifier (``verifier.py``)."""
    with resources.as_file(resources.files("mdeploy") / "data" / SCHEMA_FILE) as source:
        shutil.copyfile(source, stage / SCHEMA_FILE)
    (stage / VERIFIER_FILE).write_bytes(compose_verifier().encode("utf-8"))  # the registered targets' runners in it
    return [SCHEMA_FILE, VERIFIER_FILE]


def write_checksums(stage: Path) -> None:
    """``sha256sum -c``-compatible list of every file in the bundle (package directories file by file)."""
    lines = []
    for path in sorted(p for p in stage.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE):
        lines.append(f"{sha256_file(path)}  {path.relative_to(stage).as_posix()}")
    (stage / CHECKSUMS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
