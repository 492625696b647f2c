"""The ``mdeploy`` command line: one module per command, registered on one typer app.

Exit codes: see :class:`mdeploy.errors.ExitCode` (0 ok, 1 parity failed, 2 bad usage or input, 3 conversion or
runtime failure, 130 interrupted).
"""

from __future__ import annotations

import sys

from mdeploy.cli import arm, bench, check, convert, doctor, inspect  # noqa: F401  (each registers its command on the app)
from mdeploy.cli.app import app, run_guarded, stderr, stdout

__all__ = ["app", "main", "run_guarded", "stderr", "stdout"]


def main() -> None:  # pragma: no cover - console entry point
    sys.exit(app())
