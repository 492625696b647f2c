"""How the host starts the arm64 guest: ``chroot SANDBOX /qemu-aarch64-static -cpu MODEL /usr/bin/python3 ...``.

The chroot keeps every path the guest opens inside the sandbox (qemu's ``-L`` mode would fall back to the host's
files for paths missing from the userland, and once wrote .pyc files into the host's Python). The guest gets a clean
environment: no PYTHONPATH or other variable of the host leaks in, and no bytecode is written anywhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

from mdeploy.arm.host import ROOT_REASON
from mdeploy.errors import BadInputError, ConversionError

QEMU_IN_SANDBOX = "qemu-aarch64-static"  # at the sandbox's root, so that it exists inside the chroot
GUEST_PYTHON = "/usr/bin/python3"
GUEST_SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"  # on the guest Python's default sys.path
GUEST_WORK = "work"  # per-run folders live in SANDBOX/work/<id>, seen by the guest as /work/<id>
GUEST_ENVIRONMENT = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONNOUSERSITE": "1",
    "PYTHONHASHSEED": "0",
    "OMP_NUM_THREADS": "1",
}
# Lines the runtimes print on every start that say nothing about a failure.
NOISE = ("Failed to persist telemetry device ID", "Created TensorFlow Lite XNNPACK delegate")


def chroot_binary() -> str:
    for candidate in (shutil.which("chroot"), "/usr/sbin/chroot", "/usr/bin/chroot"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BadInputError("chroot is not installed (coreutils): install it and rerun")


def guest_command(sandbox: Path, cpu: str, argv: list[str]) -> list[str]:
    return [chroot_binary(), str(sandbox), f"/{QEMU_IN_SANDBOX}", "-cpu", cpu, GUEST_PYTHON, *argv]


def run_guest(sandbox: Path, cpu: str, argv: list[str], timeout: float, what: str) -> str:
    """Runs the guest Python on ``argv`` and returns its stdout; a ConversionError with the last stderr line when
    it crashes or times out."""
    if os.geteuid() != 0:
        raise BadInputError(f"running the ARM guest needs root: {ROOT_REASON}; rerun as root")
    try:
        done = subprocess.run(guest_command(sandbox, cpu, argv), check=False, capture_output=True, text=True,
                              timeout=timeout, env=dict(GUEST_ENVIRONMENT), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as err:
        tail = last_error_line(_text(err.stderr))
        raise ConversionError(f"{what} on emulated {cpu} did not finish within {timeout:.0f} s ({tail}): "
                              "pass fewer inputs or a longer timeout") from None
    if done.returncode != 0:
        raise ConversionError(f"{what} crashed on emulated {cpu} ({describe_exit(done.returncode)}): "
                              f"{last_error_line(done.stderr)}")
    if "Error in cpuinfo" in done.stderr:
        raise ConversionError(f"the guest could not read its CPU description on {cpu} ({last_error_line(done.stderr)}):"
                              " the runtimes would pick kernels blindly; rebuild with `mdeploy arm setup`")
    return done.stdout


def _text(value: str | bytes | None) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else (value or "")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit code {returncode}"


def last_error_line(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not any(n in line for n in NOISE)]
    return lines[-1] if lines else "no error message"
