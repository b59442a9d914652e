"""``read_image``: one entry point that picks the reader from a file's content.

Files are dispatched on their content, not their extension: hospital exports often have no
extension, or a misleading one.
"""

from __future__ import annotations

from pathlib import Path

from spcxr.io.dicom import DicomOptions, NotDicomError, read_dicom
from spcxr.io.raster import _read_raster  # read_raster without sniffing the file again
from spcxr.io.types import ImageReadError, LoadedImage, read_head, sniff_format


def read_image(
    path: str | Path, *, dicom: DicomOptions | None = None, max_pixels: int | None = None
) -> LoadedImage:
    """Read a DICOM, PNG, JPEG or TIFF file, choosing the reader from the file's content.

    A file with no known signature is tried as a DICOM data set without preamble (old exports
    and some PACS dumps), unless ``dicom.force`` is False.

    Args:
        path: The file; its extension is ignored.
        dicom: Options for DICOM files (defaults to :class:`~spcxr.io.dicom.DicomOptions()`).
        max_pixels: refuse (:class:`ImageTooLargeError`) an image whose header declares more
            pixels, before decoding it; ``None``: no limit.

    Returns:
        The image as float32 ``[H, W]`` in ``[0, 1]`` (higher = more attenuation) with metadata.

    Raises:
        ImageReadError: If the file is not a readable image of a supported kind.
    """
    path = Path(path)
    kind = sniff_format(read_head(path))
    if kind == "dicom":
        return read_dicom(path, dicom, max_pixels=max_pixels)
    if kind is not None:
        return _read_raster(path, kind, max_pixels)
    try:
        return read_dicom(path, dicom, max_pixels=max_pixels)
    except NotDicomError as err:
        start = read_head(path, 8)
        raise ImageReadError(
            path, f"not a DICOM, PNG, JPEG or TIFF file (starts with {start!r})"
        ) from err
