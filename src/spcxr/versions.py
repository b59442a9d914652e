"""Versions of the libraries that decide a result (recorded with every store and run)."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from spcxr import __version__


def library_versions(*packages: str) -> dict[str, str]:
    """spcxr's and Python's versions, plus each named installed distribution's."""
    out = {"spcxr": __version__, "python": platform.python_version()}
    for package in packages:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out
