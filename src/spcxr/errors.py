"""Errors and exit statuses shared by every ``spcxr`` command.

Exit status convention (README, "Exit status"):

* 0 - the command did what was asked.
* 1 - the run failed (e.g. the disk filled up; what was written is intact and the same command
  resumes), or ``--strict`` found inputs that had to be skipped.
* 2 - a usage error: a bad flag value, a missing or unreadable input, an output path that cannot
  be used. Nothing was started.

Every error reaches the user as one line that names the file or the flag (no traceback).
"""

from __future__ import annotations

import errno

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(ValueError):
    """A bad flag value or an unusable input / output path (exit status 2)."""


class RunFailed(RuntimeError):
    """A run that started but could not finish (exit status 1)."""


class RunStopped(Exception):
    """A run that stopped on purpose before its end, with its checkpoint saved: a spent
    ``--time-budget`` / ``--step-budget`` (exit status 0) or SIGTERM / Ctrl-C (128 + the signal's
    number, the shell's convention). The same command continues it."""

    def __init__(self, message: str, exit_status: int) -> None:
        super().__init__(message)
        self.exit_status = exit_status


# Raised before any work starts: the user must change the command or the files it names.
USAGE_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def error_line(error: BaseException) -> str:
    """One line for ``error``: for OS errors the reason and the file, without the errno prefix."""
    if isinstance(error, OSError) and error.strerror:
        where = f": {error.filename}" if error.filename else ""
        hint = ""
        if error.errno == errno.ENOSPC:
            hint = " (free some space and run the same command again: it resumes)"
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = " (choose a folder you can write to)"
        return f"{error.strerror}{where}{hint}"
    text = str(error).strip() or type(error).__name__
    return " ".join(text.splitlines())


def is_usage_os_error(error: OSError) -> bool:
    """An OS error the user fixes by naming another path (not a failure of the run itself)."""
    return error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR)
