"""The ARM CPU models the emulator can pose as, and which kernel family each one makes the runtimes pick.

ONNX Runtime (MLAS), XNNPACK and LiteRT choose their int8 kernels from the CPU features the OS reports
(``getauxval(AT_HWCAP)`` and ``/proc/cpuinfo``); qemu-user reports exactly the features of the ``-cpu`` model, so
each model below exercises one family of kernels.
"""

from __future__ import annotations

from mdeploy.errors import BadInputError

CPU_MODELS: dict[str, str] = {
    "cortex-a53": "Armv8.0 NEON only (Raspberry Pi 3, low-end phones)",
    "cortex-a55": "Armv8.2 NEON + dotprod (little cores of most phones)",
    "cortex-a72": "Armv8.0 NEON only (Raspberry Pi 4)",
    "cortex-a76": "Armv8.2 NEON + dotprod (Raspberry Pi 5, big phone cores)",
    "neoverse-n1": "Armv8.2 NEON + dotprod (AWS Graviton2, Ampere Altra)",
    "neoverse-n2": "Armv9.0 dotprod + i8mm + SVE2",
    "neoverse-v1": "Armv8.4 dotprod + i8mm + SVE 256-bit (AWS Graviton3)",
    "max": "every feature qemu emulates, SME included",
}

DEFAULT_CPUS: tuple[str, ...] = ("cortex-a53", "neoverse-n1", "neoverse-v1")


def check_cpu(name: str) -> str:
    """``name`` if qemu can pose as it, else a BadInputError that lists the models."""
    if name not in CPU_MODELS:
        known = ", ".join(CPU_MODELS)
        raise BadInputError(f"unknown ARM CPU model {name!r}: choose from {known}")
    return name


def parse_cpu_list(text: str) -> list[str]:
    """``"cortex-a53,neoverse-n1"`` (the ``--cpu`` option) as a checked list without duplicates."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        raise BadInputError(f"--cpu needs at least one ARM CPU model: choose from {', '.join(CPU_MODELS)}")
    return list(dict.fromkeys(check_cpu(name) for name in names))
