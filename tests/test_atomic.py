"""The atomic-write helper names the file in every OS error it lets through."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from spcxr.atomic import atomic_path


def test_an_os_error_without_a_file_is_reraised_naming_the_target(tmp_path: Path) -> None:
    target = tmp_path / "shard.npy"
    with pytest.raises(OSError) as caught, atomic_path(target):
        raise OSError(errno.EIO, "Input/output error")  # e.g. a short write, no file named
    assert caught.value.errno == errno.EIO and caught.value.filename == str(target)
    assert not target.exists() and list(tmp_path.iterdir()) == []  # nothing torn, no temp


def test_an_os_error_naming_a_file_is_left_as_it_is(tmp_path: Path) -> None:
    with pytest.raises(OSError) as caught, atomic_path(tmp_path / "x.json"):
        raise OSError(errno.EACCES, "Permission denied", "/elsewhere")
    assert caught.value.filename == "/elsewhere"
