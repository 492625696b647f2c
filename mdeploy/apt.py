"""A private apt: Debian packages fetched (for the ARM sandbox, the demo's photos) without touching the host's apt
or dpkg.

Every path apt reads or writes is redirected under one folder of mdeploy's cache (``ROOT``): its configuration
(``ROOT/apt.conf``, read through ``APT_CONFIG`` before anything of the host's, and pointing ``Dir::Etc::Parts`` at an
empty folder so that no host snippet or hook applies), its sources list, its lists, its .deb cache, its logs and an
empty dpkg status file (apt then believes nothing is installed, so ``install --download-only`` fetches a whole
dependency closure; apt's own locks follow these paths). Only two host files are read: the Debian archive keyring
(``Signed-By``, so every index is still verified) and the host's proxy and date-check settings (``apt-config
dump``), so that a host behind a proxy works the same.

Nothing runs dpkg: the .debs are unpacked with ``dpkg-deb`` by the caller.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mdeploy.errors import BadInputError

Progress = Callable[[str], None]

APT_ENV = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
COMMAND_TIMEOUT = 600
# Host settings a private apt honours: how to reach the network, not what to install or where.
HOST_SETTINGS = re.compile(r'^(Acquire::(https?|ftp)::Proxy(::\S+)?|Acquire::Check-(Valid-Until|Date)|'
                           r'Acquire::Retries) "[^"]*";$')


@dataclass(frozen=True)
class Plan:
    """The packages an ``install --download-only`` resolved: (name, version, architecture) each."""

    packages: tuple[tuple[str, str, str], ...]

    def deb_names(self) -> list[str]:
        return [f"{name}_{quote_version(version)}_{arch}.deb" for name, version, arch in self.packages]


def quote_version(version: str) -> str:
    """How apt names a cached .deb's version (``1:2.3`` -> ``1%3a2.3``)."""
    return version.replace("%", "%25").replace("_", "%5f").replace(":", "%3a")


