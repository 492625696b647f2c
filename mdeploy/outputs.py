"""Output folders appear whole or not at all: work happens in a hidden staging folder that is renamed at the end."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdeploy.errors import BadInputError


def check_output_path(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output path {out} is a file: pass --out with a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise BadInputError(f"output folder {out} exists and is not empty: pass --overwrite or choose another --out")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise BadInputError(f"the parent folder of {out} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write to {parent}: choose an --out folder you can write to")


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a staging folder beside ``out``; on success it replaces ``out``, on any failure it is removed and
    ``out`` is left as it was."""
    check_output_path(out, overwrite)
    out = out.resolve()
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, backup / out.name)
        os.replace(staging, out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staging, out)
