"""Errors a user can fix: the CLI prints their message on one line instead of a traceback.

Only errors palmkit raises on purpose for bad input (PalmkitError and its subclasses) and the operating system's
answers about the paths a user gave are shown that way; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class PalmkitError(ValueError):
    """Bad input (a path, a file, a value); the message says what and where.

    A ValueError, so that code catching bad values (the server's 400 answers) catches these too.
    """


# The operating system's answers about a path the user gave.
USER_ERRORS: tuple[type[BaseException], ...] = (PalmkitError, FileNotFoundError, NotADirectoryError,
                                                 IsADirectoryError, PermissionError)


class CheckpointError(PalmkitError):
    """A checkpoint file is missing or unreadable; the message names the file."""
