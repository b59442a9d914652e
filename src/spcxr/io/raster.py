"""PNG / JPEG / TIFF reader (Pillow, tifffile as the TIFF fallback) and the lung-mask reader.

Raster files are assumed to be stored "bones bright" already (as public PNG/JPEG chest X-ray
sets are: they were rendered from DICOM for display), so nothing is inverted.

Gray levels are mapped by their container, never by the image's own min..max, so a dark image
stays dark:

* 8-bit: ``v / 255``.
* 16-bit (and integer TIFF): many exports store 10-, 12- or 14-bit detector data in 16-bit
  containers. The significant depth is taken as the smallest of 8, 10, 12, 14, 16 bits that holds
  the brightest pixel, and values are divided by ``2**bits - 1`` (``meta["bits_stored"]``); so
  12-bit data fills [0, 1] instead of its bottom 1/16. A 16-bit file whose brightest pixel is
  below 4096 is therefore read as 12-bit data.
* float TIFF: used as is when already within [0, 1], else scaled by its min..max
  (``meta["windowing"] == "full"``).
* Colour (RGB, RGBA, palette): ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` rounded to
  8 bits by Pillow (``convert("L")``); RGB JPEGs are decoded straight to their Y (luma) channel,
  which is the same formula and skips the colour conversion. Alpha is dropped. 16-bit colour
  TIFFs are read with tifffile (luma rounded to 16 bits, then the 16-bit rule); 16-bit colour
  PNGs are refused, because Pillow would silently keep only their high byte.
* 1-, 2- and 4-bit grayscale and other modes (CMYK, LAB, ...) are refused with the mode named:
  a radiograph stored that way is a broken export.

``meta["photometric"]`` holds the Pillow mode as stored (before any conversion), or tifffile's
photometric name for TIFFs read with tifffile.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from spcxr.io.types import (
    ImageReadError,
    ImageTooLargeError,
    LoadedImage,
    check_pixels,
    new_meta,
    read_head,
    sniff_format,
)

_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "TIFF": "tiff"}
_SIGNIFICANT_BITS = (8, 10, 12, 14, 16)
_RAW_DEPTH = re.compile(r";(\d+)")  # "L;4" -> 4, "RGB;16B" -> 16
_LUMA = np.asarray((0.299, 0.587, 0.114), dtype=np.float32)  # ITU-R BT.601
_GRAY_MODES = frozenset({"L", "I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F"})
_COLOR_MODES = frozenset({"LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr"})
# Below this maximum an integer mask is a label map (0/1, 0/1/2, ...), not an 8-bit rendering.
_LABEL_MAX = 16


def read_raster(path: str | Path, max_pixels: int | None = None) -> LoadedImage:
    """Read a PNG, JPEG or TIFF image as float32 ``[H, W]`` in ``[0, 1]``.

    Args:
        path: The image file (its extension is ignored; the content decides).
        max_pixels: refuse an image with more pixels (from its header, before decoding).

    Returns:
        The first frame/page, mapped as described in the module docstring, with metadata.

    Raises:
        ImageReadError: For a missing, empty, truncated, corrupt or non-image file, another
            format, or an unsupported mode / bit depth (the message names the mode).
    """
    path = Path(path)
    return _read_raster(path, sniff_format(read_head(path)), max_pixels)


def _read_raster(path: Path, kind: str | None, max_pixels: int | None = None) -> LoadedImage:
    """:func:`read_raster` for a file whose signature was already sniffed (by read_image)."""
    try:
        gray, fmt, photometric, frames = _read_pillow(path, kind, max_pixels)
    except ImageReadError as err:
        if kind != "tiff" or isinstance(err, ImageTooLargeError):
            raise
        gray, photometric, frames = _read_tifffile(path, err, max_pixels)
        fmt = "tiff"
    pixels, bits, windowing, window = _gray_to_unit(gray, path)
    meta = new_meta(
        format=fmt,
        height=int(pixels.shape[0]),
        width=int(pixels.shape[1]),
        frames=frames,
        bits_stored=bits,
        photometric=photometric,
        inverted=False,
        windowing=windowing,
        window=window,
    )
    return LoadedImage(pixels=pixels, meta=meta)


def read_mask(
    path: str | Path, shape: tuple[int, int] | None = None, max_pixels: int | None = None
) -> np.ndarray:
    """Read a binary mask as bool ``[H, W]``.

    Foreground: any nonzero value for 1-bit, palette (index) and small label maps (integer
    maximum below 16, e.g. 0/1 or 0/1/2); above half the image's maximum for 8/16-bit gray
    renderings (0/255 masks, also after lossy compression); the same per channel for RGB (any
    channel counts). Alpha is dropped.

    Args:
        path: PNG / TIFF / JPEG mask file.
        shape: The image's ``(H, W)``; when given, a mask of another size is an error.
        max_pixels: refuse a mask with more pixels (from its header, before decoding).

    Raises:
        ImageReadError: For unreadable files, unsupported modes or a size mismatch (the message
            names the file and both sizes).
    """
    path = Path(path)
    image, mode, _ = _open(
        path, sniff_format(read_head(path)), gray_draft=False, max_pixels=max_pixels
    )
    with image:
        if mode == "1":
            values = np.asarray(image, dtype=bool)
        elif mode in ("P", "PA"):
            indices = np.asarray(image)  # [H, W] or [H, W, 2] with alpha
            values = (indices[..., 0] if indices.ndim == 3 else indices) != 0  # 0 = background
        elif mode in _GRAY_MODES or mode in _COLOR_MODES:
            values = _foreground(np.asarray(image))
        else:
            raise ImageReadError(path, f"unsupported mask mode {mode!r}")
    if shape is not None and tuple(values.shape) != tuple(shape):
        height, width = values.shape
        raise ImageReadError(
            path,
            f"mask size {height}x{width} (HxW) does not match the image size {shape[0]}x{shape[1]}",
        )
    return values


def significant_bits(max_value: int) -> int:
    """Smallest of 8, 10, 12, 14, 16 bits holding ``max_value`` (the 16-bit container rule)."""
    for bits in _SIGNIFICANT_BITS:
        if max_value < (1 << bits):
            return bits
    raise ValueError(f"{max_value} does not fit in 16 bits")


def _open(
    path: Path, kind: str | None, *, gray_draft: bool, max_pixels: int | None = None
) -> tuple[Image.Image, str, str]:
    """Open and decode with Pillow; every Pillow failure becomes an ImageReadError.

    ``kind`` is the format named by the file's signature (:func:`sniff_format`), which tells
    a corrupt PNG apart from a file that is no image at all.

    Returns:
        The loaded image, its mode as stored (before a JPEG draft to gray) and the decoder's
        raw mode, which tells the stored bit depth ("L;4", "RGB;16B", ...).
    """
    try:
        image = Image.open(path)  # reads the header only
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(path, f"image too large to decode: {err}") from err
    except UnidentifiedImageError as err:
        if kind in ("png", "jpeg", "tiff"):
            reason = f"corrupt {kind.upper()} file (its signature is right, its header is not)"
        else:
            reason = "not a PNG, JPEG or TIFF image"
        raise ImageReadError(path, reason) from err
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ImageReadError(path, f"corrupt image header: {err}") from err
    mode = image.mode
    rawmode = _rawmode(image)
    try:
        width, height = image.size
        check_pixels(path, height, width, max_pixels)  # before decoding a single pixel
        if image.format not in _FORMATS:
            raise ImageReadError(path, f"unsupported image format {image.format}")
        if gray_draft and image.format in ("JPEG", "MPO") and image.mode == "RGB":
            image.draft("L", image.size)  # libjpeg returns the Y (BT.601 luma) channel
        image.load()
    except ImageReadError:
        image.close()
        raise
    except Exception as err:
        image.close()
        raise ImageReadError(path, f"truncated or corrupt {image.format} data: {err}") from err
    return image, mode, rawmode


def _rawmode(image: Image.Image) -> str:
    """The raw mode of the first decoder tile ("" when unknown)."""
    if not image.tile:
        return ""
    args = image.tile[0].args
    rawmode = args if isinstance(args, str) else (args[0] if args else "")
    return rawmode if isinstance(rawmode, str) else ""


def _read_pillow(
    path: Path, kind: str | None, max_pixels: int | None = None
) -> tuple[np.ndarray, str, str, int]:
    """(2-D array, format, stored mode, frames): gray as stored, colour as 8-bit BT.601 luma."""
    image, mode, rawmode = _open(path, kind, gray_draft=True, max_pixels=max_pixels)
    with image:
        fmt, frames = _FORMATS[image.format or ""], int(getattr(image, "n_frames", 1))
        match = _RAW_DEPTH.search(rawmode)
        depth = int(match.group(1)) if match else None
        if mode == "1" or (mode == "L" and depth is not None and depth < 8):
            raise ImageReadError(
                path,
                f"{1 if mode == '1' else depth}-bit grayscale (mode {mode!r}, raw mode "
                f"{rawmode or mode!r}) is not supported: wrong bit depth for a radiograph "
                "(expected 8 or 16 bits)",
            )
        if mode not in _GRAY_MODES and depth is not None and depth > 8:
            # Pillow silently keeps only the high byte of 16-bit colour: refuse, never squash.
            raise ImageReadError(
                path, f"16-bit colour image (mode {mode!r}, raw mode {rawmode!r}) is not supported"
            )
        if mode in _GRAY_MODES:
            return np.asarray(image), fmt, mode, frames
        if mode in ("LA", "La"):
            return np.asarray(image.getchannel("L")), fmt, mode, frames
        if mode in ("P", "PA"):  # palette colours -> luma
            return np.asarray(image.convert("RGBA").convert("L")), fmt, mode, frames
        if mode in _COLOR_MODES:  # BT.601 luma, alpha ignored (JPEG: drafted to "L" already)
            return np.asarray(image.convert("L")), fmt, mode, frames
        raise ImageReadError(path, f"unsupported image mode {mode!r}")


def _read_tifffile(
    path: Path, pillow_error: ImageReadError, max_pixels: int | None = None
) -> tuple[np.ndarray, str, int]:
    """(2-D array, photometric, pages) of a TIFF Pillow cannot read faithfully.

    Covers 16-bit colour and float64 TIFFs; colour becomes BT.601 luma rounded back to the
    stored integer type, so the container rule still applies to it.
    """
    import tifffile  # only needed for the rare TIFFs Pillow refuses

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            check_pixels(path, int(page.imagelength), int(page.imagewidth), max_pixels)
            array = np.asarray(page.asarray())
            photometric, pages = page.photometric.name, len(tif.pages)
    except ImageTooLargeError:
        raise
    except Exception as err:
        raise ImageReadError(path, f"{pillow_error.reason}; tifffile: {err}") from err
    if array.ndim == 3 and array.shape[-1] in (3, 4) and photometric == "RGB":
        luma = array[..., :3].astype(np.float32) @ _LUMA
        array = np.rint(luma).astype(array.dtype) if array.dtype.kind in "iu" else luma
    if array.ndim != 2:
        raise ImageReadError(path, f"unsupported TIFF layout {photometric} {array.shape}")
    return array, photometric, pages


def _integer_scale(values: np.ndarray, path: Path) -> float:
    """``2**bits - 1`` for integer data under the 16-bit container rule."""
    if values.dtype == np.uint8:
        return 255.0
    low, high = int(values.min()), int(values.max())
    if low < 0 or high > 0xFFFF:
        raise ImageReadError(
            path, f"integer values {low}..{high} outside 0..65535: wrong bit depth or signed data"
        )
    return float((1 << significant_bits(high)) - 1)


def _gray_to_unit(
    gray: np.ndarray, path: Path
) -> tuple[np.ndarray, int | None, str, tuple[float, float] | None]:
    """Map a 2-D array to float32 [0, 1]: (pixels, bits_stored, windowing, window)."""
    if gray.dtype.kind in "iu":
        scale = _integer_scale(gray, path)
        bits = int(scale + 1).bit_length() - 1
        return np.divide(gray, np.float32(scale), dtype=np.float32), bits, "dtype", None
    if gray.dtype.kind != "f":
        raise ImageReadError(path, f"unsupported pixel type {gray.dtype}")
    pixels = np.array(gray, dtype=np.float32)  # a writable copy (Pillow's arrays are read-only)
    if not np.isfinite(pixels).all():
        raise ImageReadError(path, "float image contains NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    if low >= 0.0 and high <= 1.0:
        return pixels, None, "dtype", None
    span = high - low if high > low else 1.0
    return (pixels - np.float32(low)) / np.float32(span), None, "full", (low, high)


def _foreground(values: np.ndarray) -> np.ndarray:
    """Mask rule for gray / colour arrays (see :func:`read_mask`)."""
    if values.ndim == 3:
        channels = values.shape[-1]
        values = values[..., : 3 if channels >= 3 else 1].max(axis=-1)  # drop alpha
    high = values.max() if values.size else 0
    if values.dtype.kind in "iub" and high < _LABEL_MAX:
        return values != 0
    return values > high / 2
