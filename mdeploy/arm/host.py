"""What the x86 host needs before it can build the arm64 sandbox, and the qemu-user the sandbox runs under.

Nothing is installed on the host and apt's own configuration is never changed: qemu-user 10 (static binaries; Debian
12's own qemu 7.2 emulates SME wrongly under ``-cpu max`` and XNNPACK results come out garbage) is fetched from
bookworm-backports by a private apt (mdeploy.apt) into mdeploy's cache, and only its ``qemu-aarch64`` is
unpacked from the .deb. The host needs: an x86_64 Linux with apt-get, dpkg-deb, tar and chroot (Debian and Ubuntu
have them all), Debian's archive keyring (to verify what is fetched) and root, for chroot only.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from mdeploy.apt import DEBIAN_KEYRING, PrivateApt, Progress, last_line, require_keyring
from mdeploy.errors import BadInputError

MIN_QEMU = (10, 0)
QEMU_SUITE = "bookworm-backports"  # qemu-user 1:10.0 (static binaries: they run inside the chroot as they are)
QEMU_PACKAGE = "qemu-user"
QEMU_IN_DEB = "./usr/bin/qemu-aarch64"
HOST_TOOLS = {"apt-get": "apt", "apt-config": "apt", "dpkg-deb": "dpkg", "tar": "tar", "chroot": "coreutils",
              "gpgv": "gpgv"}  # command -> the Debian package that provides it
ROOT_REASON = ("the ARM guest runs under chroot(2), which only root may call: it keeps every path the emulated Python "
               "opens inside the sandbox (qemu's -L mode falls back to the host's files), and setup runs the guest "
               "once to verify it; nothing is installed on the host")


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
        raise BadInputError(f"the ARM sandbox needs root: {ROOT_REASON}; rerun as root, e.g. "
                            "`sudo mdeploy arm setup`")
    missing = missing_host_tools()
    release = _os_release()
    if missing or "debian" not in (release.get("ID", "") + " " + release.get("ID_LIKE", "")):
        raise BadInputError(f"the ARM sandbox is built with apt and dpkg-deb (missing: {', '.join(missing) or 'none'}, "
                            f"system: {release.get('PRETTY_NAME', 'unknown')}): use a Debian or Ubuntu host")
    require_keyring()
    return release.get("VERSION_CODENAME", "")


def missing_host_tools() -> list[str]:
    return [tool for tool in HOST_TOOLS if shutil.which(tool) is None and not Path("/usr/sbin", tool).is_file()]


def host_requirements() -> list[dict[str, str | bool]]:
    """What `mdeploy doctor` reports: each host requirement of the ARM sandbox, met or not, and how to meet it."""
    machine = platform.machine().lower()
    release = _os_release()
    rows: list[dict[str, str | bool]] = [
        {"need": "x86_64 host", "ok": machine in ("x86_64", "amd64"), "fix": f"this one is {machine}"},
        {"need": "Debian-like system", "ok": "debian" in (release.get("ID", "") + " " + release.get("ID_LIKE", "")),
         "fix": f"this one is {release.get('PRETTY_NAME', 'unknown')}: use Debian or Ubuntu"},
        {"need": "root (chroot)", "ok": os.geteuid() == 0, "fix": "run `mdeploy arm setup` and ARM checks as root"},
    ]
    for tool, package in HOST_TOOLS.items():
        rows.append({"need": f"{tool} ({package})", "ok": tool not in missing_host_tools(),
                     "fix": f"sudo apt-get install {package}"})
    rows.append({"need": f"Debian archive keyring ({DEBIAN_KEYRING})", "ok": Path(DEBIAN_KEYRING).is_file(),
                 "fix": "sudo apt-get install debian-archive-keyring"})
    return rows


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text(encoding="utf-8")
    except OSError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {key: value.strip().strip('"') for key, value in pairs}


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


def fetch_qemu(downloads: Path, progress: Progress) -> Qemu:
    """qemu-aarch64 >= 10 (static) from bookworm-backports, via the private apt in ``downloads/apt-amd64``; only the
    one binary is unpacked from the .deb (the package holds every target, ~370 MB unpacked), into
    ``downloads/qemu/<version>/``, where a later setup finds it without unpacking again."""

    apt = PrivateApt(downloads / "apt-amd64", "amd64", (QEMU_SUITE,))
    apt.update(progress)
    deb = apt.fetch([f"{QEMU_PACKAGE}/{QEMU_SUITE}"], progress)[0]
    binary = downloads / "qemu" / deb.stem / "qemu-aarch64"
    if not binary.is_file():
        progress(f"unpacking qemu-aarch64 from {deb.name}")
        partial = binary.parent.with_name(binary.parent.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        unpack_deb(deb, partial, members=[QEMU_IN_DEB])
        shutil.rmtree(binary.parent, ignore_errors=True)
        (partial / QEMU_IN_DEB).replace(partial / "qemu-aarch64")
        shutil.rmtree(partial / "usr")
        partial.rename(binary.parent)
    for stale in binary.parent.parent.iterdir():
        if stale != binary.parent:
            shutil.rmtree(stale, ignore_errors=True)
    found = qemu_version(binary)
    if found is None or found[0][:2] < MIN_QEMU or not is_static_elf(binary):
        raise BadInputError(f"{deb.name} holds no static qemu-aarch64 >= {MIN_QEMU[0]} (found: "
                            f"{found[1] if found else 'none'}): run `mdeploy arm remove` and `mdeploy arm setup` again")
    return Qemu(binary, found[1])


def unpack_deb(deb: Path, target: Path, members: list[str] | None = None) -> None:
    """``dpkg -x`` into ``target``, except that directory symlinks already there are kept (the merged-/usr links
    /bin -> usr/bin, /lib -> usr/lib, as a merged system has them); ``members`` limits it to those paths."""
    unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    only = ["--occurrence=1", *members] if members else []  # stop reading once they are out
    extract = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(target), *only], check=False,
                             stdin=unpack.stdout, capture_output=True, text=True)
    assert unpack.stdout is not None and unpack.stderr is not None
    unpack.stdout.close()
    unpack_error = unpack.stderr.read().decode(errors="replace")
    unpacked = unpack.wait() == 0 or bool(members)  # with members, tar may stop reading early: dpkg-deb gets EPIPE
    if not unpacked or extract.returncode != 0:
        raise BadInputError(f"cannot unpack {deb.name} ({last_line(extract.stderr or unpack_error)}): "
                            "run `mdeploy arm remove` and `mdeploy arm setup` again")
