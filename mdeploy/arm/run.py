"""Runs ONNX and TFLite artifacts on emulated ARM CPUs (qemu-user in the chrooted sandbox) and reads their outputs
back. Emulation is ~100x slower than a device: use a handful of inputs, and never read ``seconds`` as a latency.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.arm.compare import CodeDifference, HostRun, codes_on_host, compare_codes, recovered_codes
from mdeploy.arm.cpus import check_cpu
from mdeploy.arm.guest import GUEST_WORK, run_guest
from mdeploy.arm.sandbox import default_sandbox_dir, sandbox_status
from mdeploy.converters import REGISTRY, tflite_io
from mdeploy.errors import BadInputError, ConversionError

__all__ = ["ArmRun", "CodeDifference", "HostRun", "arm_formats", "codes_on_host", "compare_codes", "guest_sees",
           "run_on_arm"]

KERNELS = ("xnnpack", "builtin", "reference")
RUNNER = Path(__file__).with_name("guest_runner.py")
# Copied beside the runner into each work folder (as the file name given): the guest imports them from there.
GUEST_MODULES = {"tflite_io.py": Path(tflite_io.__file__)}


def arm_formats() -> dict[str, str]:
    """Artifact suffix -> the guest runner's name for its format, for every registered target it can run."""
    return {converter.suffix: converter.arm_format for converter in REGISTRY.values() if converter.arm_format}


@dataclass(frozen=True)
class ArmRun:
    """One artifact run on one emulated ARM CPU model."""

    artifact: Path
    cpu: str
    outputs: np.ndarray  # float32 (N, classes), dequantised
    codes: np.ndarray | None  # raw int8/uint8 output codes (ONNX QDQ: recovered from the dequantised output)
    seconds: float  # guest wall time to load and run it under emulation: for information only, NOT a latency
    runtime: str  # e.g. "ai-edge-litert 2.3.0 (xnnpack)"
    cpu_features: tuple[str, ...] = ()  # what the guest's /proc/cpuinfo reported
    emulated: bool = True


def run_on_arm(artifacts: Sequence[Path], inputs: np.ndarray, cpu: str, sandbox: Path | None = None,
               kernels: str = "xnnpack", timeout: float | None = None) -> dict[str, ArmRun]:
    """Runs every artifact on ``inputs`` (preprocessed NCHW float32) on the emulated ``cpu``, one image at a time.
    Returns one ArmRun per artifact, keyed by ``str(path)`` as given."""
    check_cpu(cpu)
    if kernels not in KERNELS:
        raise BadInputError(f"unknown LiteRT kernels {kernels!r}: choose from {', '.join(KERNELS)}")
    paths = [checked_artifact(Path(path)) for path in artifacts]
    images = checked_inputs(inputs)
    root = ready_sandbox(sandbox)
    timeout = timeout if timeout is not None else 120.0 + 30.0 * len(images) * max(len(paths), 1)
    with work_folder(root) as (host_dir, guest_dir):
        keys = {f"a{index}": path for index, path in enumerate(paths)}
        entries = [{"key": key, "file": key + path.suffix, "format": arm_formats()[path.suffix]}
                   for key, path in keys.items()]
        for entry, path in zip(entries, paths, strict=True):
            shutil.copyfile(path, host_dir / entry["file"])
        np.save(host_dir / "inputs.npy", images)
        request = {"inputs": "inputs.npy", "artifacts": entries, "kernels": kernels, "threads": 1}
        result = run_request(root, cpu, host_dir, guest_dir, request, timeout, ", ".join(p.name for p in paths))
        return {str(path): read_run(host_dir, key, path, cpu, result) for key, path in keys.items()}


def guest_sees(paths: Sequence[str], cpu: str = "cortex-a53", sandbox: Path | None = None) -> dict[str, Any]:
    """What the guest reports about itself and whether it can read each of ``paths`` (isolation checks, doctor)."""
    check_cpu(cpu)
    root = ready_sandbox(sandbox)
    with work_folder(root) as (host_dir, guest_dir):
        request = {"artifacts": [], "probe_paths": list(paths)}
        result = run_request(root, cpu, host_dir, guest_dir, request, 300.0, "the guest probe")
    return {"guest": result["guest"], "readable": result["probes"]}


def checked_artifact(path: Path) -> Path:
    if path.suffix not in arm_formats():
        raise BadInputError(f"{path.name} cannot run on emulated ARM: only {' and '.join(arm_formats())} artifacts "
                            "can")
    if not path.is_file():
        raise BadInputError(f"{path} does not exist: pass an existing artifact file")
    return path


def checked_inputs(inputs: np.ndarray) -> np.ndarray:
    images = np.ascontiguousarray(inputs, dtype=np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise BadInputError(f"ARM runs take preprocessed (N, C, H, W) inputs, got shape {images.shape}")
    return images


def ready_sandbox(sandbox: Path | None) -> Path:
    state = sandbox_status(sandbox if sandbox is not None else default_sandbox_dir())
    if not state.ready:
        raise BadInputError(f"the ARM sandbox {state.path} is not ready: {state.reason}")
    return state.path


@contextmanager
def work_folder(root: Path) -> Iterator[tuple[Path, str]]:
    """A fresh folder inside the sandbox (host path, guest path), removed afterwards whatever happens."""
    name = uuid.uuid4().hex
    host_dir = root / GUEST_WORK / name
    host_dir.mkdir(parents=True)
    try:
        yield host_dir, f"/{GUEST_WORK}/{name}"
    finally:
        shutil.rmtree(host_dir, ignore_errors=True)


def run_request(root: Path, cpu: str, host_dir: Path, guest_dir: str, request: dict[str, Any], timeout: float,
                what: str) -> dict[str, Any]:
    copy_runner(host_dir)
    (host_dir / "request.json").write_text(json.dumps(request), encoding="utf-8")
    run_guest(root, cpu, [f"{guest_dir}/{RUNNER.name}", guest_dir], timeout, what)
    try:
        return json.loads((host_dir / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConversionError(f"the ARM guest on {cpu} wrote no readable result ({err})") from None


def copy_runner(folder: Path) -> Path:
    """The current guest_runner.py and the modules it imports (never stale copies in the sandbox), into ``folder``;
    returns the runner's path there."""
    for name, source in {RUNNER.name: RUNNER, **GUEST_MODULES}.items():
        shutil.copyfile(source, folder / name)
    return folder / RUNNER.name


def read_run(host_dir: Path, key: str, path: Path, cpu: str, result: dict[str, Any]) -> ArmRun:
    found = result["artifacts"][key]
    if found.get("xnnpack_delegate") is False and found["runtime"].endswith("(xnnpack)"):
        raise ConversionError(f"LiteRT did not create its XNNPACK delegate for {path.name} on emulated {cpu}: "
                              "the run would not test XNNPACK's kernels; rebuild with `mdeploy arm setup`")
    outputs = np.load(host_dir / f"{key}.outputs.npy")
    codes = np.load(host_dir / f"{key}.codes.npy") if found["has_codes"] else recovered_codes(path, outputs)
    seconds = found["load_seconds"] + found["run_seconds"]
    return ArmRun(path, cpu, outputs, codes, float(seconds), found["runtime"],
                  tuple(result["guest"].get("features", [])))
