"""Common types of the image readers (no reader is imported here, so every reader can import it).

Every reader returns a :class:`LoadedImage`: a float32 ``[H, W]`` array in ``[0, 1]`` at native
resolution where *higher means more attenuation* (bones bright, lungs dark), plus a small,
JSON-serialisable metadata dict with the keys in :data:`META_KEYS` (``None`` when unknown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Keys present in every LoadedImage.meta, whatever the format (None when unknown / not DICOM).
IMAGE_KEYS: tuple[str, ...] = (
    "format",  # "dicom" | "png" | "jpeg" | "tiff"
    "height",  # native rows
    "width",  # native columns
    "frames",  # frames/pages in the file; the readers return the first one
    "bits_stored",  # significant bits of the stored integers (None for float data)
    "photometric",  # DICOM Photometric Interpretation, or the Pillow mode for raster files
    "inverted",  # whether values were flipped (MONOCHROME1)
    "windowing",  # "voi_lut" | "window" | "percentile" | "full" | "dtype"
    "window",  # (low, high) in modality units (DICOM) or stored units (raster), or None
)
DICOM_KEYS: tuple[str, ...] = (
    "modality",
    "view",
    "sex",
    "age",
    "patient_id",
    "study_uid",
    "series_uid",
    "sop_uid",
    "transfer_syntax",
    "manufacturer",
    "pixel_spacing",
    "body_part",
)
META_KEYS: tuple[str, ...] = IMAGE_KEYS + DICOM_KEYS

#: File name suffixes that folder listings (prepare, predict) pick up; DICOM files without a
#: suffix are found by their content. BMP is listed though no reader takes it, so that a BMP
#: export gets an error row ("unsupported image format") instead of silently nothing.
IMAGE_SUFFIXES: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".tif", ".tiff", ".bmp",
)  # fmt: skip

# File signatures (magic bytes) of the supported raster formats.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF
_HEAD_BYTES = 132  # 128-byte DICOM preamble + "DICM"


class ImageReadError(ValueError):
    """A file could not be read as an image; ``str(e) == f"{path}: {reason}"``.

    Attributes:
        path: The offending file.
        reason: What is wrong with it, in plain words.
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self) -> tuple[type[ImageReadError], tuple[Path, str]]:
        # Keep the two-argument constructor picklable (errors cross process boundaries in
        # multi-worker preparation jobs).
        return (type(self), (self.path, self.reason))


class ImageTooLargeError(ImageReadError):
    """An image whose header declares more pixels than the caller's limit (never decoded)."""


#: Default per-image pixel limit of ``spcxr prepare`` / ``predict`` (``--max-pixels``): a
#: 16-bit 50 MP image costs about 0.1 GB as stored and 0.2 GB as float32; the largest chest
#: radiographs (43 x 43 cm detectors at 0.1 mm) have about 18.5 MP.
DEFAULT_MAX_PIXELS = 50_000_000


def check_pixels(path: str | Path, height: int, width: int, max_pixels: int | None) -> None:
    """Raise :class:`ImageTooLargeError` if ``height * width`` exceeds ``max_pixels``.

    Called with the size read from the file's header, before any pixel is decoded, so that
    one huge image cannot take a worker's memory (a 13,000 x 13,000 16-bit PNG is a 1.3 MB
    file but several GB once decoded).
    """
    if max_pixels is not None and max_pixels > 0 and height * width > max_pixels:
        raise ImageTooLargeError(
            path,
            f"image of {height}x{width} (HxW) = {height * width / 1e6:.3g} MP exceeds the "
            f"pixel limit of {max_pixels / 1e6:g} MP (--max-pixels); not decoded",
        )


@dataclass
class LoadedImage:
    """An image read from disk.

    Attributes:
        pixels: float32 ``[H, W]`` in ``[0, 1]``, higher = more attenuation, native resolution.
        meta: Metadata with the keys of :data:`META_KEYS` (``None`` when unknown).
    """

    pixels: np.ndarray
    meta: dict[str, Any]


def new_meta(**values: Any) -> dict[str, Any]:
    """Return a metadata dict with every key of :data:`META_KEYS`, filled from ``values``.

    Raises:
        KeyError: If a key is not one of :data:`META_KEYS` (catches typos in the readers).
    """
    unknown = set(values) - set(META_KEYS)
    if unknown:
        raise KeyError(f"unknown metadata keys: {sorted(unknown)}")
    meta: dict[str, Any] = dict.fromkeys(META_KEYS)
    meta.update(values)
    return meta


def read_head(path: Path, size: int = _HEAD_BYTES) -> bytes:
    """Return the first ``size`` bytes of ``path``.

    Raises:
        ImageReadError: If the file is missing, a directory, unreadable or empty.
    """
    try:
        with path.open("rb") as handle:
            head = handle.read(size)
    except FileNotFoundError as err:
        raise ImageReadError(path, "file not found") from err
    except IsADirectoryError as err:
        raise ImageReadError(path, "is a directory, not a file") from err
    except OSError as err:
        raise ImageReadError(path, f"cannot read file: {err.strerror or err}") from err
    if not head:
        raise ImageReadError(path, "empty file (0 bytes)")
    return head


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` carries the DICOM preamble marker ("DICM" at byte 128)."""
    try:
        return sniff_format(read_head(path)) == "dicom"
    except ImageReadError:
        return False


def sniff_format(head: bytes) -> str | None:
    """Name the format from a file's first bytes: "dicom", "png", "jpeg", "tiff" or None.

    ``None`` means no known signature; the file may still be a DICOM data set written without
    the 128-byte preamble and "DICM" marker, which only a parse attempt can tell.
    """
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head[:4] in _TIFF_MAGICS:
        return "tiff"
    return None
