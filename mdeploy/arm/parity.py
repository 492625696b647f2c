"""``mdeploy check --platform linux-arm64``: the ONNX and TFLite artifacts on emulated ARM CPU models, judged
against PyTorch like any run and compared code by code with the x86 run of the same artifact; the others are listed
as skipped, each with its target's reason (``Converter.arm_unavailable``).

Everything here is labelled emulated; no latency is ever taken from it (emulation is ~100x slower than a device
and says nothing about one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mdeploy.arm.compare import codes_on_host, compare_codes
from mdeploy.arm.run import arm_formats, run_on_arm
from mdeploy.arm.sandbox import sandbox_status
from mdeploy.artifacts import target_of
from mdeploy.converters import REGISTRY
from mdeploy.errors import BadInputError
from mdeploy.parity import ParityResult

ARM_SAMPLES = 8  # emulation is slow: parity on a handful of inputs


def arm_parity(files: list[Path], inputs: np.ndarray, cpus: tuple[str, ...],
               judge_one: Callable[[Path, np.ndarray, str], ParityResult],
               progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """``judge_one(path, outputs, description)`` judges an artifact's outputs on ``inputs[:ARM_SAMPLES]``."""
    state = sandbox_status()
    if not state.ready:
        raise BadInputError(f"the ARM sandbox is not ready ({state.reason}): run `mdeploy arm setup` first")
    runnable = [path for path in files if path.suffix in arm_formats()]
    if not runnable:
        kinds = " and ".join(arm_formats())
        raise BadInputError(f"--platform linux-arm64 runs {kinds} artifacts, and there is none to run")
    samples = np.ascontiguousarray(inputs[:ARM_SAMPLES], dtype=np.float32)
    description = f"{len(samples)} of the evaluation samples, emulated"
    host = {path: codes_on_host(path, samples) for path in runnable}
    results = []
    for cpu in cpus:
        progress(f"running {len(runnable)} artifact(s) on an emulated {cpu} (qemu-user, not a device)")
        runs = run_on_arm(runnable, samples, cpu)
        for path in runnable:
            run = runs[str(path)]
            difference = compare_codes(run, host[path])
            results.append({
                "artifact": path.name, "cpu": cpu, "runtime": run.runtime, "emulated": True,
                "cpu_features": list(run.cpu_features),
                "parity": judge_one(path, run.outputs, description).to_dict(),
                "vs_x86": difference.to_dict(), "summary": difference.summary(),
            })
    return {"platform": "linux-arm64", "emulated": True, "emulator": f"qemu-user {state.qemu_version}",
            "cpus": list(cpus), "samples": len(samples), "skipped": [skipped(p) for p in files if p not in runnable],
            "note": "emulated ARM kernels for parity only: no latency is measured under emulation",
            "results": results}


def skipped(path: Path) -> dict[str, str]:
    """An artifact that does not run under emulation, and why."""
    return {"artifact": path.name, "reason": REGISTRY[target_of(path)].arm_unavailable}
