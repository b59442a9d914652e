"""Content-based dispatch of ``read_image`` and the shared types of the readers."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import examples

from spcxr.io import (
    META_KEYS,
    DicomOptions,
    ImageReadError,
    LoadedImage,
    read_image,
    sniff_format,
)
from spcxr.io.types import new_meta

RNG = np.random.default_rng(3)


def ct_example(path: Path) -> Path:
    """pydicom's bundled CT_small.dcm (signed 16-bit, rescaled, MONOCHROME2) copied to ``path``."""
    shutil.copyfile(examples.get_path("ct"), path)
    return path


def headerless(source: Path, path: Path) -> Path:
    """``source`` re-written without preamble and file meta header (implicit VR)."""
    ds = pydicom.dcmread(source)
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
    return path


def gray_png(path: Path) -> Path:
    Image.fromarray(RNG.integers(0, 256, (12, 10)).astype(np.uint8)).save(path, format="PNG")
    return path


def gray_jpeg(path: Path) -> Path:
    Image.fromarray(RNG.integers(0, 256, (12, 10)).astype(np.uint8)).save(path, format="JPEG")
    return path


def gray_tiff(path: Path) -> Path:
    Image.fromarray(RNG.integers(0, 256, (12, 10)).astype(np.uint8)).save(path, format="TIFF")
    return path


@pytest.mark.parametrize(
    ("writer", "name", "fmt"),
    [
        (ct_example, "IM000001", "dicom"),  # no extension
        (ct_example, "scan.png", "dicom"),  # misleading extension
        (gray_png, "export.dcm", "png"),
        (gray_jpeg, "image", "jpeg"),
        (gray_tiff, "image.jpg", "tiff"),
    ],
)
def test_dispatch_is_by_content_not_extension(tmp_path: Path, writer, name: str, fmt: str) -> None:
    image = read_image(writer(tmp_path / name))
    assert image.meta["format"] == fmt
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0


def test_headerless_dicom_without_extension(tmp_path: Path) -> None:
    with_meta = read_image(ct_example(tmp_path / "ct.dcm"))
    bare = headerless(tmp_path / "ct.dcm", tmp_path / "CT0001")
    assert sniff_format(bare.read_bytes()[:132]) is None
    image = read_image(bare)
    np.testing.assert_array_equal(image.pixels, with_meta.pixels)
    assert image.meta["transfer_syntax"] == pydicom.uid.ImplicitVRLittleEndian
    with pytest.raises(ImageReadError, match="not a DICOM, PNG, JPEG or TIFF file"):
        read_image(bare, dicom=DicomOptions(force=False))


def test_ct_example_rescale_and_percentile_window(tmp_path: Path) -> None:
    """A real (bundled) signed CT slice: Rescale Intercept, no window in the header."""
    path = ct_example(tmp_path / "ct.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PixelRepresentation == 1 and "WindowCenter" not in ds
    image = read_image(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    low, high = (float(v) for v in np.percentile(hu, (0.5, 99.5), method="inverted_cdf"))
    assert (image.meta["windowing"], image.meta["window"]) == ("percentile", (low, high))
    np.testing.assert_allclose(image.pixels, np.clip((hu - low) / (high - low), 0, 1), atol=1e-6)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", r"empty file \(0 bytes\)"),
        (b"name,label\na,1\n", r"not a DICOM, PNG, JPEG or TIFF file \(starts with b'name,lab'\)"),
        (bytes(range(256)), "not a DICOM, PNG, JPEG or TIFF file"),
    ],
)
def test_non_images_are_refused_with_the_file_named(
    tmp_path: Path, content: bytes, reason: str
) -> None:
    path = tmp_path / "thing.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as err:
        read_image(path)
    assert err.value.path == path
    assert str(err.value) == f"{path}: {err.value.reason}"


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="file not found"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)


def test_sniff_format_signatures(tmp_path: Path) -> None:
    # CT_small.dcm has a TIFF header in its preamble (a dual-personality file): DICM wins.
    head = ct_example(tmp_path / "ct.dcm").read_bytes()[:132]
    assert head.startswith(b"II*\x00") and sniff_format(head) == "dicom"
    assert sniff_format(bytes(128) + b"DICM") == "dicom"
    assert sniff_format(b"\x89PNG\r\n\x1a\n" + bytes(8)) == "png"
    assert sniff_format(b"\xff\xd8\xff\xe0" + bytes(8)) == "jpeg"
    assert sniff_format(b"II*\x00" + bytes(8)) == "tiff"
    assert sniff_format(b"MM\x00*" + bytes(8)) == "tiff"
    assert sniff_format(b"\x08\x00\x05\x00CS") is None  # headerless DICOM: only a parse can tell
    assert sniff_format(b"GIF89a") is None


def test_error_is_a_picklable_value_error(tmp_path: Path) -> None:
    err = ImageReadError(tmp_path / "x.png", "truncated")
    assert isinstance(err, ValueError)
    copy = pickle.loads(pickle.dumps(err))  # errors cross process boundaries in batch jobs
    assert (copy.path, copy.reason, str(copy)) == (err.path, err.reason, str(err))


def test_every_format_has_the_same_json_serialisable_meta_keys(tmp_path: Path) -> None:
    images = [
        read_image(ct_example(tmp_path / "a")),
        read_image(gray_png(tmp_path / "b")),
        read_image(gray_jpeg(tmp_path / "c")),
        read_image(gray_tiff(tmp_path / "d")),
    ]
    for image in images:
        assert isinstance(image, LoadedImage)
        assert tuple(image.meta) == META_KEYS
        json.dumps(image.meta)
        assert (image.meta["height"], image.meta["width"]) == image.pixels.shape


def test_new_meta_rejects_unknown_keys() -> None:
    assert new_meta(format="png")["format"] == "png"
    with pytest.raises(KeyError, match="colour"):
        new_meta(colour="red")
