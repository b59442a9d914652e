"""Synthetic DICOM fixtures written with pydicom: every number is known, so outputs are exact."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import examples
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_windowing, convert_color_space, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)

from spcxr.io import DicomOptions, ImageReadError, NotDicomError, parse_age, read_dicom

CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
RNG = np.random.default_rng(7)


def make_ds(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    **elements: object,
) -> Dataset:
    """A CR data set holding ``pixels`` plus any extra ``elements`` (keyword=value)."""
    ds = Dataset()
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.Modality = "CR"
    ds.PatientID = "P001"
    ds.PatientSex = "F"
    ds.PatientAge = "062Y"
    ds.ViewPosition = "PA "
    ds.BodyPartExamined = "CHEST"
    ds.Manufacturer = "ACME"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return ds


def save(ds: Dataset, path: Path, *, file_meta: bool = True, implicit_vr: bool = False) -> Path:
    """Write ``ds``; without ``file_meta`` there is no preamble, no DICM and no group 0002."""
    if file_meta:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        pydicom.dcmwrite(path, ds, implicit_vr=implicit_vr, little_endian=True)
    return path


def ramp(bits: int, shape: tuple[int, int] = (32, 64), signed: bool = False) -> np.ndarray:
    """Values spanning the whole ``bits`` range, in the container numpy needs."""
    count = shape[0] * shape[1]
    if signed:
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        low, high = 0, (1 << bits) - 1
    values = np.linspace(low, high, count).round().astype(np.int64).reshape(shape)
    dtype = (np.int8 if signed else np.uint8) if bits <= 8 else (np.int16 if signed else np.uint16)
    return values.astype(dtype)


def exact_percentiles(values: np.ndarray, q: tuple[float, float]) -> tuple[float, float]:
    """numpy's inverted-CDF percentiles as floats (numpy keeps the integer dtype otherwise)."""
    low, high = np.percentile(values, q, method="inverted_cdf")
    return float(low), float(high)


def linear_unit(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, scaled to [0, 1]."""
    low = center - 0.5 - (width - 1) / 2
    return np.clip((x - low) / (width - 1), 0.0, 1.0)


def pydicom_unit(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's own windowing of an unsigned, unrescaled array, scaled to [0, 1]."""
    return apply_windowing(arr, ds) / ((1 << ds.BitsStored) - 1)


# --- photometric, rescale, bit depth -----------------------------------------------------


def test_monochrome2_window_matches_formula_and_metadata(tmp_path: Path) -> None:
    raw = ramp(12)
    path = save(make_ds(raw, bits_stored=12, WindowCenter=2000, WindowWidth=1001), tmp_path / "a")
    image = read_dicom(path)
    assert image.pixels.dtype == np.float32
    assert image.pixels.shape == raw.shape
    np.testing.assert_allclose(image.pixels, linear_unit(raw, 2000, 1001), atol=1e-6)
    meta = image.meta
    assert meta["windowing"] == "window"
    assert meta["window"] == pytest.approx((1499.5, 2499.5))
    assert (meta["format"], meta["height"], meta["width"]) == ("dicom", 32, 64)
    assert (meta["bits_stored"], meta["photometric"], meta["inverted"]) == (
        12,
        "MONOCHROME2",
        False,
    )
    assert (meta["modality"], meta["view"], meta["sex"], meta["age"]) == ("CR", "PA", "F", 62.0)
    assert meta["transfer_syntax"] == ExplicitVRLittleEndian
    json.dumps(meta)  # small and serialisable


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path: Path) -> None:
    raw = ramp(12)
    window = {"WindowCenter": 1800, "WindowWidth": 2400}
    mono2 = read_dicom(save(make_ds(raw, "MONOCHROME2", 12, **window), tmp_path / "m2.dcm"))
    mono1 = read_dicom(save(make_ds(raw, "MONOCHROME1", 12, **window), tmp_path / "m1.dcm"))
    np.testing.assert_allclose(mono1.pixels, 1.0 - mono2.pixels, atol=1e-6)
    assert mono1.meta["inverted"] is True
    # MONOCHROME1 stores low attenuation as high values: the brightest stored value is air.
    assert mono1.pixels[raw == raw.max()].max() == 0.0
    assert mono1.pixels[raw == 0].min() == 1.0


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("windowing", ["percentile", "full"])
def test_inversion_also_applies_to_data_windows(
    tmp_path: Path, photometric: str, windowing: str
) -> None:
    raw = ramp(10)
    image = read_dicom(
        save(make_ds(raw, photometric, 10), tmp_path / "x.dcm"), DicomOptions(windowing=windowing)
    )
    brightest_stored = image.pixels.ravel()[raw.argmax()]
    assert brightest_stored == (0.0 if photometric == "MONOCHROME1" else 1.0)


