"""TIFF checks shared by every TIFF-based slide, and the tifffile reader for the TIFFs OpenSlide
does not read (OME-TIFF, plain stripped or tiled RGB TIFF).

The reader decodes only the tiles or strips a request overlaps, straight from their byte ranges,
with a small byte-bounded cache of decoded chunks.
"""

from __future__ import annotations

import logging
import math
import re
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from numpy.typing import NDArray

from worker.errors import NotRGBSlide, UnsupportedSlide
from worker.slide.base import (
    MAX_CHUNK_BYTES,
    MAX_UNTILED_PIXELS,
    ChunkCache,
    Slide,
    composite_on_white,
    resolve_mpp,
)

__all__ = ["TiffInfo", "TiffSlide", "inspect_tiff"]

logger = logging.getLogger(__name__)

_RGB_PHOTOMETRICS = (tifffile.PHOTOMETRIC.RGB, tifffile.PHOTOMETRIC.YCBCR)

# µm per resolution unit (TIFF ResolutionUnit tag).
_UM_PER_UNIT: dict[int, float] = {
    int(tifffile.RESUNIT.INCH): 25_400.0,
    int(tifffile.RESUNIT.CENTIMETER): 10_000.0,
    int(tifffile.RESUNIT.MILLIMETER): 1_000.0,
    int(tifffile.RESUNIT.MICROMETER): 1.0,
}

# µm per OME length unit (PhysicalSizeXUnit; the default is µm).
_UM_PER_OME_UNIT = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "nm": 1e-3, "Å": 1e-4}


@dataclass(frozen=True)
class TiffInfo:
    """What :func:`inspect_tiff` learned about a TIFF file."""

    is_ome: bool
    is_qpi: bool
    is_ndpi: bool
    is_svs: bool


def _open_tiff(path: Path) -> tifffile.TiffFile:
    try:
        return tifffile.TiffFile(path)
    except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
        raise UnsupportedSlide(f"{path}: not a readable TIFF: {exc}") from exc


def inspect_tiff(path: Path) -> TiffInfo:
    """Check a TIFF's structure before any reader decodes it.

    Refuses, without reading pixel data: files with no readable image, levels claiming absurd
    sizes (untiled levels above ``MAX_UNTILED_PIXELS``, tiles or strips above ``MAX_CHUNK_BYTES``),
    truncated files (an IFD chain or pixel data running past the end of the file) and images
    that are not 8-bit RGB.

    Raises
    ------
    UnsupportedSlide
        Unreadable, truncated or absurdly sized.
    NotRGBSlide
        Grey, 16-bit, palette or multichannel (fluorescence).
    """
    with _open_tiff(path) as tif:
        try:
            n_pages = len(tif.pages)
            series = tif.series
        except (tifffile.TiffFileError, ValueError, OSError, struct.error) as exc:
            raise UnsupportedSlide(f"{path}: damaged TIFF structure: {exc}") from exc
        if n_pages == 0 or not series:
            raise UnsupportedSlide(f"{path}: no readable image in the TIFF (truncated or damaged?)")
        info = TiffInfo(
            is_ome=tif.is_ome, is_qpi=tif.is_qpi, is_ndpi=tif.is_ndpi, is_svs=tif.is_svs
        )
        _check_claimed_sizes(path, series[0], allow_untiled=info.is_ndpi)
        _check_complete(path, tif)
        _check_rgb(path, series[0])
    return info


def _level_pages(series: tifffile.TiffPageSeries) -> list[tifffile.TiffPage]:
    return [level.keyframe for level in series.levels]


def _chunk_bytes(page: tifffile.TiffPage) -> int:
    samples = page.samplesperpixel if page.planarconfig == 1 else 1
    itemsize = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
    if page.is_tiled:
        rows, cols = page.tilelength, page.tilewidth
    else:
        rows, cols = min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth
    return int(rows) * int(cols) * int(samples) * itemsize * max(1, int(page.tiledepth or 1))


