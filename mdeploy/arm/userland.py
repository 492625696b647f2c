"""Builds the arm64 Debian userland of the sandbox from registry packages only, without debootstrap and without
touching the host: a private apt (mdeploy.apt) resolves and fetches what ``debootstrap --variant=minbase
--include=python3`` would install (every Priority: required package, apt and python3, with their dependencies), the
.debs are unpacked with dpkg-deb over merged-/usr links (no maintainer script runs, nothing is emulated), and aarch64
wheels are unzipped into the guest Python's site-packages.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import stat
import sys
import zipfile
from pathlib import Path

from mdeploy.apt import PrivateApt, Progress, run_host_command
from mdeploy.arm.guest import GUEST_SITE_PACKAGES, GUEST_WORK, QEMU_IN_SANDBOX
from mdeploy.arm.host import Qemu, unpack_deb

GUEST_SUITE = "bookworm"  # its Python 3.11 matches the host's wheels (cp311)
GUEST_PYTHON_TAG = "3.11"
GUEST_GLIBC_MINOR = 36  # bookworm's glibc 2.36: every manylinux_2_17 .. manylinux_2_36 aarch64 wheel runs
GUEST_PACKAGES = ("onnxruntime", "ai-edge-litert", "numpy")
# The tested versions (requirements.lock), used when the host has no copy of a runtime to match.
PINNED_VERSIONS = {"onnxruntime": "1.32.0", "ai-edge-litert": "2.3.0", "numpy": "2.4.6"}


def wanted_versions() -> dict[str, str]:
    """The host's own versions of the guest's runtimes, so that ARM and x86 differ only in their kernels."""
    wanted = {}
    for name in GUEST_PACKAGES:
        try:
            wanted[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            wanted[name] = PINNED_VERSIONS[name]
    return wanted


USERLAND_REQUESTS = ("?priority(required)", "apt", "python3")  # debootstrap --variant=minbase --include=python3
MERGED_USR = ("bin", "sbin", "lib")  # /bin -> usr/bin ...: bookworm's default layout on arm64
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9)}


def fetch_userland(downloads: Path, progress: Progress) -> list[Path]:
    """The arm64 .debs of the userland, via the private apt in ``downloads/apt-arm64`` (cached there)."""
    apt = PrivateApt(downloads / "apt-arm64", "arm64", (GUEST_SUITE,))
    apt.update(progress)
    return apt.fetch(list(USERLAND_REQUESTS), progress)


def unpack_userland(target: Path, debs: list[Path], progress: Progress) -> None:
    """The userland in ``target``: merged-/usr links first (``--keep-directory-symlink`` keeps them while the
    packages' /bin, /lib files go through them), then every .deb, then the few device nodes a program may open."""
    target.mkdir(parents=True)
    for name in MERGED_USR:
        (target / "usr" / name).mkdir(parents=True, exist_ok=True)
        (target / name).symlink_to(f"usr/{name}")
    progress(f"unpacking {len(debs)} arm64 packages")
    for deb in debs:
        unpack_deb(deb, target)
    dev = target / "dev"
    dev.mkdir(exist_ok=True)
    for name, (major, minor) in DEVICES.items():
        os.mknod(dev / name, stat.S_IFCHR | 0o666, os.makedev(major, minor))
        os.chmod(dev / name, 0o666)


def download_wheels(folder: Path, versions: dict[str, str], pip_cache: Path, progress: Progress) -> list[Path]:
    """aarch64 wheels of the runtimes and their dependencies. pip keeps its cache in ``pip_cache`` (mdeploy's
    download cache, not the user's ~/.cache/pip), which makes a rebuild fast. Dependencies are held at the host's
    versions where the host has them."""
    progress("pip download aarch64 wheels: " + ", ".join(f"{n}=={v}" for n, v in versions.items()))
    folder.mkdir(parents=True, exist_ok=True)
    constraints = folder / "host-versions.txt"
    constraints.write_text("\n".join(host_constraints(set(versions))) + "\n", encoding="utf-8")
    platforms = [f"manylinux_2_{minor}_aarch64" for minor in range(GUEST_GLIBC_MINOR, 16, -1)]
    platforms += ["manylinux2014_aarch64", "linux_aarch64"]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--only-binary=:all:", "--python-version", GUEST_PYTHON_TAG, "--implementation", "cp",
               "--abi", "cp" + GUEST_PYTHON_TAG.replace(".", ""), "-d", str(folder), "-c", str(constraints)]
    for tag in platforms:
        command += ["--platform", tag]
    command += [f"{name}=={version}" for name, version in versions.items()]
    run_host_command(command, "pip download of the aarch64 wheels",
                     "check network access to PyPI and that these versions publish manylinux aarch64 wheels",
                     env={"PIP_CACHE_DIR": str(pip_cache)})
    return sorted(folder.glob("*.whl"))


def host_constraints(excluded: set[str]) -> list[str]:
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():  # in sys.path order: the first copy of a name is the live one
        name, version = dist.metadata["Name"], dist.version
        if not name or not version or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            continue
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key not in excluded and key not in pins:
            pins[key] = f"{name}=={version}"
    return sorted(pins.values())


def install_wheels(wheels: list[Path], target: Path, progress: Progress) -> None:
    site = target / GUEST_SITE_PACKAGES
    site.mkdir(parents=True, exist_ok=True)
    progress(f"unzipping {len(wheels)} wheels into the guest's site-packages")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)
    for data in site.glob("*.data"):  # a wheel's purelib/platlib belong in site-packages; scripts are not needed
        for scheme in ("purelib", "platlib"):
            if (data / scheme).is_dir():
                shutil.copytree(data / scheme, site, dirs_exist_ok=True)
        shutil.rmtree(data)


def finish_layout(target: Path, qemu: Qemu) -> None:
    """What the guest needs besides packages: qemu inside the chroot, a private /proc (qemu answers
    /proc/cpuinfo and /proc/self/* itself, with the -cpu model's description), the CPU lists the runtimes'
    cpuinfo library reads from /sys, and the folder the host drops work into."""
    (target / "proc").mkdir(exist_ok=True)
    cpu_dir = target / "sys/devices/system/cpu"
    cpu_dir.mkdir(parents=True, exist_ok=True)
    for name in ("possible", "present", "online"):  # one CPU: the runtimes run one thread here anyway
        (cpu_dir / name).write_text("0\n", encoding="utf-8")
    (target / GUEST_WORK).mkdir(exist_ok=True)
    shutil.copy2(qemu.path, target / QEMU_IN_SANDBOX)


def folder_size_mb(folder: Path) -> float:
    total = 0
    for root, _, files in os.walk(folder):  # never follows symlinks out of the sandbox
        total += sum(os.lstat(os.path.join(root, name)).st_size for name in files)
    return round(total / 1e6, 1)
