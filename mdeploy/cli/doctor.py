"""``mdeploy doctor``: versions, which targets work here and why not, the ARM sandbox's state and what its host
lacks, and every folder mdeploy writes outside an output folder (its caches), with sizes."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

from rich.table import Table

from mdeploy.converters import REGISTRY, tool_packages
from mdeploy import __version__
from mdeploy.cli.app import app, stdout
from mdeploy.cli.options import JsonOpt
from mdeploy.cli.output import dump_json



def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def target_rows() -> list[dict[str, Any]]:
    rows = []
    for target, converter in REGISTRY.items():
        availability = converter.availability()
        rows.append({"target": target.value, "status": availability.status, "note": availability.note})
    return rows


def size_mb(path: Path) -> float | None:
    """Size of a file or folder (symlinks not followed), None when it does not exist."""
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir() or path.is_symlink():
        return round(path.lstat().st_size / 1e6, 1)
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return round(total / 1e6, 1)


def checkout_cache() -> Path | None:
    """``.cache/`` of the source checkout mdeploy runs from (the tests' and demo's downloads), if any."""
    root = Path(__file__).resolve().parents[2]
    return root / ".cache" if (root / "pyproject.toml").is_file() else None


def pip_cache_dir() -> Path:
    configured = os.environ.get("PIP_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pip"


def cache_rows() -> list[dict[str, Any]]:
    """Every path mdeploy writes outside an output folder. Nothing else on the host is written (no apt source, no
    system package: the ARM sandbox fetches Debian packages with a private apt into its download cache)."""
    from mdeploy.arm import sandbox_paths
    from mdeploy.demo_assets import default_cache_dir

    arm = sandbox_paths()
    entries = [
        ("ARM sandbox (`mdeploy arm setup`; `mdeploy arm remove` deletes these three)", arm["sandbox"]),
        ("ARM download cache: private apt lists and .debs, qemu, aarch64 wheels", arm["downloads"]),
        ("ARM setup lock file", arm["lock"]),
        ("demo assets (`mdeploy demo`, $MDEPLOY_CACHE)", default_cache_dir().absolute()),
    ]
    repo_cache = checkout_cache()
    if repo_cache is not None and repo_cache.is_dir():
        entries += [(f"checkout cache ({'demo assets' if child.name == 'mdeploy-demo' else 'tests'})", child)
                    for child in sorted(repo_cache.iterdir())]
    entries.append(("pip's own cache, written by the demo's `pip download`", pip_cache_dir()))
    rows, seen = [], set()
    for what, path in entries:
        if path in seen:
            continue
        seen.add(path)
        rows.append({"what": what, "path": str(path), "size_mb": size_mb(path)})
    return rows


def diagnosis() -> dict[str, Any]:
    from mdeploy.arm import sandbox_status
    from mdeploy.arm.host import host_requirements

    return {
        "mdeploy": __version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "packages": {name: package_version(name) for name in tool_packages()},
        "targets": target_rows(),
        "arm_sandbox": sandbox_status().to_dict(),
        "arm_host": host_requirements(),
        "caches": cache_rows(),
    }


@app.command()
def doctor(json_output: JsonOpt = False) -> None:
    """Versions, available targets (and why any is not), the ARM sandbox's state and what its host lacks, and every
    cache folder mdeploy writes, with its size."""
    report = diagnosis()
    if json_output:
        print(dump_json(report))
        return
    stdout.print(f"mdeploy {report['mdeploy']} on Python {report['python']}, {report['machine']}", highlight=False)
    stdout.print(", ".join(f"{name} {version or '[red]missing[/red]'}" for name, version in report["packages"].items()),
                 highlight=False, soft_wrap=True)
    table = Table(title="targets")
    for header in ("target", "status", "note"):
        table.add_column(header)
    for row in report["targets"]:
        table.add_row(row["target"], row["status"], row["note"], style="red" if row["status"] == "unavailable" else None)
    stdout.print(table)
    arm = report["arm_sandbox"]
    stdout.print(f"ARM sandbox ({arm['path']}): {'ready' if arm['ready'] else 'not ready'}: {arm['reason']}",
                 highlight=False, soft_wrap=True)
    missing = [row for row in report["arm_host"] if not row["ok"]]
    if missing:
        stdout.print("ARM sandbox host needs: " + "; ".join(f"{row['need']}: {row['fix']}" for row in missing),
                     highlight=False, soft_wrap=True, style="red")
    else:
        stdout.print("ARM sandbox host: every requirement met (x86_64, Debian-like, root, apt-get, dpkg-deb, tar, "
                     "chroot, gpgv, Debian archive keyring)", highlight=False, soft_wrap=True)
    stdout.print("caches mdeploy writes (outside output folders; nothing else on the host):", highlight=False)
    for row in report["caches"]:
        size = "absent" if row["size_mb"] is None else f"{row['size_mb']} MB"
        stdout.print(f"  {row['path']}  {size}: {row['what']}", highlight=False, soft_wrap=True)