def _check_claimed_sizes(path: Path, series: tifffile.TiffPageSeries, *, allow_untiled: bool) -> None:
    for level, page in enumerate(_level_pages(series)):
        height, width = int(page.imagelength), int(page.imagewidth)
        if not page.is_tiled and not allow_untiled and height * width > MAX_UNTILED_PIXELS:
            raise UnsupportedSlide(
                f"{path}: level {level} is an untiled {width}×{height} px image, too large to read "
                f"region by region (limit {MAX_UNTILED_PIXELS:,} px); convert it to a tiled "
                "pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
            )
        if page.is_tiled and _chunk_bytes(page) > MAX_CHUNK_BYTES:
            raise UnsupportedSlide(
                f"{path}: level {level} claims {page.tilewidth}×{page.tilelength} px tiles, too "
                "large to decode safely (damaged header?)"
            )


def _check_complete(path: Path, tif: tifffile.TiffFile) -> None:
    size = tif.filehandle.size
    # tifffile stops quietly at an IFD offset past the end of the file: look at the last
    # IFD's link to the next one, which is 0 in a complete file.
    fmt = tif.tiff
    last = tif.pages[-1]
    fh = tif.filehandle
    try:
        fh.seek(last.offset)
        count = struct.unpack(fmt.tagnoformat, fh.read(fmt.tagnosize))[0]
        fh.seek(last.offset + fmt.tagnosize + count * fmt.tagsize)
        next_ifd = struct.unpack(fmt.offsetformat, fh.read(fmt.offsetsize))[0]
    except (struct.error, OSError) as exc:
        raise UnsupportedSlide(f"{path}: truncated TIFF (its last IFD is cut off)") from exc
    if next_ifd != 0 and not fmt.is_ndpi:
        raise UnsupportedSlide(
            f"{path}: truncated or damaged TIFF: an image directory lies at byte {next_ifd:,}, "
            f"past the end of the {size:,}-byte file"
        )
    for index, page in enumerate(tif.pages):
        offsets = np.asarray(getattr(page, "dataoffsets", ()), dtype=np.uint64)
        counts = np.asarray(getattr(page, "databytecounts", ()), dtype=np.uint64)
        if offsets.size == 0 or offsets.size != counts.size:
            continue
        present = (offsets > 0) & (counts > 0)
        if present.any():
            end = int((offsets[present] + counts[present]).max())
            if end > size:
                raise UnsupportedSlide(
                    f"{path}: truncated TIFF: image {index} needs bytes up to {end:,} but the "
                    f"file has {size:,}"
                )


def _describe(series: tifffile.TiffPageSeries) -> str:
    page = series.keyframe
    channels = math.prod(
        size for axis, size in zip(series.axes, series.shape, strict=True) if axis not in "YX"
    )
    photometric = tifffile.PHOTOMETRIC(page.photometric).name if page.photometric is not None else "?"
    plural = "channel" if channels == 1 else "channels"
    return (
        f"{channels} {plural} of {np.dtype(series.dtype).name} "
        f"(axes {series.axes}, shape {tuple(series.shape)}, photometric {photometric})"
    )


def _rgb_axes(series: tifffile.TiffPageSeries) -> str:
    """The series' axes without the length-1 ones (Y and X always kept)."""
    return "".join(
        axis for axis, size in zip(series.axes, series.shape, strict=True) if size > 1 or axis in "YX"
    )


def _check_rgb(path: Path, series: tifffile.TiffPageSeries) -> None:
    page = series.keyframe
    axes = _rgb_axes(series)
    rgb_like = (
        series.dtype == np.uint8
        and page.photometric in _RGB_PHOTOMETRICS
        and page.samplesperpixel in (3, 4)
    )
    if rgb_like and axes in ("YXS", "SYX"):
        return
    if rgb_like:
        raise UnsupportedSlide(
            f"{path}: holds several RGB planes ({_describe(series)}); only single-plane "
            "brightfield slides are supported"
        )
    raise NotRGBSlide(
        f"{path}: found {_describe(series)}; HoVerServe needs an 8-bit RGB brightfield (H&E) "
        "image, not grey, 16-bit or multichannel fluorescence"
    )