def test_rescale_slope_intercept_is_applied_before_the_window(tmp_path: Path) -> None:
    raw = ramp(12)
    slope, intercept, center, width = 2.0, -1024.0, 1000.0, 3001.0
    ds = make_ds(
        raw,
        bits_stored=12,
        RescaleSlope=slope,
        RescaleIntercept=intercept,
        WindowCenter=center,
        WindowWidth=width,
    )
    image = read_dicom(save(ds, tmp_path / "r.dcm"))
    expected = linear_unit(raw * slope + intercept, center, width)
    np.testing.assert_allclose(image.pixels, expected, atol=1e-5)


def test_negative_slope_percentile_window_is_in_modality_units(tmp_path: Path) -> None:
    raw = RNG.integers(0, 4096, (40, 50)).astype(np.uint16)
    ds = make_ds(raw, bits_stored=12, RescaleSlope=-1.0, RescaleIntercept=4095.0)
    image = read_dicom(save(ds, tmp_path / "n.dcm"), DicomOptions(windowing="percentile"))
    modality = 4095.0 - raw
    low, high = exact_percentiles(modality, (0.5, 99.5))
    assert image.meta["window"] == pytest.approx((low, high))
    np.testing.assert_allclose(
        image.pixels, np.clip((modality - low) / (high - low), 0, 1), atol=1e-5
    )


@pytest.mark.parametrize("bits", [8, 10, 12, 14, 16])
def test_bits_stored_full_window_spans_the_range_exactly(tmp_path: Path, bits: int) -> None:
    raw = ramp(bits)
    path = save(make_ds(raw, bits_stored=bits), tmp_path / f"b{bits}.dcm")
    image = read_dicom(path, DicomOptions(windowing="full"))
    assert image.meta["bits_stored"] == bits
    assert image.meta["window"] == (0.0, float((1 << bits) - 1))
    np.testing.assert_allclose(image.pixels, raw / ((1 << bits) - 1), atol=1e-6)


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_signed_pixel_representation(tmp_path: Path, bits: int) -> None:
    raw = ramp(bits, signed=True)
    ds = make_ds(raw, bits_stored=bits)
    assert ds.PixelRepresentation == 1
    image = read_dicom(save(ds, tmp_path / "s.dcm"), DicomOptions(windowing="full"))
    low, high = float(raw.min()), float(raw.max())
    assert image.meta["window"] == (low, high)
    np.testing.assert_allclose(image.pixels, (raw - low) / (high - low), atol=1e-6)


def test_signed_with_rescale_and_window(tmp_path: Path) -> None:
    raw = ramp(12, signed=True)
    ds = make_ds(
        raw, bits_stored=12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-600,
        WindowWidth=1500,
    )  # fmt: skip
    image = read_dicom(save(ds, tmp_path / "s.dcm"))
    np.testing.assert_allclose(image.pixels, linear_unit(raw - 1024.0, -600, 1500), atol=1e-6)


# --- VOI: windows, functions, LUT sequence, percentiles ----------------------------------


