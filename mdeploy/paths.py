"""Paths read from files must stay inside the package or folder that lists them.

An .mlpackage's ``Manifest.json`` names its items, an output folder's ``manifest.json`` names its artifacts, golden
vectors and channel scales, ``SHA256SUMS`` names every file: a damaged or crafted entry (an absolute path, ``..``
climbing out, a symlink to elsewhere) would make mdeploy read, parse or run a file the user never gave it. Every such
path goes through :func:`resolve_inside`, and the artifacts of a folder are compared with ``SHA256SUMS`` before they
are checked or timed (:func:`checksum_mismatches`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from mdeploy.errors import BadInputError
from mdeploy.manifest import MANIFEST_FILE, Golden, GoldenArray, GoldenArtifact, GoldenInputs, Manifest

CHECKSUMS_FILE = "SHA256SUMS"  # the bundle's list of every file and its sha256 (mdeploy.bundle writes it)
_FIX = "mdeploy reads only files inside the package or folder that lists them; the entry is damaged or crafted, " \
       "convert again"


def resolve_inside(root: Path, relative: object, what: str) -> Path:
    """``root / relative`` if it stays inside ``root`` once ``..`` and every symlink are resolved; else a
    BadInputError naming ``what`` (the entry and the file it was read from, e.g. "item X of a.mlpackage/Manifest.json").

    Absolute paths are refused even when they point inside ``root``: the entries mdeploy writes are all relative.
    The path returned is ``root / relative`` as written (its name is what reports show), not the resolved one.
    """
    if not isinstance(relative, str) or not relative.strip() or "\0" in relative:
        raise BadInputError(f"{what} is {relative!r}, not a relative path inside {root}: {_FIX}")
    if PurePosixPath(relative).is_absolute() or PureWindowsPath(relative).is_absolute():
        raise BadInputError(f"{what} is the absolute path {relative!r}, not a path inside {root}: {_FIX}")
    base = Path(os.path.realpath(root))
    target = Path(os.path.realpath(base / relative))
    if target != base and base not in target.parents:
        via = "a symlink" if ".." not in PurePosixPath(relative.replace("\\", "/")).parts else "'..'"
        raise BadInputError(f"{what} ({relative!r}) leads outside {root} through {via} (to {target}): {_FIX}")
    return root / relative


def check_tree_inside(root: Path, what: str) -> None:
    """No symlink anywhere under the folder ``root`` (an .mlpackage) leads outside it."""
    for folder, dirs, files in os.walk(root):  # does not follow symlinked folders; they are checked as entries
        for name in dirs + files:
            path = Path(folder) / name
            if path.is_symlink():
                resolve_inside(root, path.relative_to(root).as_posix(), f"a symlink in {what}")


def manifest_paths(folder: Path, manifest: Manifest) -> dict[str, Path]:
    """Checks every path an output folder's manifest.json names (artifacts, channel scales, labels, golden vectors)
    and returns the artifacts' paths by their ``file`` entry."""
    source = folder / MANIFEST_FILE
    artifacts = {entry.file: resolve_inside(folder, entry.file, f"artifact entry 'file' of {source}")
                 for entry in manifest.artifacts}
    scales = manifest.quantization.channel_scales_file if manifest.quantization else None
    for key, value in (("quantization.channel_scales_file", scales), ("labels_file", manifest.labels_file)):
        if value is not None:
            resolve_inside(folder, value, f"{key} of {source}")
    for where, value in _golden_paths(manifest.golden):
        resolve_inside(folder, value, f"golden entry {where} of {source}")
    return artifacts


def _golden_paths(golden: Golden | None) -> list[tuple[str, str]]:
    if golden is None:
        return []
    found = [(f"images[{i}]", image) for i, image in enumerate(golden.images) if image is not None]
    arrays: list[tuple[str, GoldenArray | GoldenInputs | GoldenArtifact]] = [
        ("inputs", golden.inputs), ("pytorch_outputs", golden.pytorch_outputs)]
    arrays += [(f"artifacts.{name}", entry) for name, entry in golden.artifacts.items()]
    for where, entry in arrays:
        found += [(f"{where}.npy", entry.npy), (f"{where}.f32", entry.f32)]
    return found


def read_checksums(folder: Path) -> dict[str, str] | None:
    """``SHA256SUMS`` of an output folder (relative path -> hex digest), None when the folder has none."""
    path = folder / CHECKSUMS_FILE
    if not path.is_file():
        return None
    sums: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        lines = ["\0"]
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        digest, _, name = line.partition(" ")
        name = name[1:] if name[:1] in (" ", "*") else name
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise BadInputError(f"{path} line {number} is not 'SHA256  FILE': the file is damaged; convert again "
                                "(or rewrite it with sha256sum)")
        resolve_inside(folder, name, f"entry {name!r} (line {number}) of {path}")
        sums[name] = digest.lower()
    return sums


def feed_file(digest: Any, path: Path) -> Any:
    """``digest`` (a hashlib object) updated with the bytes of ``path``, read in 1 MB blocks."""
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file (the one streaming digest of mdeploy; verify_bundle.py keeps its own, as it runs
    without mdeploy)."""
    return feed_file(hashlib.sha256(), path).hexdigest()


def _files_of(folder: Path, name: str) -> list[str]:
    path = folder / name
    if not path.is_dir():
        return [name]
    check_tree_inside(path, str(path))
    return sorted(Path(root, f).relative_to(folder).as_posix() for root, _, files in os.walk(path) for f in files)


def checksum_mismatches(folder: Path, names: list[str]) -> dict[str, str]:
    """The artifacts among ``names`` (manifest ``file`` entries that exist) whose bytes are not what was converted,
    with the reason, compared file by file (also inside an .mlpackage) with the folder's ``SHA256SUMS``. A folder
    without one (copied by hand, or from before bundles) is not checked: nothing says what was converted."""
    sums = read_checksums(folder)
    if sums is None:
        return {}
    found: dict[str, str] = {}
    for name in names:
        listed = {entry for entry in sums if entry == name or entry.startswith(name + "/")}
        if not listed:
            found[name] = f"not listed in {CHECKSUMS_FILE}"
            continue
        present = _files_of(folder, name)
        changed = [f for f in present if f in listed and sha256_file(folder / f) != sums[f]]
        extra = [f for f in present if f not in listed]
        gone = sorted(listed - set(present))
        for files, what in ((changed, "differs from"), (extra, "is not in"), (gone, "is missing, listed in")):
            if files:
                which = "" if files == [name] else files[0][len(name) + 1:] + (
                    f" (and {len(files) - 1} more)" if len(files) > 1 else "") + " "
                found[name] = f"{which}{what} {CHECKSUMS_FILE}: changed after conversion"
                break
    return found
