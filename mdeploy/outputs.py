"""Output folders appear whole or not at all: work happens in a hidden staging folder that is renamed at the end.

A failed or interrupted run (an exception, Ctrl-C, SIGTERM: see ``mdeploy.cli.app``) removes its staging folder and
leaves the previous output folder, if any, exactly as it was. The final swap and the clean-up hold SIGINT and
SIGTERM until they are done, so that a signal can never leave the output half-swapped or a staging folder behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mdeploy.errors import BadInputError, ConversionError

STAGING_INFIX = ".staging-"  # staging folders are named .NAME.staging-XXXXXXXX beside the output folder
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Serialise processes that prepare the same cache or folder (parallel test workers, two CI jobs): the second
    waits for the first, then usually finds the work done. ``path`` is the lock file."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent first runs are unlikely there
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_output_path(out: Path, overwrite: bool) -> None:
    """BadInputError with the fix when ``out`` cannot become the output folder (checked before any work)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output path {out} is a file: pass --out with a folder path")
    if out.is_dir() and not overwrite:
        try:
            non_empty = any(out.iterdir())
        except OSError as err:
            raise BadInputError(f"cannot read output folder {out} ({err.strerror}): choose another --out") from None
        if non_empty:
            raise BadInputError(
                f"output folder {out} exists and is not empty: pass --overwrite or choose another --out"
            )
    parent = out.resolve().parent
    if not parent.is_dir():
        ancestor = next((p for p in parent.parents if p.exists()), None) if not parent.exists() else parent
        if ancestor is not None and not ancestor.is_dir():
            raise BadInputError(
                f"cannot create output folder {out}: {ancestor} is a file, not a folder; choose another output folder"
            )
        raise BadInputError(f"the parent folder of {out} does not exist: create it first")
    _check_writable(parent, out)


def _check_writable(parent: Path, out: Path) -> None:
    """Create and remove a folder in ``parent``: permission bits do not tell (root ignores them; read-only mounts,
    /proc and /sys refuse anyway)."""
    if not os.access(parent, os.W_OK):
        raise BadInputError(f"cannot write to {parent}: choose an output folder you can write to")
    try:
        probe = tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent)
    except OSError as err:
        raise BadInputError(
            f"cannot write to {parent} ({err.strerror or type(err).__name__}): choose an output folder you can "
            "write to"
        ) from None
    os.rmdir(probe)


@contextmanager
def held_signals() -> Iterator[None]:
    """Defer SIGINT and SIGTERM until the block is over, then deliver them as usual (a no-op off the main thread,
    where Python cannot handle signals anyway)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous: dict[int, object] = {}
    for sig in _HELD_SIGNALS:
        handler = signal.getsignal(sig)
        if handler is None or handler is signal.SIG_IGN:  # not set from Python, or ignored: leave it alone
            continue
        try:
            signal.signal(sig, lambda signum, frame: received.append(signum))
        except (ValueError, OSError):  # pragma: no cover - not the main interpreter
            continue
        previous[sig] = handler
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)  # now handled as if it had just arrived


@contextmanager
def staged_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yields a staging folder beside ``out``; on success it replaces ``out``, on any failure (exceptions,
    KeyboardInterrupt, SIGTERM turned into one) it is removed and ``out`` is left as it was."""
    check_output_path(out, overwrite)
    out = out.resolve()
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
    except OSError as err:
        raise BadInputError(
            f"cannot create a folder in {out.parent} ({err.strerror or type(err).__name__}): choose an output "
            "folder you can write to"
        ) from None
    try:
        yield staging
    except BaseException:
        with held_signals():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    published = False
    try:
        with held_signals():
            try:
                _publish(staging, out)
                published = True
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
    except KeyboardInterrupt as err:
        # A signal that arrived during the swap is delivered once it is over: the new output is already whole.
        if published:
            err.output_published = out  # type: ignore[attr-defined]
        raise


def _publish(staging: Path, out: Path) -> None:
    """Move ``staging`` to ``out``, replacing a previous ``out``; on failure the previous one is put back."""
    try:
        if not out.exists():
            os.replace(staging, out)
            return
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, backup / out.name)
        try:
            os.replace(staging, out)
        except OSError:
            os.replace(backup / out.name, out)
            shutil.rmtree(backup, ignore_errors=True)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    except OSError as err:
        raise ConversionError(
            f"could not move the finished output into {out} ({err.strerror or err}): the previous output, if any, "
            "is unchanged; check the folder's permissions and free space, then run again"
        ) from None
