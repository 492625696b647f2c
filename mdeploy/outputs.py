"""Output folders appear whole or not at all: work happens in a hidden staging folder that is renamed at the end.

A failed or interrupted run (an exception, Ctrl-C, SIGTERM: see ``mdeploy.cli.app``) removes its staging folder and
leaves the previous output folder, if any, exactly as it was. The final swap and the clean-up hold SIGINT and
SIGTERM until they are done, so that a signal can never leave the output half-swapped or a staging folder behind.

Replacing a folder is refused when it holds (or is) one of the run's inputs, and when mdeploy did not write it
(``is_ours`` says), unless the caller lets any folder go (``replace_any``). Each staging folder has a sibling lock
file that its process holds (``flock``) until it ends: a later run to the same output removes the staging folders of
processes that are gone (killed with SIGKILL, or by a power cut) and never one a live process still holds.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mdeploy.errors import BadInputError, ConversionError

STAGING_INFIX = ".staging-"  # staging folders are named .NAME.staging-XXXXXXXX beside the output folder
LOCK_SUFFIX = ".lock"  # .NAME.staging-XXXXXXXX.lock, held by the process that writes the staging folder
# A staging folder without a lock file comes from a version before locks, or was made a moment ago and its lock is
# being created: only the first kind is old.
UNLOCKED_STALE_SECONDS = 600
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


@dataclass(frozen=True)
class OutputRules:
    """What an output folder may replace. ``inputs`` are the run's own files and folders: the output may neither
    hold one (replacing it would delete it) nor lie inside an input folder (its files would be read as input by
    later runs). An existing non-empty folder is replaced only with ``overwrite`` and only if ``is_ours`` says
    mdeploy wrote it (an earlier ``kind``), unless ``replace_any`` (the user's ``override`` flag) is set.
    ``flag`` names the option in messages."""

    inputs: tuple[Path, ...] = ()
    is_ours: Callable[[Path], bool] | None = None
    kind: str = "output folder"
    override: str | None = None
    replace_any: bool = False
    flag: str = "--out"


def check_output_path(out: Path, overwrite: bool, rules: OutputRules = OutputRules()) -> None:
    """BadInputError with the fix when ``out`` cannot become the output folder (checked before any work)."""
    flag, replace_any = rules.flag, rules.replace_any
    if out.exists() and not out.is_dir():
        raise BadInputError(f"output path {out} is a file: pass {flag} with a folder path")
    check_outside_inputs(out, rules.inputs, flag)
    if out.is_dir():
        try:
            non_empty = any(out.iterdir())
        except OSError as err:
            raise BadInputError(f"cannot read output folder {out} ({err.strerror}): choose another {flag}") from None
        if non_empty and not (overwrite or replace_any):
            raise BadInputError(
                f"output folder {out} exists and is not empty: pass --overwrite or choose another {flag}"
            )
        if non_empty and not replace_any and rules.is_ours is not None and not rules.is_ours(out):
            override = f", or pass {rules.override} to replace it and everything in it" if rules.override else ""
            raise BadInputError(
                f"{flag} {out} is not empty and holds no earlier mdeploy {rules.kind}, so it is not replaced: "
                f"choose another {flag}{override}"
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


def check_outside_inputs(out: Path, inputs: Sequence[Path], flag: str = "--out") -> None:
    """``out`` (replaced as a whole) must not be or hold an input, nor lie inside an input folder."""
    target = out.resolve()
    for given in inputs:
        path = given.resolve()
        if path == target or target in path.parents:
            raise BadInputError(
                f"{flag} {out} holds your input {given}: writing the output there would delete it; choose an "
                "output folder outside your model and data"
            )
        if path.is_dir() and path in target.parents:
            raise BadInputError(
                f"{flag} {out} lies inside your input folder {given}: its files would be read as input by later "
                "runs; choose an output folder outside it"
            )


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
def staged_output(out: Path, overwrite: bool, rules: OutputRules = OutputRules()) -> Iterator[Path]:
    """Yields a staging folder beside ``out``; on success it replaces ``out``, on any failure (exceptions,
    KeyboardInterrupt, SIGTERM turned into one) it is removed and ``out`` is left as it was. The published folder
    has the permissions the user's umask gives a new folder."""
    check_output_path(out, overwrite, rules)
    out = out.resolve()
    remove_stale_staging(out)
    staging: Path | None = None
    lock: IO[str] | None = None
    try:
        # Signals wait until the folder exists and this block owns it: one arriving between the lock file's
        # creation and the ``finally`` below would leave both behind.
        with held_signals():
            try:
                staging, lock = _new_staging(out)
            except OSError as err:
                raise BadInputError(
                    f"cannot create a folder in {out.parent} ({err.strerror or type(err).__name__}): choose an "
                    "output folder you can write to"
                ) from None
        yield staging
        published = False
        try:
            with held_signals():
                _publish(staging, out)
                published = True
        except KeyboardInterrupt as err:
            # A signal that arrived during the swap is delivered once it is over: the new output is already whole.
            if published:
                err.output_published = out  # type: ignore[attr-defined]
            raise
    finally:
        if staging is not None:
            with held_signals():
                shutil.rmtree(staging, ignore_errors=True)  # already gone once published
            _release_lock(staging, lock)


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _lock_path(staging: Path) -> Path:
    return staging.with_name(staging.name + LOCK_SUFFIX)


def _new_staging(out: Path) -> tuple[Path, IO[str] | None]:
    """A new staging folder for ``out`` and its held lock. The lock file is made and locked first, so that no
    other run ever sees the folder unlocked; the kernel releases the lock when the process ends, however."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, so stale staging folders are left for the user
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}{STAGING_INFIX}", dir=out.parent))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes it 0700
        return staging, None
    fd, name = tempfile.mkstemp(prefix=f".{out.name}{STAGING_INFIX}", suffix=LOCK_SUFFIX, dir=out.parent)
    handle = os.fdopen(fd, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        staging = Path(name[: -len(LOCK_SUFFIX)])
        staging.mkdir(mode=0o777)  # the umask applies, as to any new folder of the user's
    except BaseException:
        Path(name).unlink(missing_ok=True)
        handle.close()
        raise
    return staging, handle


def _release_lock(staging: Path, handle: IO[str] | None) -> None:
    if handle is None:
        return
    with held_signals():
        _lock_path(staging).unlink(missing_ok=True)
        handle.close()


def remove_stale_staging(out: Path) -> list[Path]:
    """Remove the staging folders of ``out`` (and their lock files) whose process is gone; returns them."""
    try:
        import fcntl
    except ImportError:
        return []
    removed = []
    pattern = glob.escape(f".{out.name}{STAGING_INFIX}") + "*"
    for entry in sorted(out.parent.glob(pattern)):
        if entry.is_symlink():
            continue
        if entry.name.endswith(LOCK_SUFFIX):
            folder = entry.with_name(entry.name[: -len(LOCK_SUFFIX)])
            if folder.exists():
                continue  # handled with its folder
        elif entry.is_dir():
            folder = entry
        else:
            continue
        lock = _lock_path(folder)
        try:
            handle = lock.open("r")
        except FileNotFoundError:  # a folder of a version before locks
            try:
                old = time.time() - folder.stat().st_mtime > UNLOCKED_STALE_SECONDS
            except OSError:
                continue
            if old:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            continue
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live process holds it
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
            lock.unlink(missing_ok=True)
    return removed


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
