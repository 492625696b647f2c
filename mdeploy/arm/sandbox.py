"""The arm64 sandbox: a Debian arm64 userland with Python 3.11, ONNX Runtime and LiteRT, plus a static
qemu-aarch64 at its root, run with chroot (DESIGN.md §5).

Everything mdeploy writes for it lives in three places of one folder (``~/.cache/mdeploy`` by default): the sandbox,
its download cache ``<sandbox>-downloads`` (the private apt's lists and .debs, the unpacked qemu, pip's cache of the
aarch64 wheels) and the lock file ``.<sandbox>.lock``; nothing on the host outside them changes (no apt source, no
installed package). ``remove_sandbox`` deletes all three.

``setup_sandbox`` is cached and atomic: it builds in a staging folder beside the sandbox, checks that the guest
imports its runtimes, writes a stamp (qemu, Python and package versions, the wheel set) and only then renames the
staging folder into place. A rerun whose stamp matches what the host wants returns at once; a failed or
interrupted setup leaves no folder that looks complete (no stamp, no sandbox), and the next setup removes its
remains.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mdeploy.apt import Progress, debian_mirror
from mdeploy.arm.guest import GUEST_PYTHON, GUEST_SITE_PACKAGES, QEMU_IN_SANDBOX, run_guest
from mdeploy.arm.host import fetch_qemu, require_supported_host
from mdeploy.arm.userland import (
    GUEST_SUITE, download_wheels, fetch_userland, finish_layout, folder_size_mb, install_wheels, unpack_userland,
    wanted_versions,
)
from mdeploy.errors import BadInputError
from mdeploy.outputs import exclusive_lock

LAYOUT_VERSION = 2  # bump when the sandbox's layout changes: older sandboxes then report stale and get rebuilt
STAMP = "mdeploy-sandbox.json"
VERIFY_CPU = "cortex-a53"
VERIFY_TIMEOUT = 300
VERIFY_SCRIPT = (
    "import json, sys, importlib.metadata as m, numpy, onnxruntime, ai_edge_litert.interpreter\n"
    "print(json.dumps({'python': sys.version.split()[0], 'machine': __import__('platform').machine(),\n"
    "                  'packages': {n: m.version(n) for n in ('onnxruntime', 'ai-edge-litert', 'numpy')}}))\n"
)


@dataclass(frozen=True)
class SandboxState:
    """What ``mdeploy doctor`` and ``mdeploy arm setup`` report about a sandbox folder."""

    path: Path
    ready: bool
    reason: str  # why it is not ready (with the fix), or a one-line description when it is
    qemu_version: str | None = None
    python_version: str | None = None
    packages: dict[str, str] = field(default_factory=dict)
    size_mb: float | None = None
    built_at: str | None = None
    setup_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


def default_sandbox_dir() -> Path:
    configured = os.environ.get("MDEPLOY_ARM_SANDBOX")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mdeploy" / "arm64-sandbox"


def download_cache_dir(folder: Path) -> Path:
    """Where the private apt (lists, .debs), qemu and pip's wheel cache are kept between builds (beside the
    sandbox, never inside it)."""
    return folder.parent / f"{folder.name}-downloads"


def lock_file(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


def sandbox_paths(folder: Path | None = None) -> dict[str, Path]:
    """Every path the sandbox of ``folder`` writes (whether it exists yet or not)."""
    folder = (Path(folder) if folder is not None else default_sandbox_dir()).expanduser().absolute()
    return {"sandbox": folder, "downloads": download_cache_dir(folder), "lock": lock_file(folder)}


def read_stamp(folder: Path) -> dict[str, Any] | None:
    try:
        stamp = json.loads((folder / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def sandbox_status(folder: Path | None = None) -> SandboxState:
    """Reads the stamp and checks the files a run needs; runs nothing (fast, and fine without root)."""
    folder = Path(folder) if folder is not None else default_sandbox_dir()
    if not folder.is_dir():
        return SandboxState(folder, False, "not set up: run `mdeploy arm setup`")
    stamp = read_stamp(folder)
    if stamp is None:
        return SandboxState(folder, False, f"{folder} exists but has no valid {STAMP}, so it is not an mdeploy "
                                           "sandbox: remove it or set MDEPLOY_ARM_SANDBOX to another folder")
    state = SandboxState(folder, True, "ready", stamp.get("qemu_version"), stamp.get("python_version"),
                         dict(stamp.get("packages") or {}), stamp.get("size_mb"), stamp.get("built_at"),
                         stamp.get("setup_seconds"))
    problem = stale_reason(folder, stamp)
    if problem:
        return SandboxState(**{**asdict(state), "ready": False, "reason": f"{problem}: run `mdeploy arm setup`"})
    described = ", ".join(f"{name} {version}" for name, version in state.packages.items())
    return SandboxState(**{**asdict(state), "reason": f"qemu {state.qemu_version}, Python {state.python_version}, "
                                                      f"{described}"})


def stale_reason(folder: Path, stamp: dict[str, Any]) -> str | None:
    if stamp.get("layout") != LAYOUT_VERSION:
        return f"built by another mdeploy (layout {stamp.get('layout')}, this one needs {LAYOUT_VERSION})"
    wanted = wanted_versions()
    packages = stamp.get("packages") or {}
    differing = [f"{name} {packages.get(name)} (host: {version})" for name, version in wanted.items()
                 if packages.get(name) != version]
    if differing:
        return "stale: the guest has " + ", ".join(differing)
    for needed in (QEMU_IN_SANDBOX, GUEST_PYTHON.lstrip("/"), GUEST_SITE_PACKAGES + "/onnxruntime",
                   GUEST_SITE_PACKAGES + "/ai_edge_litert"):
        if not (folder / needed).exists():
            return f"damaged: {needed} is missing"
    return None


def setup_sandbox(folder: Path | None = None, progress: Progress | None = None) -> SandboxState:
    """Builds the sandbox in ``folder`` (default: :func:`default_sandbox_dir`) unless a ready one is there."""
    folder = (Path(folder) if folder is not None else default_sandbox_dir()).expanduser().absolute()
    report = progress or (lambda message: None)
    state = sandbox_status(folder)
    if state.ready:
        return state
    require_supported_host()
    folder.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(lock_file(folder)):  # a second setup waits, then finds it ready
        state = sandbox_status(folder)  # another process may have finished it while we waited
        if state.ready:
            return state
        refuse_foreign_folder(folder)
        remove_leftovers(folder)
        start = time.monotonic()
        staging = folder.parent / f".{folder.name}.staging-{os.getpid()}"
        try:
            stamp = build(staging, download_cache_dir(folder), report)
            stamp["setup_seconds"] = round(time.monotonic() - start, 1)
            (staging / STAMP).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
            move_into_place(staging, folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    report(f"ARM sandbox ready in {folder} ({stamp['size_mb']:.0f} MB, {stamp['setup_seconds']:.0f} s)")
    return sandbox_status(folder)


def build(staging: Path, downloads: Path, progress: Progress) -> dict[str, Any]:
    wanted = wanted_versions()
    qemu = fetch_qemu(downloads, progress)
    unpack_userland(staging, fetch_userland(downloads, progress), progress)
    wheel_folder = staging.parent / f"{staging.name}-wheels"
    try:
        wheels = download_wheels(wheel_folder, wanted, downloads / "pip", progress)
        install_wheels(wheels, staging, progress)
    finally:
        shutil.rmtree(wheel_folder, ignore_errors=True)
    finish_layout(staging, qemu)
    guest = verify_guest(staging, progress)
    if guest["packages"] != wanted:
        raise BadInputError(f"the guest got {guest['packages']} instead of {wanted}: rerun `mdeploy arm setup`")
    return {
        "layout": LAYOUT_VERSION, "suite": GUEST_SUITE, "mirror": debian_mirror(), "qemu_version": qemu.version,
        "debs": sorted(path.name for path in downloads.glob("apt-*/cache/archives/*.deb")),
        "python_version": guest["python"], "packages": guest["packages"], "wheels": [w.name for w in wheels],
        "built_at": datetime.now(UTC).isoformat(timespec="seconds"), "size_mb": folder_size_mb(staging),
    }


def verify_guest(root: Path, progress: Progress) -> dict[str, Any]:
    """The proof that the sandbox works: the emulated Python imports numpy, ONNX Runtime and LiteRT."""
    progress(f"checking the guest: Python imports its runtimes on emulated {VERIFY_CPU}")
    output = run_guest(root, VERIFY_CPU, ["-c", VERIFY_SCRIPT], VERIFY_TIMEOUT, "the sandbox check")
    found: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    if found.get("machine") != "aarch64":
        raise BadInputError(f"the guest reports machine {found.get('machine')}, not aarch64: rerun setup")
    return found


def refuse_foreign_folder(folder: Path) -> None:
    """Setup replaces an existing sandbox, never a folder it did not build (a sandbox always has its stamp)."""
    not_a_folder = folder.is_symlink() or (folder.exists() and not folder.is_dir())
    if not_a_folder or (folder.is_dir() and read_stamp(folder) is None and any(folder.iterdir())):
        raise BadInputError(f"{folder} exists and is not an mdeploy sandbox: remove it or set MDEPLOY_ARM_SANDBOX "
                            "to another folder")


def remove_leftovers(folder: Path) -> None:
    """Staging and old folders of setups that were killed (we hold the lock: nobody else is building)."""
    for pattern in (f".{folder.name}.staging-*", f".{folder.name}.old-*"):
        for leftover in folder.parent.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def move_into_place(staging: Path, folder: Path) -> None:
    """Two renames: the new sandbox appears whole, the old one (stale or unfinished) is then removed."""
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists() or folder.is_symlink():
        os.rename(folder, old)
    os.rename(staging, folder)
    shutil.rmtree(old, ignore_errors=True)


def remove_sandbox(folder: Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Deletes the sandbox, its download cache, its lock file and any leftover of an interrupted setup; refuses a
    folder that is not an mdeploy sandbox. Returns what was removed and the space freed (MB)."""
    paths = sandbox_paths(folder)
    folder = paths["sandbox"]
    report = progress or (lambda message: None)
    removed: list[str] = []
    freed = 0.0
    if not folder.parent.is_dir():
        return {"path": str(folder), "removed": removed, "freed_mb": freed}
    with exclusive_lock(paths["lock"]):  # never while a setup is building
        refuse_foreign_folder(folder)
        leftovers = [p for pattern in (f".{folder.name}.staging-*", f".{folder.name}.old-*")
                     for p in folder.parent.glob(pattern)]
        for path in (folder, paths["downloads"], *leftovers):
            if path.is_symlink() or not path.exists():
                continue
            freed += folder_size_mb(path)
            report(f"removing {path}")
            shutil.rmtree(path)
            removed.append(str(path))
        paths["lock"].unlink(missing_ok=True)
    default_parent = Path.home() / ".cache" / "mdeploy"
    if folder.parent == default_parent and not any(default_parent.iterdir()):  # it held only the sandbox
        default_parent.rmdir()
    return {"path": str(folder), "removed": removed, "freed_mb": round(freed, 1)}
