"""The exit-status convention of every command (src/spcxr/errors.py, spcxr.cli.main)."""

from __future__ import annotations

import errno

import pytest

from spcxr import cli
from spcxr.errors import RunFailed, UsageError


@pytest.mark.parametrize(
    ("error", "status", "words"),
    [
        (UsageError("--batch-size must be >= 1, got 0"), 2, "--batch-size"),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "/x/store"), 2, "/x/store"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/run"), 2, "choose a folder"),
        (PermissionError(errno.EACCES, "Permission denied", "/p/run"), 2, "/p/run"),
        (OSError(errno.ENOSPC, "No space left on device", "/full/x.npy"), 1, "run the same"),
        (RunFailed("2 chunks not finished"), 1, "2 chunks"),
    ],
)
def test_errors_become_one_line_and_an_exit_status(monkeypatch, capsys, error, status, words):
    def fail(args):
        raise error

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["synth"].set_defaults(func=fail)
    assert cli.main(["synth"]) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spcxr synth: ") and words in lines[0]
    assert "Errno" not in lines[0]