@pytest.mark.parametrize("function", ["LINEAR", "LINEAR_EXACT", "SIGMOID"])
def test_voi_lut_functions_match_pydicom(tmp_path: Path, function: str) -> None:
    raw = ramp(12)
    ds = make_ds(raw, bits_stored=12, WindowCenter=2100, WindowWidth=1700, VOILUTFunction=function)
    image = read_dicom(save(ds, tmp_path / "f.dcm"))
    reference = pydicom_unit(raw, pydicom.dcmread(tmp_path / "f.dcm"))
    np.testing.assert_allclose(image.pixels, reference, atol=2e-6)
    assert image.meta["windowing"] == "window"


def test_first_of_several_windows_is_used(tmp_path: Path) -> None:
    raw = ramp(12)
    ds = make_ds(raw, bits_stored=12, WindowCenter=[1000, 3000], WindowWidth=[500, 2000])
    image = read_dicom(save(ds, tmp_path / "w.dcm"))
    np.testing.assert_allclose(image.pixels, linear_unit(raw, 1000, 500), atol=1e-6)


@pytest.mark.parametrize("width", [0, -5])
def test_invalid_window_falls_back_to_percentiles(tmp_path: Path, width: int) -> None:
    raw = ramp(12)
    image = read_dicom(
        save(make_ds(raw, bits_stored=12, WindowCenter=100, WindowWidth=width), tmp_path / "w")
    )
    assert image.meta["windowing"] == "percentile"


def test_degenerate_linear_window_is_a_threshold(tmp_path: Path) -> None:
    raw = ramp(8)
    image = read_dicom(save(make_ds(raw, WindowCenter=100, WindowWidth=1), tmp_path / "t.dcm"))
    # PS3.3 C.11.2.1.2.1 with w = 1: x <= c - 0.5 -> minimum, x > c - 0.5 -> maximum.
    np.testing.assert_array_equal(image.pixels, (raw > 99.5).astype(np.float32))


def voi_lut_item(data: np.ndarray, first: int, bits: int, ow: bool = False) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    if ow:
        item.add_new(0x00283006, "OW", data.astype("<u2").tobytes())
    else:
        item.add_new(0x00283006, "US", [int(v) for v in data])
    return item


@pytest.mark.parametrize(("bits", "ow"), [(16, False), (16, True), (8, False)])
def test_voi_lut_sequence(tmp_path: Path, bits: int, ow: bool) -> None:
    raw = ramp(12)
    first, entries = 100, 4000
    # A gamma-like LUT; bits=8 with 4000 entries is the case pydicom 3.0's apply_voi wraps.
    lut = np.round(((np.arange(entries) / (entries - 1)) ** 0.7) * ((1 << bits) - 1))
    ds = make_ds(raw, bits_stored=12, WindowCenter=50, WindowWidth=10)  # must be ignored
    ds.VOILUTSequence = Sequence([voi_lut_item(lut, first, bits, ow)])
    image = read_dicom(save(ds, tmp_path / "lut.dcm"))
    expected = lut[np.clip(raw.astype(np.int64) - first, 0, entries - 1)] / lut.max()
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert image.meta["windowing"] == "voi_lut"
    assert image.meta["window"] == (100.0, 4099.0)
    # "voi" is the same request; "percentile" ignores the header.
    assert np.array_equal(
        read_dicom(tmp_path / "lut.dcm", DicomOptions("voi")).pixels, image.pixels
    )
    forced = read_dicom(tmp_path / "lut.dcm", DicomOptions("percentile"))
    assert forced.meta["windowing"] == "percentile"


def test_voi_lut_is_scaled_by_its_actual_range(tmp_path: Path) -> None:
    # Declared 16 bits per entry, values only 12-bit (seen in CR exports): still reaches 1.0.
    raw = ramp(12)
    lut = np.arange(4096)
    ds = make_ds(raw, bits_stored=12)
    ds.VOILUTSequence = Sequence([voi_lut_item(lut, 0, 16)])
    image = read_dicom(save(ds, tmp_path / "lut.dcm"))
    np.testing.assert_allclose(image.pixels, raw / 4095.0, atol=1e-6)


