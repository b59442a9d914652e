"""Where spcxr finds the shared real chest X-ray folder.

The folder is never copied into a project; it is located through ``SPCXR_DATA`` or, when that is
unset, ``../shared/data/cxr`` relative to the current directory or to the repository root.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "SPCXR_DATA"
_REPO_ROOT = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """Return the shared real-data folder (``.../data/cxr``) or ``None`` when it is absent."""
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        return path if path.is_dir() else None
    for base in (Path.cwd(), _REPO_ROOT):
        path = (base / ".." / "shared" / "data" / "cxr").resolve()
        if path.is_dir():
            return path
    return None
