"""Errors a user can fix: the CLI prints their message on one line instead of a traceback."""

from __future__ import annotations


class PalmkitError(Exception):
    """Bad input (a path, a file, a value); the message says what and where."""


# Raised by the standard library and our dependencies for the same kind of mistake.
USER_ERRORS: tuple[type[BaseException], ...] = (PalmkitError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError, ValueError)


class CheckpointError(PalmkitError):
    """A checkpoint file is missing or unreadable; the message names the file."""