def test_monochrome1_voi_lut_is_inverted_after_the_lut(tmp_path: Path) -> None:
    raw = ramp(12)
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 65535)
    ds = make_ds(raw, "MONOCHROME1", 12)
    ds.VOILUTSequence = Sequence([voi_lut_item(lut, 0, 16)])
    image = read_dicom(save(ds, tmp_path / "lut1.dcm"))
    np.testing.assert_allclose(image.pixels, 1.0 - lut[raw] / 65535, atol=1e-6)


def test_percentile_window_matches_numpy(tmp_path: Path) -> None:
    raw = RNG.normal(2000, 400, (60, 70)).clip(0, 4095).astype(np.uint16)
    options = DicomOptions(windowing="percentile", percentiles=(2.0, 97.0))
    ds = make_ds(raw, bits_stored=12, WindowCenter=100, WindowWidth=50)  # ignored
    image = read_dicom(save(ds, tmp_path / "p.dcm"), options)
    low, high = exact_percentiles(raw, (2.0, 97.0))
    assert image.meta["window"] == (low, high)
    np.testing.assert_allclose(image.pixels, np.clip((raw - low) / (high - low), 0, 1), atol=1e-6)


def test_auto_without_header_voi_uses_default_percentiles(tmp_path: Path) -> None:
    raw = RNG.integers(0, 1024, (50, 50)).astype(np.uint16)
    image = read_dicom(save(make_ds(raw, bits_stored=10), tmp_path / "p.dcm"))
    assert image.meta["windowing"] == "percentile"
    assert image.meta["window"] == exact_percentiles(raw, (0.5, 99.5))


def test_large_image_percentiles_use_a_subsample_close_to_exact(tmp_path: Path) -> None:
    raw = RNG.integers(0, 4096, (2100, 2100)).astype(np.uint16)  # > 4 Mpx: every 2nd row/col
    image = read_dicom(save(make_ds(raw, bits_stored=12), tmp_path / "big.dcm"))
    exact = exact_percentiles(raw, (0.5, 99.5))
    np.testing.assert_allclose(image.meta["window"], exact, atol=8)  # 0.2 % of the range


def test_modality_lut_sequence(tmp_path: Path) -> None:
    raw = ramp(8)
    table = (4000 - 15 * np.arange(256)).astype(np.uint16)  # decreasing, 12-bit output
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new(0x00283006, "US", [int(v) for v in table])
    ds = make_ds(raw)
    ds.ModalityLUTSequence = Sequence([item])
    image = read_dicom(save(ds, tmp_path / "mlut.dcm"), DicomOptions(windowing="full"))
    modality = table[raw].astype(float)
    low, high = modality.min(), modality.max()
    assert image.meta["window"] == (low, high)
    np.testing.assert_allclose(image.pixels, (modality - low) / (high - low), atol=1e-6)


# --- pixel padding -----------------------------------------------------------------------


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("windowing", ["percentile", "full"])
def test_padding_range_is_zero_and_excluded_from_the_window(
    tmp_path: Path, photometric: str, windowing: str
) -> None:
    raw = RNG.integers(500, 3000, (64, 64)).astype(np.uint16)
    raw[:, :10] = 4095
    raw[:5, 10:] = 4000
    ds = make_ds(raw, photometric, 12, PixelPaddingValue=4095, PixelPaddingRangeLimit=3990)
    path = save(ds, tmp_path / "pad.dcm")
    image = read_dicom(path, DicomOptions(windowing=windowing, percentiles=(1.0, 99.0)))
    padding = raw >= 3990
    assert np.all(image.pixels[padding] == 0.0)
    body = raw[~padding]
    if windowing == "full":
        expected_window = (float(body.min()), float(body.max()))
    else:
        expected_window = exact_percentiles(body, (1.0, 99.0))
    assert image.meta["window"] == expected_window
    unit = np.clip((body - expected_window[0]) / (expected_window[1] - expected_window[0]), 0, 1)
    expected = 1.0 - unit if photometric == "MONOCHROME1" else unit
    np.testing.assert_allclose(image.pixels[~padding], expected, atol=1e-6)


