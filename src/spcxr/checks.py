"""Up-front checks of a command's settings and output folder, as one-line usage errors.

A run that would fail on a bad flag value or an output folder it cannot write should say so
before it loads data or trains, in one line that names the flag as the user spells it
(``--batch-size``, ``--train-optim-lr``; :mod:`spcxr.config` maps fields to flags).
"""

from __future__ import annotations

import errno
import math
import os
import secrets
from pathlib import Path
from typing import Any

from spcxr.errors import UsageError


def require(ok: bool, flag: str, value: Any, rule: str) -> None:
    """Raise ``UsageError("FLAG VALUE: RULE")`` unless ``ok``."""
    if not ok:
        raise UsageError(f"{flag} {value}: {rule}")


def at_least(value: float, minimum: float, flag: str) -> None:
    """``value >= minimum`` (finite)."""
    require(
        isinstance(value, (int, float)) and math.isfinite(value) and value >= minimum,
        flag,
        value,
        f"must be at least {minimum}",
    )


def positive(value: float, flag: str) -> None:
    """``value > 0`` (finite)."""
    require(
        isinstance(value, (int, float)) and math.isfinite(value) and value > 0,
        flag,
        value,
        "must be greater than 0",
    )


def writable_folder(path: str | Path, flag: str = "--out") -> Path:
    """Create ``path`` (and its parents) and prove it can be written: create and remove a probe
    file. Returns the folder.

    Raises:
        UsageError: the folder cannot be created or written (read-only, no permission, a file
            in the way): exit status 2, before any work.
        OSError: ``ENOSPC`` / ``EDQUOT``: the disk is full (exit status 1; free space, rerun).
    """
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".spcxr-write-probe.{secrets.token_hex(4)}"
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
        probe.unlink()
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise
        reason = e.strerror or str(e)
        where = f" ({e.filename})" if e.filename and str(e.filename) != str(folder) else ""
        raise UsageError(
            f"{flag} {folder}: cannot write this folder: {reason}{where}; choose a folder you "
            "can write to"
        ) from None
    return folder