def _ome_mpp(tif: tifffile.TiffFile) -> float | None:
    xml = tif.ome_metadata
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        logger.warning("%s: unreadable OME-XML", tif.filename)
        return None
    for element in root.iter():
        if not element.tag.endswith("}Pixels") and element.tag != "Pixels":
            continue
        values = []
        for axis in ("X", "Y"):
            size = element.get(f"PhysicalSize{axis}")
            unit = element.get(f"PhysicalSize{axis}Unit", "µm")
            if size is None or unit not in _UM_PER_OME_UNIT:
                return None
            values.append(float(size) * _UM_PER_OME_UNIT[unit])
        return sum(values) / 2
    return None


def _svs_mpp(page: tifffile.TiffPage) -> float | None:
    match = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", page.description or "")
    return float(match.group(1)) if match else None


def _tag_mpp(page: tifffile.TiffPage) -> float | None:
    unit = int(page.resolutionunit)
    # Without the tags tifffile reports TIFF's default (1 px per inch): no information.
    if "XResolution" not in page.tags or unit not in _UM_PER_UNIT:
        return None
    try:
        x_res, y_res = page.get_resolution()
    except (ValueError, ZeroDivisionError, TypeError):
        return None
    if not x_res or not y_res:
        return None
    um = _UM_PER_UNIT[unit]
    return (um / x_res + um / y_res) / 2