def test_single_padding_value_signed(tmp_path: Path) -> None:
    raw = ramp(12, signed=True)
    raw[0, :8] = -2000
    ds = make_ds(raw, bits_stored=12, PixelPaddingValue=-2000, WindowCenter=0, WindowWidth=4000)
    image = read_dicom(save(ds, tmp_path / "pad.dcm"))
    padding = raw == -2000
    assert padding.sum() >= 8
    assert np.all(image.pixels[padding] == 0.0)
    np.testing.assert_allclose(
        image.pixels[~padding], linear_unit(raw, 0, 4000)[~padding], atol=1e-6
    )


def test_padding_on_the_lookup_table_path(tmp_path: Path) -> None:
    raw = ramp(12)
    ds = make_ds(
        raw, "MONOCHROME1", 12, PixelPaddingValue=0, PixelPaddingRangeLimit=99,
        WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID",
    )  # fmt: skip
    image = read_dicom(save(ds, tmp_path / "pad.dcm"))
    reference = 1.0 - pydicom_unit(raw, pydicom.dcmread(tmp_path / "pad.dcm"))
    reference[raw <= 99] = 0.0
    np.testing.assert_allclose(image.pixels, reference, atol=2e-6)


def test_only_padding_gives_a_black_image(tmp_path: Path) -> None:
    raw = np.full((8, 8), 7, dtype=np.uint16)
    image = read_dicom(save(make_ds(raw, "MONOCHROME1", 12, PixelPaddingValue=7), tmp_path / "p"))
    assert np.all(image.pixels == 0.0)
    assert image.meta["window"] is None


# --- transfer syntaxes and file layouts --------------------------------------------------


@pytest.mark.parametrize("implicit_vr", [True, False])
def test_file_without_preamble_or_file_meta(tmp_path: Path, implicit_vr: bool) -> None:
    raw = ramp(10)
    reference = read_dicom(save(make_ds(raw, "MONOCHROME1", 10), tmp_path / "ref.dcm"))
    path = save(
        make_ds(raw, "MONOCHROME1", 10), tmp_path / "bare", file_meta=False, implicit_vr=implicit_vr
    )
    head = path.read_bytes()[:132]
    assert head[128:132] != b"DICM" and head[:2] == b"\x08\x00"
    image = read_dicom(path)
    np.testing.assert_array_equal(image.pixels, reference.pixels)
    expected_syntax = ImplicitVRLittleEndian if implicit_vr else ExplicitVRLittleEndian
    assert image.meta["transfer_syntax"] == expected_syntax
    with pytest.raises(NotDicomError, match="DICM"):
        read_dicom(path, DicomOptions(force=False))


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_lossless_compression_reads_identically(
    tmp_path: Path, syntax: str, photometric: str
) -> None:
    raw = RNG.integers(0, 4096, (48, 40)).astype(np.uint16)
    plain = read_dicom(save(make_ds(raw, photometric, 12), tmp_path / "plain.dcm"))
    ds = make_ds(raw, photometric, 12)
    ds.compress(syntax)
    image = read_dicom(save(ds, tmp_path / "compressed.dcm"))
    assert image.meta["transfer_syntax"] == syntax
    np.testing.assert_array_equal(image.pixels, plain.pixels)