class PrivateApt:
    """apt-get and apt-cache for one architecture and a few suites of ``debian_mirror()``, all state in ``root``."""

    def __init__(self, root: Path, arch: str, suites: tuple[str, ...]) -> None:
        self.root = root.absolute()
        self.arch = arch
        self.suites = suites
        self.archives = self.root / "cache" / "archives"

    @property
    def fix(self) -> str:
        return f"check network access to {debian_mirror()} (or set MDEPLOY_ARM_MIRROR)"

    def configure(self) -> None:
        require_keyring()
        for sub in ("etc/parts", "etc/preferences.d", "etc/trusted.gpg.d", "state/lists/partial",
                    "cache/archives/partial", "log", "dpkg"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        status = self.root / "dpkg" / "status"
        status.write_text("", encoding="utf-8")  # nothing is installed, as far as this apt knows
        lines = [
            f'Dir::Etc::Parts "{self.root}/etc/parts";',  # empty: no host snippet, no hook, no extra index target
            'Dir::Etc::main "/dev/null";',
            f'Dir::Etc::SourceList "{self.root}/etc/sources.list";',
            f'Dir::Etc::SourceParts "{self.root}/etc/parts";',
            'Dir::Etc::Preferences "/dev/null";',
            f'Dir::Etc::PreferencesParts "{self.root}/etc/preferences.d";',
            'Dir::Etc::Trusted "/dev/null";',
            f'Dir::Etc::TrustedParts "{self.root}/etc/trusted.gpg.d";',
            f'Dir::State "{self.root}/state";',
            f'Dir::State::status "{status}";',
            f'Dir::Cache "{self.root}/cache";',
            f'Dir::Log "{self.root}/log";',
            f'APT::Architecture "{self.arch}";',
            f'APT::Architectures {{ "{self.arch}"; }};',
            'APT::Install-Recommends "false";',
            'APT::Sandbox::User "root";',  # the cache lives in root's home, which apt's _apt user cannot enter
            'Acquire::Languages "none";',
            'Acquire::GzipIndexes "true";',  # lists kept compressed (lz4): 18 MB instead of 47 MB
            *host_network_settings(),
        ]
        (self.root / "apt.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")
        sources = [f"deb [signed-by={DEBIAN_KEYRING}] {debian_mirror()} {suite} main" for suite in self.suites]
        (self.root / "etc" / "sources.list").write_text("\n".join(sources) + "\n", encoding="utf-8")

    def run(self, args: list[str], what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run_host_command(args, what, self.fix, env={**APT_ENV, "APT_CONFIG": str(self.root / "apt.conf")},
                                cwd=cwd)

    def update(self, progress: Progress) -> None:
        self.configure()
        progress(f"apt-get update ({self.arch}: {', '.join(self.suites)}; private lists in {self.root})")
        self.run(["apt-get", "update", "-q", "--error-on=any"], f"apt-get update of {', '.join(self.suites)}")

    def download(self, package: str, folder: Path) -> Path:
        """The .deb of ``package`` alone (no dependencies), downloaded into ``folder``."""
        self.run(["apt-get", "download", "-q", package], f"apt-get download {package}", cwd=folder)
        debs = sorted(folder.glob(f"{package}_*.deb"))
        if not debs:
            raise_missing([f"{package}_*.deb"], folder)
        return debs[0]

    def fetch(self, requests: list[str], progress: Progress) -> list[Path]:
        """The .debs of ``requests`` and everything they depend on (downloaded once, then served from the cache).
        A request may be an apt pattern such as ``?priority(required)``. Older .debs in the cache are removed."""
        what = f"resolving {' '.join(requests)} ({self.arch})"
        plan = parse_plan(self.run(["apt-get", "install", "-s", "-q", *requests], what).stdout)
        if not plan.packages:
            raise_missing([f"any .deb of {' '.join(requests)}"], self.archives)
        progress(f"fetching {len(plan.packages)} {self.arch} packages (cached in {self.archives})")
        self.run(["apt-get", "install", "-d", "-y", "-q", *requests], f"apt-get download of {' '.join(requests)}")
        debs = [self.archives / name for name in plan.deb_names()]
        missing = [deb.name for deb in debs if not deb.is_file()]
        if missing:
            raise_missing(missing, self.archives)
        wanted = set(plan.deb_names())
        for stale in self.archives.glob("*.deb"):
            if stale.name not in wanted:
                stale.unlink()
        return debs


def parse_plan(simulation: str) -> Plan:
    """``Inst NAME (VERSION SUITE [ARCH])`` lines of ``apt-get install -s``."""
    found = re.findall(r"^Inst (\S+) \((\S+) .*\[(\S+)\]\)", simulation, flags=re.MULTILINE)
    return Plan(tuple((name.split(":")[0], version, arch) for name, version, arch in found))


def raise_missing(missing: list[str], archives: Path) -> None:
    raise BadInputError(f"apt resolved or fetched nothing for {len(missing)} .deb files in {archives} "
                        f"(first: {missing[0]}): run `mdeploy arm remove` and `mdeploy arm setup` again")


def host_network_settings() -> list[str]:
    """The host's proxy and date-check settings (read-only ``apt-config dump``), as private apt.conf lines."""
    try:
        dump = subprocess.run(["apt-config", "dump"], check=False, capture_output=True, text=True, timeout=30,
                              env={**os.environ, **APT_ENV}).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in dump.splitlines() if HOST_SETTINGS.match(line)]


def debian_mirror() -> str:
    return os.environ.get("MDEPLOY_ARM_MIRROR", "http://deb.debian.org/debian").rstrip("/")


def require_keyring() -> None:
    if not Path(DEBIAN_KEYRING).is_file():
        raise BadInputError(f"{DEBIAN_KEYRING} is missing: the sandbox's Debian packages are verified with it; "
                            "install it with `sudo apt-get install debian-archive-keyring` and rerun")


def run_host_command(command: list[str], what: str, fix: str, timeout: float = COMMAND_TIMEOUT,
                     env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs ``command``; on failure a one-line BadInputError: what failed, its last line, and the fix."""
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})}, cwd=cwd)
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
