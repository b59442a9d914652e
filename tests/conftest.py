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


def write_smooth_images(root: Path, n_patients: int, per_patient: int = 2, size: int = 64) -> Path:
    """Class folders of small smooth random grayscale PNGs (``CLASS/personN_M.png``)."""
    import numpy as np
    from PIL import Image
    from scipy.ndimage import gaussian_filter

    k = 0
    for p in range(n_patients):
        label = "abnormal" if p % 2 else "normal"
        (root / label).mkdir(parents=True, exist_ok=True)
        for _ in range(per_patient):
            rng = np.random.default_rng(k)
            img = gaussian_filter(rng.random((size, size)), 3)
            img = (img - img.min()) / (img.max() - img.min())
            Image.fromarray((img * 255).astype(np.uint8)).save(root / label / f"person{p}_{k}.png")
            k += 1
    return root


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory) -> Path:
    """A prepared store of 96 small synthetic images (48 patients), 40 px."""
    from spcxr.data.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("tiny")
    write_smooth_images(root / "images", n_patients=48)
    prepare(
        PrepareConfig(
            sources=[f"folder:{root / 'images'}"],
            out=str(root / "store"),
            image_size=40,
            workers=1,
            progress=False,
        )
    )
    return root / "store"