def jpeg_bytes(gray: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def test_jpeg_baseline_encapsulated(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:64, 0:96]
    gray = (127 + 100 * np.sin(xx / 9.0) * np.cos(yy / 7.0)).astype(np.uint8)
    encoded = jpeg_bytes(gray)
    ds = make_ds(gray, WindowCenter=128, WindowWidth=256)  # LINEAR: x -> x / 255
    ds.PixelData = encapsulate([encoded])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    image = read_dicom(save(ds, tmp_path / "jpeg.dcm"))
    decoded = np.asarray(Image.open(io.BytesIO(encoded)), dtype=np.float32) / 255
    # Same bitstream, two libjpeg builds (pylibjpeg vs Pillow): at most one level apart.
    np.testing.assert_allclose(image.pixels, decoded, atol=1.01 / 255)
    assert np.corrcoef(image.pixels.ravel(), gray.ravel())[0, 1] > 0.99
    assert image.meta["transfer_syntax"] == JPEGBaseline8Bit


def test_multiframe_reads_the_first_frame(tmp_path: Path) -> None:
    frames = np.stack([ramp(8), 255 - ramp(8), np.zeros((32, 64), np.uint8)])
    image = read_dicom(save(make_ds(frames), tmp_path / "mf.dcm"), DicomOptions(windowing="full"))
    assert image.meta["frames"] == 3
    np.testing.assert_allclose(image.pixels, frames[0] / 255.0, atol=1e-6)


def test_rgb_is_converted_with_bt601_luma(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    image = read_dicom(save(make_ds(rgb, "RGB", 8), tmp_path / "rgb.dcm"))
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / 255
    np.testing.assert_allclose(image.pixels, expected, atol=1e-6)
    assert (image.meta["windowing"], image.meta["inverted"]) == ("dtype", False)


def test_ybr_full_is_converted_to_rgb_then_luma(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (20, 30, 3)).astype(np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    image = read_dicom(save(make_ds(ybr, "YBR_FULL", 8), tmp_path / "ybr.dcm"))
    expected = (rgb @ np.array([0.299, 0.587, 0.114])) / 255
    np.testing.assert_allclose(image.pixels, expected, atol=2.5 / 255)  # two 8-bit roundings


@pytest.mark.parametrize("name", ["rgb_color", "ybr_color", "jpeg2k"])
def test_bundled_colour_examples_become_luma(name: str) -> None:
    """pydicom's own files: RGB; YBR_FULL_422 JPEG baseline, 30 frames; YBR_RCT JPEG 2000."""
    path = examples.get_path(name)
    ds = pydicom.dcmread(path)
    rgb = pixel_array(ds, index=0)  # pydicom converts YBR to RGB
    image = read_dicom(path)
    np.testing.assert_allclose(image.pixels, rgb @ np.array([0.299, 0.587, 0.114]) / 255, atol=1e-5)
    assert image.meta["frames"] == int(ds.get("NumberOfFrames", 1))
    assert image.meta["photometric"] == ds.PhotometricInterpretation


@pytest.mark.parametrize(
    ("name", "reason"),
    [("rt_dose", "Bits Stored 32 is outside"), ("palette_color", "'PALETTE COLOR'")],
)
def test_bundled_unsupported_examples(name: str, reason: str) -> None:
    with pytest.raises(ImageReadError, match=reason):
        read_dicom(examples.get_path(name))


# --- errors ------------------------------------------------------------------------------


def assert_names_file(err: pytest.ExceptionInfo[ImageReadError], path: Path) -> None:
    assert err.value.path == path
    assert str(err.value) == f"{path}: {err.value.reason}"


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("patient list, not an image\n")
    with pytest.raises(NotDicomError, match="not a DICOM file") as err:
        read_dicom(path)
    assert_names_file(err, path)


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty file") as err:
        read_dicom(path)
    assert_names_file(err, path)


def test_truncated_pixel_data(tmp_path: Path) -> None:
    path = save(make_ds(ramp(12, (64, 64)), bits_stored=12), tmp_path / "cut.dcm")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 3000])
    with pytest.raises(ImageReadError, match="cannot decode the pixel data") as err:
        read_dicom(path)
    assert_names_file(err, path)


def test_truncated_header(tmp_path: Path) -> None:
    path = save(make_ds(ramp(12), bits_stored=12), tmp_path / "cut.dcm")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ImageReadError) as err:
        read_dicom(path)
    assert_names_file(err, path)


