"""Shared fixtures: the real-data folder (skipped with a reason when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from spcxr.paths import ENV_VAR, shared_data_dir


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real chest X-ray folder; skips the test when it is absent."""
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            f"real chest X-ray folder not found: set {ENV_VAR} or place it at ../shared/data/cxr"
        )
    return path
