"""The readers on the real chest radiograph DICOM files in ``<shared data>/dicom``.

The folder holds 4 original files (MONOCHROME1/2, 8-15 bits, uncompressed, JPEG baseline,
JPEG 2000, one without file meta header) and 3 derived ones; ``manifest.csv`` documents each.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from spcxr.io import LoadedImage, read_image

pytestmark = pytest.mark.real_data

ORIGINALS = (
    "nih_cxr14_dx_mono2_8bit.dcm",
    "siim_cr_mono2_8bit_jpegbaseline_chest.dcm",
    "cr_mono1_10bit_chest.dcm",
    "rg1_cr_mono1_15bit_chest_j2k.dcm",
)
RG1_UNCOMPRESSED = "derived/rg1_cr_mono1_15bit_chest_uncompressed.dcm"
RG1_HALFRES = "derived/rg1_derived_mono2_12bit_halfres.dcm"
FAKE_MONO1 = "derived/xrv_fake_monochrome1_jpegbaseline_chest.dcm"
ALL_FILES = (*ORIGINALS, RG1_UNCOMPRESSED, RG1_HALFRES, FAKE_MONO1)
PREVIEW_MIN_CORRELATION = 0.97  # measured >= 0.9999 on all four originals
LUNG_CONTRAST_MARGIN = 0.1  # measured 0.14-0.27 (mediastinum minus brighter lateral third)


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture(scope="module")
def manifest(dicom_dir: Path) -> dict[str, dict[str, str]]:
    with (dicom_dir / "manifest.csv").open(newline="") as handle:
        return {row["file"]: row for row in csv.DictReader(handle)}


@pytest.fixture(scope="module")
def images(dicom_dir: Path) -> dict[str, LoadedImage]:
    """Every file read once through the content-dispatching entry point."""
    return {name: read_image(dicom_dir / name) for name in ALL_FILES}


def small(pixels: np.ndarray, size: int = 128) -> np.ndarray:
    """Bilinear resize to ``size x size`` (float, no 8-bit rounding)."""
    image = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def lung_contrast(pixels: np.ndarray) -> tuple[float, float, float]:
    """Means of the central vertical strip and the two lateral thirds in the middle rows."""
    height, width = pixels.shape
    rows = pixels[int(0.35 * height) : int(0.65 * height)]
    centre = rows[:, int(0.45 * width) : int(0.55 * width)].mean()
    left = rows[:, : width // 3].mean()
    right = rows[:, 2 * width // 3 :].mean()
    return float(centre), float(left), float(right)


def test_manifest_lists_exactly_these_files(manifest: dict[str, dict[str, str]]) -> None:
    assert set(manifest) == set(ALL_FILES)


@pytest.mark.parametrize("name", ALL_FILES)
def test_reads_with_manifest_geometry_and_header(
    name: str, images: dict[str, LoadedImage], manifest: dict[str, dict[str, str]]
) -> None:
    image, row = images[name], manifest[name]
    pixels, meta = image.pixels, image.meta
    assert pixels.dtype == np.float32
    assert pixels.shape == (int(row["rows"]), int(row["columns"]))
    assert pixels.min() >= 0.0 and pixels.max() <= 1.0
    assert pixels.std() > 0.1  # a real image, not a constant
    assert meta["format"] == "dicom"
    assert (meta["height"], meta["width"]) == pixels.shape
    assert meta["bits_stored"] == int(row["bits_stored"])
    assert meta["photometric"] == row["photometric"]
    assert meta["inverted"] is (row["photometric"] == "MONOCHROME1")
    assert meta["transfer_syntax"] == row["transfer_syntax"]  # inferred for the headerless file
    assert meta["modality"] == row["modality"]
    assert meta["body_part"] == (row["body_part"] or None)
    assert meta["view"] == (row["view"] or None)
    assert meta["sex"] == (row["sex"] or None)
    assert meta["age"] == (float(row["age"]) if row["age"] else None)
    if row["window_center"]:
        assert meta["windowing"] == "window"
        center, width = float(row["window_center"]), float(row["window_width"])
        assert meta["window"] == pytest.approx(
            (center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
        )
    else:
        assert meta["windowing"] == "percentile"


@pytest.mark.parametrize("name", ORIGINALS)
def test_originals_agree_with_their_previews(
    name: str, images: dict[str, LoadedImage], dicom_dir: Path
) -> None:
    preview_path = dicom_dir / "previews" / name.replace(".dcm", ".png")
    with Image.open(preview_path) as preview:
        reference = np.asarray(preview.convert("L"), dtype=np.float32) / 255
    correlation = pearson(small(images[name].pixels), small(reference))
    assert correlation > PREVIEW_MIN_CORRELATION, f"{name}: r = {correlation:.4f}"


@pytest.mark.parametrize("name", [n for n in ALL_FILES if n != FAKE_MONO1])
def test_lungs_are_darker_than_the_mediastinum(name: str, images: dict[str, LoadedImage]) -> None:
    centre, left, right = lung_contrast(images[name].pixels)
    assert centre > max(left, right) + LUNG_CONTRAST_MARGIN, (name, centre, left, right)


def test_uncompressed_rg1_equals_the_jpeg2000_original(images: dict[str, LoadedImage]) -> None:
    original, derived = images[ORIGINALS[3]], images[RG1_UNCOMPRESSED]
    np.testing.assert_array_equal(derived.pixels, original.pixels)
    ignore = {"transfer_syntax", "sop_uid"}
    assert {k: v for k, v in derived.meta.items() if k not in ignore} == {
        k: v for k, v in original.meta.items() if k not in ignore
    }


def test_12bit_halfres_monochrome2_variant_matches_rg1(images: dict[str, LoadedImage]) -> None:
    rg1 = images[ORIGINALS[3]].pixels  # MONOCHROME1, inverted by the reader
    half = images[RG1_HALFRES].pixels  # MONOCHROME2, not inverted
    rows, cols = min(half.shape[0], rg1.shape[0] // 2), min(half.shape[1], rg1.shape[1] // 2)
    binned = rg1[: 2 * rows, : 2 * cols].reshape(rows, 2, cols, 2).mean(axis=(1, 3))
    assert pearson(binned, half[:rows, :cols]) > 0.99  # measured 0.9995


def test_lying_header_is_obeyed_not_fixed(images: dict[str, LoadedImage]) -> None:
    """The fake file has the SIIM file's pixels but says MONOCHROME1.

    Nothing in the file tells a reader that the header lies, so spcxr reads it as its header
    says: it comes out as the exact negative of the SIIM image, and the lung-contrast check
    above (which a pipeline may use for quality control) flags it as inverted. spcxr does not
    silently "fix" it.
    """
    siim, fake = images[ORIGINALS[1]], images[FAKE_MONO1]
    assert fake.meta["inverted"] is True and siim.meta["inverted"] is False
    assert pearson(siim.pixels, fake.pixels) < -0.999
    np.testing.assert_allclose(fake.pixels, 1.0 - siim.pixels, atol=1e-6)
    centre, left, right = lung_contrast(fake.pixels)
    assert centre < min(left, right) - LUNG_CONTRAST_MARGIN
