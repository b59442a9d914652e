"""Atomic file writes: write to a temporary file in the same folder, fsync, rename.

Every file spcxr writes that a later run trusts (store shards, manifests, checkpoints, exported
weights, reports) goes through :func:`atomic_path`, so a process killed at any moment - even by
SIGKILL - leaves either the old file or the new one, never a torn one. A kill can leave the
temporary file itself behind (``.NAME.XXXXXXXX.tmp``); :func:`remove_orphans` deletes those when
the run starts again.

Files are created with mode ``0666`` minus the process umask, like any ``open(..., "w")``
(``tempfile.mkstemp`` would give ``0600`` whatever the umask: files a colleague cannot read).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

#: Temporary files of :func:`atomic_path` (and of ``tempfile.mkstemp`` in earlier versions).
ORPHAN_PATTERN = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")

#: Below this much free space, a failed write is taken to be a full disk (a write fails with
#: ENOSPC when the last blocks are gone, so what is left is at most a few blocks).
FULL_DISK_BYTES = 4 << 20


def _fsync(path: str | Path, *, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_bytes(folder: Path) -> int:
    """Bytes an unprivileged process may still write in ``folder``'s file system."""
    return shutil.disk_usage(folder).free


def disk_full(folder: str | Path) -> bool:
    """Whether ``folder``'s file system has (next to) no space left."""
    try:
        return _free_bytes(Path(folder)) < FULL_DISK_BYTES
    except OSError:
        return False


def _create_temporary(path: Path) -> Path:
    """A new empty file ``.NAME.XXXXXXXX.tmp`` next to ``path``, mode 0666 minus the umask."""
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def naming(path: str | Path) -> Iterator[None]:
    """Re-raise an ``OSError`` that names no file (a short write on a full disk, pyarrow's
    I/O errors) as the same error naming ``path``, so the user's one line says where."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        raise OSError(err.errno, err.strerror or str(err), os.fspath(path)) from err


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is fsynced and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was. A library that
    reports a failed write without an errno (``torch.save``: "enforce fail at
    inline_container.cc", safetensors' ``SafetensorError``) on a full disk is re-raised as
    ``OSError(ENOSPC)`` naming ``path``, so the user reads one line that says what to do; any
    other OS error that names no file is re-raised naming ``path`` (:func:`naming`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary(path)
    try:
        with naming(path):
            try:
                yield tmp
                _fsync(tmp)
                os.replace(tmp, path)
                _fsync(path.parent, directory=True)  # make the rename itself durable
            except Exception as e:
                if (not isinstance(e, OSError) or e.errno is None) and disk_full(path.parent):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from e
                raise
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete temporary files that an interrupted :func:`atomic_path` left in ``folder`` (and
    its direct subfolders, e.g. a run's ``model/`` and ``encoder/``); returns them.

    Call it only when this process owns the folder (a run starting or resuming in it): a
    temporary file of a write in progress elsewhere would be deleted too.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for candidate in [*folder.glob("*.tmp"), *folder.glob("*/*.tmp")]:
        if ORPHAN_PATTERN.match(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed
