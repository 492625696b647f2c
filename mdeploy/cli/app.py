"""The typer application, its consoles, and the guard that turns every failure into one line and an exit code."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from mdeploy.errors import ExitCode, MdeployError


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, invalid choice, missing argument) as one ``error:`` line with exit code 2,
    like every other error of the tool, instead of a usage block (or a boxed panel with rich installed)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as err:  # click's ClickException and its usage errors derive from it
            if not standalone_mode:
                raise
            context = getattr(err, "ctx", None)
            if type(err).__name__ == "NoArgsIsHelpError":  # `mdeploy` alone: the help, as asked for
                print(err.format_message(), file=sys.stderr)
                sys.exit(int(ExitCode.BAD_INPUT))
            hint = f" (see {context.command_path} --help)" if context is not None else ""
            stderr.print(f"[red]error:[/red] {err.format_message()}{hint}", highlight=False, soft_wrap=True)
            sys.exit(int(getattr(err, "exit_code", ExitCode.BAD_INPUT)))
        except typer.Abort:
            if not standalone_mode:
                raise
            stderr.print("[red]interrupted[/red]")
            sys.exit(int(ExitCode.INTERRUPTED))
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="mdeploy",
    cls=OneLineErrors,
    help="Take trained MobileNets to phones: ONNX, TFLite and CoreML, int8 with proven parity.\n\n"
    "Exit codes: 0 ok, 1 parity failed, 2 bad usage or input, 3 conversion or runtime failure, 130 interrupted.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Tables are read in CI logs too: do not squeeze them to 80 columns when stdout is not a terminal.
stdout = Console(width=None if sys.stdout.isatty() else 160)
stderr = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
T = TypeVar("T")


def run_guarded(debug: bool, action: Callable[[], T]) -> T:
    """Turns every failure into one line on stderr and its exit code (the traceback only with --debug)."""
    try:
        return action()
    except MdeployError as err:
        if debug:
            traceback.print_exc()
        stderr.print(f"[red]error:[/red] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(int(err.exit_code)) from None
    except KeyboardInterrupt:
        stderr.print("[red]interrupted[/red]: nothing was written to the output folder")
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except typer.Exit:
        raise
    except Exception as err:  # a bug or a library failure: still one line, and a way to see more
        if debug:
            traceback.print_exc()
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        stderr.print(f"[red]error:[/red] {type(err).__name__}: {first_line} (run with --debug for the traceback)",
                     highlight=False, soft_wrap=True)
        raise typer.Exit(int(ExitCode.CONVERSION_FAILED)) from None
