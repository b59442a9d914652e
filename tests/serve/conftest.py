"""Tiny trained runs shared by the serve tests (built once per session, in seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.inference.test_predict import make_class_run, make_seg_run


@pytest.fixture(scope="session")
def serve_class_run(synth_store, tmp_path_factory) -> Path:
    return make_class_run(synth_store, tmp_path_factory.mktemp("serve") / "cls")


@pytest.fixture(scope="session")
def serve_seg_run(synth_store, tmp_path_factory) -> Path:
    return make_seg_run(synth_store, tmp_path_factory.mktemp("serve") / "seg")
