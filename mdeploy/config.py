"""Project configuration for the CI gate: ``[tool.mdeploy]`` in pyproject.toml, or an ``mdeploy.toml``.

```toml
[tool.mdeploy.thresholds.fp32]      # in mdeploy.toml: [thresholds.fp32]
max_error_of_peak = 7.5e-5          # max |error| <= max(1e-4, this * peak |PyTorch output|): the default
# max_abs_error = 1e-4              # alone: an absolute limit (no scaling); with max_error_of_peak: the floor
[tool.mdeploy.thresholds.int8]
min_snr_db = 15.0
min_top1 = 0.85
[tool.mdeploy.baseline]             # what counts as a regression against --baseline
max_top1_drop = 0.01
max_snr_drop_db = 0.5
max_latency_increase = 0.15
```

Precedence: command-line flags, then the file, then the defaults. An unknown key is an error that lists the valid
ones: a typo must not silently keep the default limit.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from mdeploy.types import Precision
from mdeploy.errors import BadInputError
from mdeploy.parity import Thresholds

CONFIG_NAMES = ("mdeploy.toml", "pyproject.toml")


@dataclass(frozen=True)
class Tolerances:
    """How far a new report may fall behind ``--baseline`` before the gate fails."""

    max_top1_drop: float = 0.01  # fraction (0.01 = 1 point)
    max_snr_drop_db: float = 0.5
    max_latency_increase: float = 0.15  # fraction of the baseline's p50


@dataclass(frozen=True)
class GateConfig:
    thresholds: dict[Precision, Thresholds]
    tolerances: Tolerances = Tolerances()
    source: str = "defaults"

    @classmethod
    def defaults(cls) -> GateConfig:
        return cls({p: Thresholds.default(p) for p in Precision})


def find_config(start: Path) -> Path | None:
    """mdeploy.toml, or a pyproject.toml with a [tool.mdeploy] table, in ``start``."""
    for name in CONFIG_NAMES:
        path = start / name
        if path.is_file() and (name == "mdeploy.toml" or "[tool.mdeploy" in path.read_text(encoding="utf-8")):
            return path
    return None


def load_config(path: Path | None) -> GateConfig:
    if path is None:
        return GateConfig.defaults()
    if not path.is_file():
        raise BadInputError(f"config file {path} does not exist: pass --config with an mdeploy.toml or pyproject.toml")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise BadInputError(f"{path} is not valid TOML ({err}): fix the file") from None
    table = data.get("tool", {}).get("mdeploy", {}) if path.name == "pyproject.toml" else data
    prefix = "tool.mdeploy." if path.name == "pyproject.toml" else ""
    _only(table, {"thresholds", "baseline"}, f"{path} [{prefix.rstrip('.') or 'top level'}]")
    thresholds = dict(GateConfig.defaults().thresholds)
    given = table.get("thresholds", {})
    _only(given, {p.value for p in Precision}, f"{path} [{prefix}thresholds]")
    for precision in Precision:
        values = given.get(precision.value, {})
        _only(values, {f.name for f in fields(Thresholds)}, f"{path} [{prefix}thresholds.{precision.value}]")
        thresholds[precision] = thresholds[precision].override(**_numbers(values, path))
    tolerance_values = table.get("baseline", {})
    _only(tolerance_values, {f.name for f in fields(Tolerances)}, f"{path} [{prefix}baseline]")
    return GateConfig(thresholds, Tolerances(**_numbers(tolerance_values, path)), str(path))


def _only(table: Any, allowed: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise BadInputError(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise BadInputError(f"unknown key {', '.join(unknown)} in {where}: valid keys are {', '.join(sorted(allowed))}")


def _numbers(values: dict[str, Any], path: Path) -> dict[str, float]:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise BadInputError(f"{key} = {value!r} in {path} must be a number")
    return {key: float(value) for key, value in values.items()}
