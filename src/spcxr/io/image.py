"""Common types of the image readers and the content-dispatching entry point ``read_image``.

Every reader returns a :class:`LoadedImage`: a float32 ``[H, W]`` array in ``[0, 1]`` at native
resolution where *higher means more attenuation* (bones bright, lungs dark), plus a small,
JSON-serialisable metadata dict with the keys in :data:`META_KEYS` (``None`` when unknown).

Files are dispatched on their content, not their extension: hospital exports often have no
extension, or a misleading one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from spcxr.io.dicom import DicomOptions

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


def read_image(path: str | Path, *, dicom: DicomOptions | None = None) -> LoadedImage:
    """Read a DICOM, PNG, JPEG or TIFF file, choosing the reader from the file's content.

    A file with no known signature is tried as a DICOM data set without preamble (old exports
    and some PACS dumps), unless ``dicom.force`` is False.

    Args:
        path: The file; its extension is ignored.
        dicom: Options for DICOM files (defaults to :class:`~spcxr.io.dicom.DicomOptions()`).

    Returns:
        The image as float32 ``[H, W]`` in ``[0, 1]`` (higher = more attenuation) with metadata.

    Raises:
        ImageReadError: If the file is not a readable image of a supported kind.
    """
    # Imported here because the readers import this module's types.
    from spcxr.io.dicom import NotDicomError, read_dicom
    from spcxr.io.raster import _read_raster  # read_raster without sniffing the file again

    path = Path(path)
    kind = sniff_format(read_head(path))
    if kind == "dicom":
        return read_dicom(path, dicom)
    if kind is not None:
        return _read_raster(path, kind)
    try:
        return read_dicom(path, dicom)
    except NotDicomError as err:
        start = read_head(path, 8)
        raise ImageReadError(
            path, f"not a DICOM, PNG, JPEG or TIFF file (starts with {start!r})"
        ) from err
