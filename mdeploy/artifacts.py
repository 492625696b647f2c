"""Existing artifacts and output folders as ``check``, ``bench`` and ``inspect`` read them: which target and
precision a file is, its converter's report, and an output folder's manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mdeploy.converters import REGISTRY
from mdeploy.errors import BadInputError, MdeployError, first_line
from mdeploy.manifest import Manifest
from mdeploy.types import Precision, Target


def target_of(path: Path) -> Target:
    for target, converter in REGISTRY.items():
        if path.name.endswith(converter.suffix):
            return target
    known = ", ".join(c.suffix for c in REGISTRY.values())
    raise BadInputError(f"{path} is not an artifact mdeploy knows (expected a file ending in {known})")


def precision_of(path: Path, override: Precision | None = None) -> Precision:
    """``override`` (--precision), else what mdeploy's file name says (NAME.fp32.*, NAME.int8.*), else what the
    artifact holds: int8 when it quantises anything (Q/DQ nodes, int8 tensors, quantize ops), fp32 otherwise."""
    if override is not None:
        return override
    for precision in Precision:
        if f".{precision.value}." in path.name:
            return precision
    return precision_in_file(path)


def precision_in_file(path: Path) -> Precision:
    report = inspect_artifact(path)
    int8 = bool(report.get("activation_quantization")) or int(report.get("int8_weight_tensors") or 0) > 0
    return Precision.int8 if int8 else Precision.fp32


def inspect_artifact(path: Path) -> dict[str, Any]:
    """The converter's ``inspect`` of an artifact; a file its format library cannot parse is bad input."""
    target = target_of(path)
    try:
        return REGISTRY[target].inspect(path)
    except MdeployError:
        raise
    except Exception as err:  # the format library's own parse errors
        raise BadInputError(f"{path} cannot be read as {target.value} ({first_line(err)}): is it corrupt? "
                            "Convert again") from err


def read_manifest(path: Path) -> Manifest:
    """An output folder's manifest.json, typed; one-line BadInputError naming the file and the field otherwise."""
    return Manifest.read(path)
