"""PNG / JPEG / TIFF reading and mask reading on files written by the tests."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from spcxr.io import ImageReadError, read_mask, read_raster, significant_bits

RNG = np.random.default_rng(11)
BT601 = np.array([0.299, 0.587, 0.114])


def save(path: Path, array: np.ndarray, **params: object) -> Path:
    Image.fromarray(array).save(path, **params)
    return path


def raw_png(path: Path, array: np.ndarray, color_type: int, bit_depth: int) -> Path:
    """A PNG written byte by byte, for layouts Pillow cannot write (16-bit RGB, 2/4-bit gray).

    For bit depths below 8 ``array`` holds the already packed row bytes.
    """
    height = array.shape[0]
    width = array.shape[1] * 8 // bit_depth if bit_depth < 8 else array.shape[1]
    stored = array.astype(">u2") if bit_depth == 16 else array.astype(np.uint8)
    data = b"".join(b"\x00" + stored[row].tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(data))
        + chunk(b"IEND", b"")
    )
    return path


# --- gray levels -------------------------------------------------------------------------


def test_png_8bit_is_divided_by_255(tmp_path: Path) -> None:
    gray = RNG.integers(0, 256, (30, 40)).astype(np.uint8)
    image = read_raster(save(tmp_path / "g.png", gray))
    assert image.pixels.dtype == np.float32 and image.pixels.flags.writeable
    np.testing.assert_allclose(image.pixels, gray / 255.0, atol=1e-7)
    meta = image.meta
    assert (meta["format"], meta["height"], meta["width"], meta["frames"]) == ("png", 30, 40, 1)
    assert (meta["bits_stored"], meta["photometric"], meta["windowing"]) == (8, "L", "dtype")
    assert meta["inverted"] is False and meta["window"] is None and meta["view"] is None


@pytest.mark.parametrize(
    ("max_value", "bits"),
    [
        (65535, 16),
        (40000, 16),
        (16383, 14),
        (5000, 14),
        (4095, 12),
        (3000, 12),
        (1023, 10),
        (255, 8),
    ],
)
def test_png_16bit_container_rule(tmp_path: Path, max_value: int, bits: int) -> None:
    gray = np.linspace(0, max_value, 48 * 32).round().astype(np.uint16).reshape(48, 32)
    image = read_raster(save(tmp_path / "g16.png", gray))
    assert image.meta["bits_stored"] == bits
    np.testing.assert_allclose(image.pixels, gray / ((1 << bits) - 1), atol=1e-7)


def test_12bit_data_in_16bit_png_is_not_squashed(tmp_path: Path) -> None:
    gray = RNG.integers(0, 4096, (64, 64)).astype(np.uint16)
    gray[0, 0] = 4095
    image = read_raster(save(tmp_path / "g12.png", gray))
    assert image.meta["bits_stored"] == 12
    assert image.pixels.max() == 1.0
    assert image.pixels.mean() == pytest.approx(gray.mean() / 4095, rel=1e-5)


def test_significant_bits_boundaries() -> None:
    cases = {0: 8, 255: 8, 256: 10, 1023: 10, 1024: 12, 4095: 12, 4096: 14, 16384: 16, 65535: 16}
    assert {value: significant_bits(value) for value in cases} == cases
    with pytest.raises(ValueError, match="16 bits"):
        significant_bits(65536)


def test_gray_jpeg_equals_the_decoded_bytes(tmp_path: Path) -> None:
    gray = (RNG.normal(120, 40, (48, 64)).clip(0, 255)).astype(np.uint8)
    path = save(tmp_path / "g.jpg", gray, quality=85)
    image = read_raster(path)
    with Image.open(path) as decoded:
        np.testing.assert_allclose(image.pixels, np.asarray(decoded) / 255.0, atol=1e-7)
    assert (image.meta["format"], image.meta["photometric"]) == ("jpeg", "L")


def test_rgb_jpeg_is_bt601_luma(tmp_path: Path) -> None:
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (90, 90, 90)]
    rgb = np.concatenate([np.full((32, 32, 3), c, np.uint8) for c in colours], axis=1)
    path = save(tmp_path / "c.jpg", rgb, quality=100, subsampling=0)
    image = read_raster(path)
    assert image.meta["photometric"] == "RGB"  # the stored mode, not the decoded one
    centres = image.pixels[16, 16::32]
    np.testing.assert_allclose(centres, [0.299, 0.587, 0.114, 1.0, 90 / 255], atol=0.01)
    with Image.open(path) as decoded:
        via_rgb = np.asarray(decoded.convert("L")) / 255.0
    np.testing.assert_allclose(image.pixels, via_rgb, atol=2.01 / 255)


def test_rgb_png_is_bt601_luma(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (20, 24, 3)).astype(np.uint8)
    image = read_raster(save(tmp_path / "c.png", rgb))
    np.testing.assert_allclose(image.pixels, (rgb @ BT601) / 255, atol=0.51 / 255)


def test_alpha_is_dropped(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (20, 24, 3)).astype(np.uint8)
    alpha = RNG.integers(0, 256, (20, 24, 1)).astype(np.uint8)
    plain = read_raster(save(tmp_path / "rgb.png", rgb)).pixels
    rgba = read_raster(save(tmp_path / "rgba.png", np.concatenate([rgb, alpha], axis=2)))
    np.testing.assert_array_equal(rgba.pixels, plain)
    assert rgba.meta["photometric"] == "RGBA"
    gray = rgb[..., 0]
    la = read_raster(save(tmp_path / "la.png", np.stack([gray, alpha[..., 0]], axis=2)))
    np.testing.assert_allclose(la.pixels, gray / 255.0, atol=1e-7)


def test_palette_image_becomes_luma_of_its_colours(tmp_path: Path) -> None:
    indices = RNG.integers(0, 4, (16, 16)).astype(np.uint8)
    palette = [(0, 0, 0), (255, 0, 0), (0, 0, 255), (200, 200, 200)]
    image = Image.fromarray(indices, mode="P")
    image.putpalette([v for colour in palette for v in colour])
    image.save(tmp_path / "p.png")
    loaded = read_raster(tmp_path / "p.png")
    expected = (np.array(palette) @ BT601 / 255)[indices]
    np.testing.assert_allclose(loaded.pixels, expected, atol=0.51 / 255)
    assert loaded.meta["photometric"] == "P"


def test_tiff_8_and_16_bit(tmp_path: Path) -> None:
    gray8 = RNG.integers(0, 256, (10, 12)).astype(np.uint8)
    image = read_raster(save(tmp_path / "g8.tif", gray8))
    np.testing.assert_allclose(image.pixels, gray8 / 255.0, atol=1e-7)
    assert image.meta["format"] == "tiff"
    gray12 = RNG.integers(0, 4096, (10, 12)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "g12.tif", gray12)
    image = read_raster(tmp_path / "g12.tif")
    assert image.meta["bits_stored"] == 12
    np.testing.assert_allclose(image.pixels, gray12 / 4095.0, atol=1e-7)


def test_float_tiff_in_unit_range_is_used_as_is(tmp_path: Path) -> None:
    values = RNG.random((10, 12)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", values)
    image = read_raster(tmp_path / "f.tif")
    np.testing.assert_array_equal(image.pixels, values)
    assert (image.meta["windowing"], image.meta["bits_stored"]) == ("dtype", None)


def test_float_tiff_outside_unit_range_uses_min_max(tmp_path: Path) -> None:
    values = RNG.normal(100, 300, (10, 12)).astype(np.float32)
    tifffile.imwrite(tmp_path / "f.tif", values)
    image = read_raster(tmp_path / "f.tif")
    low, high = float(values.min()), float(values.max())
    assert (image.meta["windowing"], image.meta["window"]) == ("full", (low, high))
    np.testing.assert_allclose(image.pixels, (values - low) / (high - low), atol=1e-6)


def test_float64_tiff_falls_back_to_tifffile(tmp_path: Path) -> None:
    values = RNG.random((10, 12))
    tifffile.imwrite(tmp_path / "f64.tif", values)
    with pytest.raises(Exception, match="cannot identify"):
        Image.open(tmp_path / "f64.tif")  # the case this fallback exists for
    image = read_raster(tmp_path / "f64.tif")
    np.testing.assert_allclose(image.pixels, values, atol=1e-7)


def test_16bit_rgb_tiff_keeps_its_depth(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 4096, (10, 12, 3)).astype(np.uint16)
    rgb[0, 0] = 4095
    tifffile.imwrite(tmp_path / "rgb16.tif", rgb, photometric="rgb")
    image = read_raster(tmp_path / "rgb16.tif")
    assert (image.meta["bits_stored"], image.meta["photometric"]) == (12, "RGB")
    np.testing.assert_allclose(image.pixels, (rgb @ BT601) / 4095, atol=0.51 / 4095)


def test_multipage_tiff_reads_the_first_page(tmp_path: Path) -> None:
    pages = RNG.integers(0, 256, (2, 10, 12)).astype(np.uint8)
    tifffile.imwrite(tmp_path / "pages.tif", pages)
    image = read_raster(tmp_path / "pages.tif")
    assert image.meta["frames"] == 2
    np.testing.assert_allclose(image.pixels, pages[0] / 255.0, atol=1e-7)


def test_kermany_sized_rgb_jpeg_reads_as_one_gray_channel(tmp_path: Path) -> None:
    # Speed is measured in bench/prepare_throughput.py, not here (timed tests flake on busy CPUs).
    yy, xx = np.mgrid[0:224, 0:224]
    gray = (128 + 60 * np.sin(xx / 13) + 40 * np.cos(yy / 17)).astype(np.uint8)
    path = save(tmp_path / "k.jpeg", np.repeat(gray[..., None], 3, axis=2), quality=90)
    image = read_raster(path)
    assert image.pixels.shape == (224, 224) and image.pixels.dtype == np.float32
    # JPEG at quality 90 keeps a smooth image within a few grey levels
    assert np.abs(image.pixels * 255 - gray).mean() < 2.0


# --- errors ------------------------------------------------------------------------------


def one_bit_png(path: Path) -> Path:
    return save(path, RNG.random((8, 8)) > 0.5, format="PNG")


def two_bit_png(path: Path) -> Path:
    return raw_png(path, np.full((4, 2), 0b00011011, np.uint8), color_type=0, bit_depth=2)


def rgb16_png(path: Path) -> Path:
    return raw_png(path, RNG.integers(0, 4096, (4, 5, 3)), color_type=2, bit_depth=16)


def cmyk_jpeg(path: Path) -> Path:
    Image.new("CMYK", (8, 8), (10, 20, 30, 40)).save(path, format="JPEG")
    return path


def bmp(path: Path) -> Path:
    return save(path, np.zeros((8, 8), np.uint8), format="BMP")


def text(path: Path) -> Path:
    path.write_text("not an image")
    return path


def empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def truncated(fmt: str):
    def write(path: Path) -> Path:
        gray = RNG.integers(0, 256, (64, 64)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format=fmt)
        data = buffer.getvalue()
        path.write_bytes(data[: len(data) // 2])
        return path

    return write


def png_signature_then_garbage(path: Path) -> Path:
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return path


def nan_tiff(path: Path) -> Path:
    tifffile.imwrite(path, np.array([[0.5, np.nan]], dtype=np.float32))
    return path


def int32_tiff(path: Path) -> Path:
    tifffile.imwrite(path, np.array([[0, 100000]], dtype=np.int32))
    return path


@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (one_bit_png, r"1-bit grayscale \(mode '1'"),
        (two_bit_png, r"2-bit grayscale \(mode 'L', raw mode 'L;2'\).*wrong bit depth"),
        (rgb16_png, r"16-bit colour image \(mode 'RGB', raw mode 'RGB;16B'\)"),
        (cmyk_jpeg, "unsupported image mode 'CMYK'"),
        (bmp, "unsupported image format BMP"),
        (text, "not a PNG, JPEG or TIFF image"),
        (empty, r"empty file \(0 bytes\)"),
        (truncated("PNG"), "truncated or corrupt PNG data"),
        (truncated("JPEG"), "truncated or corrupt JPEG data"),
        (png_signature_then_garbage, r"corrupt PNG file \(its signature is right"),
        (nan_tiff, "NaN"),
        (int32_tiff, r"0\.\.100000 outside 0\.\.65535"),
    ],
)
def test_errors_name_the_file_and_reason(tmp_path: Path, writer, reason: str) -> None:
    path = writer(tmp_path / "bad")
    with pytest.raises(ImageReadError, match=reason) as err:
        read_raster(path)
    assert err.value.path == path
    assert str(err.value).startswith(f"{path}: ")


# --- masks -------------------------------------------------------------------------------


def blob(shape: tuple[int, int] = (40, 50)) -> np.ndarray:
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - 20) ** 2 + (xx - 22) ** 2 < 150


@pytest.mark.parametrize("on_value", [255, 1])
def test_binary_gray_masks(tmp_path: Path, on_value: int) -> None:
    truth = blob()
    mask = read_mask(save(tmp_path / "m.png", (truth * on_value).astype(np.uint8)), truth.shape)
    assert mask.dtype == bool
    np.testing.assert_array_equal(mask, truth)


def test_label_map_any_label_is_foreground(tmp_path: Path) -> None:
    labels = np.zeros((40, 50), np.uint8)
    labels[5:30, 3:20], labels[5:30, 28:45] = 1, 2  # left and right lung
    np.testing.assert_array_equal(read_mask(save(tmp_path / "l.png", labels)), labels > 0)


def test_lossy_mask_is_thresholded_at_half_its_maximum(tmp_path: Path) -> None:
    truth = blob((64, 64))
    mask = read_mask(save(tmp_path / "m.jpg", (truth * 255).astype(np.uint8), quality=50))
    assert (mask == truth).mean() > 0.99
    with Image.open(tmp_path / "m.jpg") as decoded:
        assert len(np.unique(np.asarray(decoded))) > 2  # really lossy: not just 0 and 255


def test_16bit_one_bit_rgb_and_palette_masks(tmp_path: Path) -> None:
    truth = blob()
    np.testing.assert_array_equal(
        read_mask(save(tmp_path / "m16.png", (truth * 65535).astype(np.uint16))), truth
    )
    np.testing.assert_array_equal(read_mask(save(tmp_path / "m1.png", truth)), truth)
    red = np.zeros((*truth.shape, 4), np.uint8)
    red[..., 0], red[..., 3] = truth * 200, 255  # red foreground, opaque alpha everywhere
    np.testing.assert_array_equal(read_mask(save(tmp_path / "rgba.png", red)), truth)
    palette = Image.fromarray(truth.astype(np.uint8) * 3, mode="P")
    palette.putpalette([0, 0, 0] * 3 + [255, 255, 255])
    palette.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), truth)


def test_mask_size_mismatch_names_the_file_and_both_sizes(tmp_path: Path) -> None:
    path = save(tmp_path / "m.png", (blob() * 255).astype(np.uint8))
    with pytest.raises(ImageReadError, match=r"mask size 40x50 \(HxW\) .* image size 50x40") as err:
        read_mask(path, (50, 40))
    assert str(err.value).startswith(f"{path}: ")


def test_mask_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="empty file"):
        read_mask(empty(tmp_path / "e.png"))
    with pytest.raises(ImageReadError, match="not a PNG, JPEG or TIFF image"):
        read_mask(text(tmp_path / "t.png"))
    with pytest.raises(ImageReadError, match="unsupported mask mode 'CMYK'"):
        read_mask(cmyk_jpeg(tmp_path / "c.jpg"))


# --- real files --------------------------------------------------------------------------


@pytest.mark.real_data
def test_real_kermany_jpeg_and_shenzhen_png_with_mask(shared_data: Path) -> None:
    kermany = sorted((shared_data / "kermany_pediatric/train/NORMAL").glob("*.jpeg"))[0]
    image = read_raster(kermany)
    assert image.pixels.shape == (224, 224) and image.meta["photometric"] == "RGB"
    with Image.open(kermany) as decoded:
        via_rgb = np.asarray(decoded.convert("L")) / 255.0
    np.testing.assert_allclose(image.pixels, via_rgb, atol=2.01 / 255)
    masks = sorted((shared_data / "shenzhen/masks").glob("*.png"))[:3]
    for mask_path in masks:
        image = read_raster(shared_data / "shenzhen/images" / mask_path.name)
        assert (image.meta["format"], image.meta["bits_stored"]) == ("png", 8)
        mask = read_mask(mask_path, image.pixels.shape)
        assert 0.1 < mask.mean() < 0.5  # two lungs: a sizeable part of the frame
        # Bones-bright PNG: aerated lung is darker than the mediastinum between the lungs.
        rows = np.flatnonzero(mask.any(axis=1))
        width = mask.shape[1]
        centre = image.pixels[rows[0] : rows[-1], int(0.45 * width) : int(0.55 * width)]
        assert image.pixels[mask].mean() < centre.mean() - 0.05
