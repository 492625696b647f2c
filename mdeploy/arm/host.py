"""What the x86 host needs before it can build the arm64 sandbox: root, a Debian-like system, and from apt a
qemu-user of version 10 or newer (static binaries) plus debootstrap.

Debian 12's own qemu 7.2 emulates SME wrongly under ``-cpu max`` (XNNPACK results come out garbage), so on
bookworm qemu comes from bookworm-backports, which this module adds to apt's sources when it is missing.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mdeploy.errors import BadInputError

Progress = Callable[[str], None]

MIN_QEMU = (10, 0)
QEMU_CANDIDATES = (Path("/usr/bin/qemu-aarch64-static"), Path("/usr/bin/qemu-aarch64"))
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
APT_SOURCES = Path("/etc/apt/sources.list.d")
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
COMMAND_TIMEOUT = 600


def debian_mirror() -> str:
    return os.environ.get("MDEPLOY_ARM_MIRROR", "http://deb.debian.org/debian").rstrip("/")


@dataclass(frozen=True)
class Qemu:
    path: Path
    version: str  # e.g. "10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)"


def require_supported_host() -> str:
    """The host's Debian codename, or a BadInputError naming what is missing and what to do."""
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise BadInputError(f"ARM emulation needs an x86_64 host, this one is {machine}: "
                            "on an ARM machine run the runtimes natively instead")
    if os.geteuid() != 0:
        raise BadInputError("the ARM sandbox needs root (it runs the guest with chroot): "
                            "rerun as root, e.g. `sudo mdeploy arm setup`")
    missing = [tool for tool in ("apt-get", "apt-cache", "dpkg-deb", "tar") if shutil.which(tool) is None]
    release = _os_release()
    if missing or "debian" not in (release.get("ID", "") + " " + release.get("ID_LIKE", "")):
        raise BadInputError(f"the ARM sandbox is built with apt and dpkg (missing: {', '.join(missing) or 'none'}, "
                            f"system: {release.get('PRETTY_NAME', 'unknown')}): use a Debian or Ubuntu host")
    return release.get("VERSION_CODENAME", "")


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value.strip().strip('"') for key, value in pairs}


def run_host_command(command: list[str], what: str, fix: str, timeout: float = COMMAND_TIMEOUT,
                     env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``command``; on failure a one-line BadInputError: what failed, its last line, and the fix."""
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
    except FileNotFoundError:
        raise BadInputError(f"{what} failed: {command[0]} is not installed: {fix}") from None
    except subprocess.TimeoutExpired:
        raise BadInputError(f"{what} did not finish within {timeout:.0f} s: {fix}") from None
    if done.returncode != 0:
        raise BadInputError(f"{what} failed ({last_line(done.stderr or done.stdout)}): {fix}")
    return done


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def qemu_version(binary: Path) -> tuple[tuple[int, ...], str] | None:
    """(numeric version, version text) of a qemu-aarch64 binary, None when it does not run."""
    try:
        out = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?(.*)", out)
    if not found:
        return None
    numbers = tuple(int(part) for part in found.groups()[:3] if part is not None)
    return numbers, f"{'.'.join(map(str, numbers))}{found.group(4).rstrip()}"


def is_static_elf(binary: Path) -> bool:
    """True when the ELF file has no program interpreter: it runs inside a chroot without the host's libc."""
    data = binary.read_bytes()[:4096]
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit ELF only
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    entry_size = int.from_bytes(data[0x36:0x38], "little")
    count = int.from_bytes(data[0x38:0x3A], "little")
    types = [int.from_bytes(data[phoff + i * entry_size:phoff + i * entry_size + 4], "little") for i in range(count)]
    return 3 not in types  # PT_INTERP


def usable_qemu() -> Qemu | None:
    for binary in QEMU_CANDIDATES:
        found = qemu_version(binary) if binary.is_file() else None
        if found and found[0][:2] >= MIN_QEMU and is_static_elf(binary):
            return Qemu(binary, found[1])
    return None


def ensure_host_tools(codename: str, progress: Progress) -> Qemu:
    """A static qemu-aarch64 >= 10 and debootstrap, installed from apt when missing (no-op when present)."""
    qemu = usable_qemu()
    if qemu is not None and shutil.which("debootstrap"):
        return qemu
    packages = ["debootstrap"] + (["qemu-user"] if qemu is None else [])
    release: list[str] = []
    if qemu is None and codename == "bookworm":
        add_backports_source(codename, progress)
        release = ["-t", f"{codename}-backports"]
    progress("apt-get update")
    fix = f"check network access to {debian_mirror()} (or set MDEPLOY_ARM_MIRROR) and apt's sources"
    run_host_command(["apt-get", "update", "-q"], "apt-get update", fix, env=APT_ENV)
    progress(f"apt-get install {' '.join(packages)} {' '.join(release)}".rstrip())
    run_host_command(["apt-get", "install", "-y", "-q", "--no-install-recommends", *release, *packages],
                     f"apt-get install {' '.join(packages)}", fix, env=APT_ENV)
    qemu = usable_qemu()
    if qemu is None:
        raise BadInputError(f"apt installed no static qemu-aarch64 >= {MIN_QEMU[0]} on this {codename or 'system'}: "
                            "install qemu-user 10 or newer (Debian 12: from bookworm-backports) and rerun")
    return qemu


def add_backports_source(codename: str, progress: Progress) -> None:
    """Adds ``<codename>-backports`` to apt's sources unless some source already names it (backports has apt
    priority 100: nothing else on the host is upgraded from it)."""
    suite = f"{codename}-backports"
    sources = [Path("/etc/apt/sources.list"), *sorted(APT_SOURCES.glob("*.list")),
               *sorted(APT_SOURCES.glob("*.sources"))]
    if any(suite in _read(path) for path in sources):
        return
    progress(f"adding {suite} to apt's sources ({APT_SOURCES / f'mdeploy-{suite}.sources'})")
    APT_SOURCES.mkdir(parents=True, exist_ok=True)
    (APT_SOURCES / f"mdeploy-{suite}.sources").write_text(
        f"Types: deb\nURIs: {debian_mirror()}\nSuites: {suite}\nComponents: main\nSigned-By: {DEBIAN_KEYRING}\n",
        encoding="utf-8")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
