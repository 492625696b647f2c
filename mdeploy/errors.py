"""Errors that reach the user as one line and a documented exit code."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Process exit codes of every mdeploy command (documented in the README)."""

    OK = 0
    PARITY_FAILED = 1
    BAD_INPUT = 2
    CONVERSION_FAILED = 3
    INTERRUPTED = 130


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