def test_corrupt_jpeg_stream(tmp_path: Path) -> None:
    encoded = jpeg_bytes(ramp(8))
    ds = make_ds(ramp(8))
    ds.PixelData = encapsulate([encoded[:20] + bytes(200)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    path = save(ds, tmp_path / "bad.dcm")
    with pytest.raises(ImageReadError, match="JPEG Baseline") as err:
        read_dicom(path)
    assert_names_file(err, path)


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = make_ds(ramp(8))
    del ds.PixelData
    ds.Modality = "SR"
    path = save(ds, tmp_path / "report.dcm")
    with pytest.raises(ImageReadError, match=r"no Pixel Data \(7FE0,0010\) \(Modality SR\)"):
        read_dicom(path)


@pytest.mark.parametrize(("allocated", "stored"), [(16, 0), (16, 17), (32, 32)])
def test_bits_stored_outside_range(tmp_path: Path, allocated: int, stored: int) -> None:
    ds = make_ds(ramp(12), bits_stored=12)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = allocated, stored, max(stored - 1, 0)
    if allocated == 32:
        ds.PixelData = ramp(12).astype(np.uint32).tobytes()
    path = save(ds, tmp_path / "bits.dcm")
    with pytest.raises(ImageReadError, match=f"Bits Stored {stored} is outside"):
        read_dicom(path)


def test_palette_color_is_refused(tmp_path: Path) -> None:
    ds = make_ds(ramp(8), "PALETTE COLOR")
    path = save(ds, tmp_path / "palette.dcm")
    with pytest.raises(
        ImageReadError, match="unsupported Photometric Interpretation 'PALETTE COLOR'"
    ):
        read_dicom(path)


def test_compressed_data_without_transfer_syntax(tmp_path: Path) -> None:
    ds = make_ds(ramp(8))
    ds.compress(RLELossless)
    path = save(ds, tmp_path / "bare_rle", file_meta=False)
    with pytest.raises(ImageReadError, match="no Transfer Syntax UID"):
        read_dicom(path)


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="windowing"):
        DicomOptions(windowing="minmax")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="percentiles"):
        DicomOptions(percentiles=(99.0, 1.0))


# --- metadata ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "years"),
    [("062Y", 62.0), ("006M", 0.5), ("002W", 14 / 365.25), ("010D", 10 / 365.25), ("62", 62.0),
     (" 081Y ", 81.0), ("", None), (None, None), ("abc", None), ("12X", None)],
)  # fmt: skip
def test_parse_age(text: str | None, years: float | None) -> None:
    assert parse_age(text) == (pytest.approx(years) if years is not None else None)


def test_metadata_fields_and_unknowns(tmp_path: Path) -> None:
    ds = make_ds(ramp(8), PatientSex="O", ImagerPixelSpacing=[0.139, 0.143])
    del ds.PatientAge, ds.ViewPosition
    meta = read_dicom(save(ds, tmp_path / "m.dcm")).meta
    assert meta["sex"] is None and meta["age"] is None and meta["view"] is None
    assert meta["pixel_spacing"] == (0.139, 0.143)
    assert (meta["patient_id"], meta["body_part"], meta["manufacturer"]) == (
        "P001",
        "CHEST",
        "ACME",
    )
    assert meta["sop_uid"] == ds.SOPInstanceUID and meta["study_uid"] == ds.StudyInstanceUID
    ds = make_ds(ramp(8), PixelSpacing=[0, 0])
    assert read_dicom(save(ds, tmp_path / "z.dcm")).meta["pixel_spacing"] is None
