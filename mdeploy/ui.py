"""Progress reporting on stderr, so that stdout stays clean for tables and ``--json``."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Advance = Callable[[int], None]


class Reporter(Protocol):
    def step(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def track(self, description: str, total: int) -> Iterator[Advance]: ...


class ConsoleReporter:
    """Steps as dim lines and a progress bar per long loop, on stderr."""

    def __init__(self, quiet: bool = False) -> None:
        self.console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
        self.quiet = quiet

    def step(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[dim]·[/dim] {escape(message)}", highlight=False)

    def warn(self, message: str) -> None:
        """Shown even when quiet (``--json`` keeps stdout for JSON; warnings go to stderr)."""
        self.console.print(f"[yellow]warning:[/yellow] {escape(message)}", highlight=False, soft_wrap=True)

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Advance]:
        if self.quiet:
            yield lambda n: None
            return
        columns = (TextColumn("  {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(escape(description), total=total)
            yield lambda n: progress.advance(task, n)
        self.console.print(f"[dim]·[/dim] {escape(description)}: {total} done", highlight=False)


class SilentReporter:
    def step(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextmanager
    def track(self, description: str, total: int) -> Iterator[Advance]:
        yield lambda n: None