class TiffSlide(Slide):
    """An RGB TIFF read with tifffile: OME-TIFF pyramids, plain tiled or stripped TIFFs."""

    def __init__(self, path: Path, *, mpp: float | None = None) -> None:
        self._tif: tifffile.TiffFile | None = _open_tiff(path)
        self._cache = ChunkCache()
        try:
            self._setup(path, self._tif, mpp)
        except BaseException:
            self.close()
            raise

    def _setup(self, path: Path, tif: tifffile.TiffFile, override: float | None) -> None:
        series = tif.series[0]
        _check_rgb(path, series)
        self._pages: list[tifffile.TiffPage | tifffile.TiffFrame] = []
        self._keyframes: list[tifffile.TiffPage] = []
        shapes: list[tuple[int, int]] = []
        for level in series.levels:
            page = level.pages[0]
            keyframe = None if page is None else page.keyframe
            if page is None or keyframe is None:
                raise UnsupportedSlide(f"{path}: a pyramid level has no image data")
            if (keyframe.tiledepth or 1) > 1:
                raise UnsupportedSlide(f"{path}: volumetric (tiled in depth) TIFFs are not supported")
            self._pages.append(page)
            self._keyframes.append(keyframe)
            shapes.append((int(keyframe.imagelength), int(keyframe.imagewidth)))
        height0, width0 = shapes[0]
        downsamples = tuple((height0 / h + width0 / w) / 2 for h, w in shapes)
        keyframe = self._keyframes[0]
        if tif.is_ome:
            found, what = _ome_mpp(tif), "its OME-XML metadata"
        elif tif.is_svs:
            found, what = _svs_mpp(keyframe), "its Aperio description"
        else:
            found, what = _tag_mpp(keyframe), "its TIFF resolution tags"
        mpp, source = resolve_mpp(found, override, path, what=what)
        properties = {"reader": "tifffile", "mpp_source": source}
        if found is not None:
            properties["metadata_mpp"] = f"{found:.6g}"
        properties["compression"] = tifffile.COMPRESSION(keyframe.compression).name
        super().__init__(
            path,
            format="ome-tiff" if tif.is_ome else "tiff",
            mpp=mpp,
            level_shapes=tuple(shapes),
            level_downsamples=downsamples,
            properties=properties,
        )
        # Decode one chunk now so a codec we lack fails at open, not halfway through a job.
        self._chunk(0, 0)

    def _grid(self, level: int) -> tuple[int, int, int]:
        """(chunk rows, chunk cols, chunks per row) of a level's tiles or strips."""
        page = self._keyframes[level]
        if page.is_tiled:
            return (
                int(page.tilelength),
                int(page.tilewidth),
                math.ceil(page.imagewidth / page.tilewidth),
            )
        rows = int(min(page.rowsperstrip or page.imagelength, page.imagelength))
        return rows, int(page.imagewidth), 1

    def _chunk(self, level: int, index: int) -> NDArray[np.uint8]:
        """The decoded RGB chunk ``index`` (row-major tile or strip number) of ``level``."""
        cached = self._cache.get((level, index))
        if cached is None:
            cached = self._decode_chunk(level, index)
            self._cache.put((level, index), cached)
        return cached

    def _decode_chunk(self, level: int, index: int) -> NDArray[np.uint8]:
        page, keyframe = self._pages[level], self._keyframes[level]
        chunk_rows, chunk_cols, per_row = self._grid(level)
        height, width = self.level_shapes[level]
        top, left = (index // per_row) * chunk_rows, (index % per_row) * chunk_cols
        rows, cols = min(chunk_rows, height - top), min(chunk_cols, width - left)
        samples = int(keyframe.samplesperpixel)
        planar = keyframe.planarconfig == 2
        per_plane = len(page.dataoffsets) // samples if planar else len(page.dataoffsets)
        out = np.full((rows, cols, samples), 255, dtype=np.uint8)
        for sample in range(samples if planar else 1):
            segment_index = sample * per_plane + index if planar else index
            segment = self._decode_segment(page, keyframe, segment_index)
            if segment is None:  # a sparse TIFF's missing chunk: background
                continue
            segment = segment.reshape(segment.shape[-3:])[:rows, :cols]
            if planar:
                out[: segment.shape[0], : segment.shape[1], sample] = segment[..., 0]
            else:
                out[: segment.shape[0], : segment.shape[1]] = segment
        return composite_on_white(out)

    def _decode_segment(
        self,
        page: tifffile.TiffPage | tifffile.TiffFrame,
        keyframe: tifffile.TiffPage,
        index: int,
    ) -> NDArray[np.uint8] | None:
        if self._tif is None:
            raise ValueError(f"{self.path}: the slide is closed")
        offset, count = int(page.dataoffsets[index]), int(page.databytecounts[index])
        try:
            if offset == 0 or count == 0:
                return None
            fh = self._tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
            segment, _, _ = keyframe.decode(
                data, index, jpegtables=keyframe.jpegtables, jpegheader=keyframe.jpegheader
            )
        except Exception as exc:  # codecs raise their own types: translate them all here
            raise UnsupportedSlide(f"{self.path}: cannot decode chunk {index}: {exc}") from exc
        return segment

    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        chunk_rows, chunk_cols, per_row = self._grid(level)
        out = np.empty((height, width, 3), dtype=np.uint8)
        for chunk_row in range(row // chunk_rows, (row + height - 1) // chunk_rows + 1):
            for chunk_col in range(col // chunk_cols, (col + width - 1) // chunk_cols + 1):
                chunk = self._chunk(level, chunk_row * per_row + chunk_col)
                top, left = chunk_row * chunk_rows, chunk_col * chunk_cols
                r0, r1 = max(row, top), min(row + height, top + chunk.shape[0])
                c0, c1 = max(col, left), min(col + width, left + chunk.shape[1])
                out[r0 - row : r1 - row, c0 - col : c1 - col] = chunk[
                    r0 - top : r1 - top, c0 - left : c1 - left
                ]
        return out

    def close(self) -> None:
        """Close the file and drop the chunk cache (idempotent)."""
        self._cache.clear()
        if self._tif is not None:
            self._tif.close()
            self._tif = None
