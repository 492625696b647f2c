"""``mdeploy arm setup`` / ``status`` / ``remove``: the emulated aarch64 sandbox behind ``check --platform``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mdeploy.cli.app import app, run_guarded, stdout
from mdeploy.cli.options import DebugOpt, JsonOpt
from mdeploy.errors import ExitCode
from mdeploy.cli.output import dump_json
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
    """Build the sandbox from registry packages (Debian qemu-user and an arm64 userland fetched by a private apt,
    aarch64 wheels from PyPI). Changes nothing on the host outside mdeploy's cache. Needs root (chroot) and a
    Debian-like host; cached: a second run returns at once."""
    from mdeploy.arm import setup_sandbox

    reporter = ConsoleReporter(quiet=json_output)
    state = run_guarded(debug, lambda: setup_sandbox(folder, progress=reporter.step).to_dict())
    print(dump_json(state)) if json_output else print_state(state)


@arm_app.command("status")
def status(folder: FolderOpt = None, json_output: JsonOpt = False) -> None:
    """Whether the sandbox is ready, and what it holds (runs nothing). Exit code 0 when it is ready, 2 when it is
    not (as `check --platform linux-arm64` would exit): `mdeploy arm status || mdeploy arm setup`."""
    from mdeploy.arm import sandbox_status

    state = sandbox_status(folder).to_dict()
    print(dump_json(state)) if json_output else print_state(state)
    if not state["ready"]:
        raise typer.Exit(int(ExitCode.BAD_INPUT))


@arm_app.command("remove")
def remove(folder: FolderOpt = None, json_output: JsonOpt = False, debug: DebugOpt = False) -> None:
    """Delete the sandbox, its download cache (apt lists and .debs, qemu, wheels) and its lock file. Refuses a
    folder that is not an mdeploy sandbox."""
    from mdeploy.arm import remove_sandbox

    reporter = ConsoleReporter(quiet=json_output)
    removed = run_guarded(debug, lambda: remove_sandbox(folder, progress=reporter.step))
    if json_output:
        print(dump_json(removed))
    elif removed["removed"]:
        stdout.print(f"removed {len(removed['removed'])} folders, {removed['freed_mb']} MB freed", highlight=False)
    else:
        stdout.print(f"nothing to remove: no ARM sandbox at {removed['path']}", highlight=False, soft_wrap=True)
