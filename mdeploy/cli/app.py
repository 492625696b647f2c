"""The typer application, its consoles, and the guard that turns every failure into one line and an exit code."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from mdeploy.errors import ExitCode, Interrupted, MdeployError, first_line


def _raise_interrupted(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_IGN)  # already stopping: a second SIGTERM must not cut the clean-up short
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (``kill``, ``timeout``, a CI runner cancelling a job) stops the command like Ctrl-C: it raises
    ``Interrupted`` (a KeyboardInterrupt), so the staging folder is removed, a previous output folder stays intact,
    one ``interrupted`` line is printed and the exit code is 130 (ExitCode.INTERRUPTED, not 143)."""
    if threading.current_thread() is not threading.main_thread():  # signals are only handled on the main thread
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        if previous is _raise_interrupted and signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            pass  # nested, and a SIGTERM is being handled: stay deaf to repeats until the outermost guard exits
        else:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _interrupted_line(err: KeyboardInterrupt, during_work: bool = True) -> str:
    via = f" ({err.signal_name})" if isinstance(err, Interrupted) else ""
    published = getattr(err, "output_published", None)  # set by mdeploy.outputs.staged_output
    if published is not None:
        return f"[red]interrupted[/red]{via} just after {escape(str(published))} was written in full"
    if not during_work:  # outside run_guarded: before the work started, or while its result was printed
        return f"[red]interrupted[/red]{via}"
    return f"[red]interrupted[/red]{via}: nothing was written to the output folder"


class OneLineErrors(TyperGroup):
    """Usage errors (unknown option, invalid choice, missing argument) as one ``error:`` line with exit code 2,
    like every other error of the tool, instead of a usage block (or a boxed panel with rich installed).
    SIGTERM is handled like Ctrl-C while a command runs (see ``sigterm_interrupts``)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            with sigterm_interrupts():
                return self._main(*args, standalone_mode=standalone_mode, **kwargs)
        except SystemExit:
            # The command is over and its exit code chosen (an error line may be printed already): a signal during
            # the interpreter's shutdown must not turn it into 143 or a KeyboardInterrupt traceback.
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_IGN)
            raise

    def invoke(self, ctx: Any) -> Any:
        # A Ctrl-C outside run_guarded (parsing, imports, printing the result): typer would exit 130 silently.
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as err:
            stderr.print(_interrupted_line(err, during_work=False), highlight=False)
            raise typer.Exit(int(ExitCode.INTERRUPTED)) from None

    def _main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
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
            print_error(f"{err.format_message()}{hint}")
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


def print_error(message: str) -> None:
    """The one ``error:`` line; the message is printed as it is (a path or library text with [brackets] is not
    markup)."""
    stderr.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def run_guarded(debug: bool, action: Callable[[], T]) -> T:
    """Turns every failure into one line on stderr and its exit code (the traceback only with --debug). SIGTERM
    stops ``action`` like Ctrl-C, also for callers outside the typer app (``python -m mdeploy.demo``)."""
    try:
        with sigterm_interrupts():
            return action()
    except MdeployError as err:
        if debug:
            traceback.print_exc()
        print_error(str(err))
        raise typer.Exit(int(err.exit_code)) from None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (Interrupted): the staging folder is gone by now
        if debug:
            traceback.print_exc()
        stderr.print(_interrupted_line(err), highlight=False)
        raise typer.Exit(int(ExitCode.INTERRUPTED)) from None
    except typer.Exit:
        raise
    except Exception as err:  # a bug or a library failure: still one line, and a way to see more
        if debug:
            traceback.print_exc()
        print_error(f"{type(err).__name__}: {first_line(err)} (run with --debug for the traceback)")
        raise typer.Exit(int(ExitCode.CONVERSION_FAILED)) from None
