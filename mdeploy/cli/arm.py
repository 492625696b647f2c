"""``mdeploy arm setup`` / ``mdeploy arm status``: the emulated aarch64 sandbox behind ``check --platform``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.cli.app import app, run_guarded, stdout
from mdeploy.cli.options import DebugOpt, JsonOpt
from mdeploy.pipeline import dump_json
from mdeploy.ui import ConsoleReporter

arm_app = typer.Typer(help="The emulated ARM (aarch64) sandbox: ONNX Runtime and LiteRT on ARM kernels under "
                           "qemu-user, for `mdeploy check --platform linux-arm64`.", no_args_is_help=True)
app.add_typer(arm_app, name="arm")
FolderOpt = Annotated[Path | None, typer.Option(
    "--folder", help="sandbox folder [default: $MDEPLOY_ARM_SANDBOX or ~/.cache/mdeploy/arm64-sandbox]")]


def print_state(state: dict[str, Any]) -> None:
    stdout.print(f"ARM sandbox {state['path']}: {'[green]ready[/green]' if state['ready'] else '[red]not ready[/red]'}"
                 f" ({state['reason']})", highlight=False, soft_wrap=True)
    if state["ready"]:
        packages = ", ".join(f"{name} {version}" for name, version in sorted(state["packages"].items()))
        stdout.print(f"qemu-user {state['qemu_version']}, guest Python {state['python_version']}, {packages}; "
                     f"{state['size_mb']} MB", highlight=False, soft_wrap=True)


@arm_app.command("setup")
def setup(folder: FolderOpt = None, json_output: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Build the sandbox from registry packages (Debian qemu-user and an arm64 userland, aarch64 wheels from PyPI).
    Needs root and a Debian-like host; cached: a second run returns at once."""
    from mdeploy.arm import setup_sandbox

    reporter = ConsoleReporter(quiet=json_output)
    state = run_guarded(debug, lambda: setup_sandbox(folder, progress=reporter.step).to_dict())
    print(dump_json(state)) if json_output else print_state(state)


@arm_app.command("status")
def status(folder: FolderOpt = None, json_output: JsonOpt = False) -> None:
    """Whether the sandbox is ready, and what it holds (runs nothing)."""
    from mdeploy.arm import sandbox_status

    state = sandbox_status(folder).to_dict()
    print(dump_json(state)) if json_output else print_state(state)
