"""Choose the reader for a slide file: :func:`open_slide`.

Order: OpenSlide for what it recognises (after TIFF structure checks, so a damaged or absurd
header is refused before any decoder sees it); tifffile for OME-TIFF, QPTIFF and plain TIFF;
wsidicom, then pydicom frame by frame, for DICOM OpenSlide refuses; Pillow for PNG and JPEG.
"""

from __future__ import annotations

import logging
from pathlib import Path

from worker.errors import SlideError, UnsupportedSlide
from worker.slide.base import Slide, check_user_mpp
from worker.slide.dicom_reader import DicomFrameSlide, WsiDicomSlide
from worker.slide.image_reader import ImageSlide
from worker.slide.openslide_reader import OpenSlideSlide, openslide_vendor
from worker.slide.tiff_reader import TiffSlide, inspect_tiff

__all__ = ["open_slide"]

logger = logging.getLogger(__name__)

_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_HEAD_BYTES = 132  # DICOM's "DICM" sits after a 128-byte preamble


def open_slide(path: str | Path, *, mpp: float | None = None) -> Slide:
    """Open a whole-slide image (or a plain RGB image) for reading.

    Parameters
    ----------
    path : str or Path
        A slide file (SVS, NDPI, MRXS, SCN, BIF, tiled or OME TIFF, DICOM, PNG, JPEG…) or a
        directory holding one DICOM WSI series.
    mpp : float, optional
        µm per level-0 pixel, overriding the metadata (required when the file has none).

    Returns
    -------
    Slide
        An open reader; close it (or use it as a context manager) when done.

    Raises
    ------
    UnsupportedSlide
        Missing, empty, unreadable, truncated or unknown files; absurd claimed sizes.
    NotRGBSlide
        Grey, 16-bit or multichannel (fluorescence) images.
    MissingResolution
        No plausible µm/px in the metadata and ``mpp`` not given.
    ValueError
        If ``mpp`` is outside the plausible range.
    """
    override = check_user_mpp(mpp)
    path = Path(path)
    try:
        return _open_any(path, override)
    except SlideError:
        raise
    except Exception as exc:
        # The reader libraries raise anything at all on damaged or hostile files (pydicom's
        # BytesLengthException, a TypeError deep in tifffile...): such a file is unreadable, not
        # a fault of ours.
        raise UnsupportedSlide(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from exc


def _open_any(path: Path, override: float | None) -> Slide:
    if not path.exists():
        raise UnsupportedSlide(f"{path}: no such file or directory")
    if path.is_dir():
        return _open_dicom_directory(path, override)
    if not path.is_file():
        raise UnsupportedSlide(f"{path}: not a regular file")
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError as exc:
        raise UnsupportedSlide(f"{path}: cannot read it: {exc}") from exc
    if not head:
        raise UnsupportedSlide(f"{path}: empty file")
    vendor = openslide_vendor(path)
    if head.startswith(_TIFF_MAGICS):
        return _open_tiff(path, vendor, override)
    if head[128:132] == b"DICM":
        return _open_dicom(path, vendor, override)
    if vendor is not None:
        return OpenSlideSlide(path, mpp=override)
    if head.startswith((_PNG_MAGIC, _JPEG_MAGIC)):
        return ImageSlide(path, mpp=override)
    raise UnsupportedSlide(f"{path}: not a slide format any reader recognises ({_describe(head)})")


def _describe(head: bytes) -> str:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"starts with bytes {head[:8].hex(' ')}"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return "it is a text file"
    return f"starts with bytes {head[:8].hex(' ')}"


def _open_tiff(path: Path, vendor: str | None, override: float | None) -> Slide:
    info = inspect_tiff(path)
    # OpenSlide reads OME-TIFF and QPTIFF as generic TIFF and would miss their pyramid and
    # metadata; tifffile understands both.
    if vendor is not None and not info.is_ome and not info.is_qpi:
        try:
            return OpenSlideSlide(path, mpp=override)
        except UnsupportedSlide as exc:
            logger.info("%s: OpenSlide refused it (%s); trying tifffile", path, exc)
    return TiffSlide(path, mpp=override)


def _open_dicom(path: Path, vendor: str | None, override: float | None) -> Slide:
    refusals: list[str] = []
    if vendor is not None:
        try:
            return OpenSlideSlide(path, mpp=override)
        except UnsupportedSlide as exc:
            refusals.append(str(exc))
    try:
        return WsiDicomSlide(path, mpp=override)
    except UnsupportedSlide as exc:
        refusals.append(str(exc))
    logger.info("%s: standard DICOM readers refused it (%s); reading frames with pydicom",
                path, "; ".join(refusals))
    try:
        return DicomFrameSlide(path, mpp=override)
    except UnsupportedSlide as exc:
        refusals.append(str(exc))
        raise UnsupportedSlide(
            f"{path}: no DICOM reader can use it: " + "; ".join(refusals)
        ) from exc


def _open_dicom_directory(path: Path, override: float | None) -> Slide:
    for candidate in sorted(path.iterdir()):
        if candidate.is_file() and openslide_vendor(candidate) == "dicom":
            try:
                return OpenSlideSlide(candidate, mpp=override)
            except UnsupportedSlide as exc:
                logger.info("%s: OpenSlide refused it (%s); trying wsidicom", candidate, exc)
            break
    return WsiDicomSlide(path, mpp=override)
