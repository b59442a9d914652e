"""Image readers: DICOM, PNG, JPEG and TIFF to float32 ``[H, W]`` in ``[0, 1]`` (bones bright)."""

from spcxr.io.dicom import DicomOptions, NotDicomError, parse_age, read_dicom
from spcxr.io.image import read_image
from spcxr.io.raster import read_mask, read_raster, significant_bits
from spcxr.io.types import (
    DEFAULT_MAX_PIXELS,
    META_KEYS,
    ImageReadError,
    ImageTooLargeError,
    LoadedImage,
    sniff_format,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "META_KEYS",
    "DicomOptions",
    "ImageReadError",
    "ImageTooLargeError",
    "LoadedImage",
    "NotDicomError",
    "parse_age",
    "read_dicom",
    "read_image",
    "read_mask",
    "read_raster",
    "significant_bits",
    "sniff_format",
]
