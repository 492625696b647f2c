"""Parity on ARM kernels without an ARM device (DESIGN.md §5): ONNX Runtime and LiteRT (XNNPACK or builtin
kernels) run under qemu-user, posing as a chosen ARM CPU model, chrooted into an arm64 Debian sandbox.

    setup_sandbox()                       # once, as root: ~1 minute, ~440 MB, cached; remove_sandbox() deletes it
    runs = run_on_arm([path], inputs, "neoverse-n1")
    diff = compare_codes(runs[str(path)], codes_on_host(path, inputs))

Emulation is ~100x slower than a device: a handful of inputs, and never a latency.
"""

from mdeploy.arm.compare import CodeDifference, HostRun, codes_on_host, compare_codes
from mdeploy.arm.cpus import CPU_MODELS, DEFAULT_CPUS, check_cpu, parse_cpu_list
from mdeploy.arm.run import ArmRun, guest_sees, run_on_arm
from mdeploy.arm.sandbox import (
    SandboxState, default_sandbox_dir, remove_sandbox, sandbox_paths, sandbox_status, setup_sandbox,
)

__all__ = [
    "CPU_MODELS", "DEFAULT_CPUS", "ArmRun", "CodeDifference", "HostRun", "SandboxState", "check_cpu",
    "codes_on_host", "compare_codes", "default_sandbox_dir", "guest_sees", "parse_cpu_list", "remove_sandbox",
    "run_on_arm", "sandbox_paths", "sandbox_status", "setup_sandbox",
]
