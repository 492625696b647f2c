"""Errors that reach the user as one line and a documented exit code."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every mdeploy command (documented in the README).

    ``INTERRUPTED`` (130) is used for Ctrl-C (SIGINT) and for SIGTERM alike: both stop the run the same way (the
    staging folder is removed, a previous output folder is left intact, one ``interrupted`` line on stderr), so
    scripts and CI see one code for "stopped before the end", not 143 for SIGTERM.
    """

    OK = 0
    PARITY_FAILED = 1
    BAD_INPUT = 2
    CONVERSION_FAILED = 3
    INTERRUPTED = 130


def first_line(err: BaseException) -> str:
    """The first line of an error from a library (its type when it says nothing), short enough for a one-line
    message."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


@contextmanager
def captured_logs(prefix: str) -> Iterator[list[logging.LogRecord]]:
    """Keep the log records of a library's loggers (``prefix`` and its children) from the user's terminal and hand
    them to the caller instead: PyTorch logs whole tracebacks as warnings before raising a generic error."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep, saved = Keep(), {}
    loggers = [logging.getLogger(prefix)] + [
        logger for name, logger in list(logging.root.manager.loggerDict.items())
        if name.startswith(prefix + ".") and isinstance(logger, logging.Logger) and logger.handlers
    ]
    for logger in loggers:
        saved[logger] = (logger.handlers[:], logger.propagate)
        logger.handlers, logger.propagate = [keep], False
    try:
        yield records
    finally:
        for logger, (handlers, propagate) in saved.items():
            logger.handlers, logger.propagate = handlers, propagate


def logged_cause(records: list[logging.LogRecord]) -> BaseException | None:
    """The last exception a library logged (see ``captured_logs``), if any."""
    return next((r.exc_info[1] for r in reversed(records) if r.exc_info and r.exc_info[1] is not None), None)


class MdeployError(Exception):
    """A failure the user can act on: ``str(err)`` names the problem and the fix."""

    exit_code: ExitCode = ExitCode.CONVERSION_FAILED


class BadInputError(MdeployError):
    """The user's model, data, flags or paths are wrong."""

    exit_code = ExitCode.BAD_INPUT


class ConversionError(MdeployError):
    """A converter or runtime failed on input that looked valid."""

    exit_code = ExitCode.CONVERSION_FAILED


class UnsupportedOpError(ConversionError):
    """The model uses an operator that a target (or the translator) does not support."""


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGTERM) turned into the same clean stop as Ctrl-C: every ``except KeyboardInterrupt``
    and clean-up path runs, and the command exits with ``ExitCode.INTERRUPTED``."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name
