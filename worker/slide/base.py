"""The :class:`Slide` reader interface shared by every backend, and the helpers they all use.

A slide is a pyramid of levels. Level 0 is the full resolution; every level is addressed in its own
pixels as (row, col) = (y, x). Readers return 8-bit RGB; anything outside the slide reads as white,
alpha is composited on white, so callers never see transparency or undefined pixels.
"""

from __future__ import annotations

import abc
import logging
import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.errors import MissingResolution, SlideTooLarge
from worker.options import MAX_MPP, MIN_MPP

__all__ = [
    "CHUNK_CACHE_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_MPP",
    "MAX_READ_PIXELS",
    "MAX_UNTILED_PIXELS",
    "MIN_MPP",
    "PLANNING_PIXEL_BUDGET",
    "ChunkCache",
    "Slide",
    "check_user_mpp",
    "composite_on_white",
    "plausible_mpp",
    "resolve_mpp",
]

logger = logging.getLogger(__name__)


MAX_UNTILED_PIXELS = 20_000 * 20_000
"""Largest untiled (stripped or plain-image) level we accept, pixels: such images cannot be read
region by region, so a larger one has to be converted to a tiled pyramid first."""

MAX_CHUNK_BYTES = 64 * 1024 * 1024
"""Largest decoded tile, strip or frame we accept, bytes: a header claiming bigger ones is either
damaged or would need a huge allocation for every small read."""

CHUNK_CACHE_BYTES = 32 * 1024 * 1024
"""Decoded tiles, strips or frames a reader keeps for neighbouring reads (region halos overlap),
bytes per open slide."""

MAX_READ_PIXELS = 1 << 28
"""Largest region one :meth:`Slide.read` call may ask for, pixels (768 MiB of RGB)."""

PLANNING_PIXEL_BUDGET = 1 << 28
"""Most pixels planning may decode for a slide's overview (thumbnail and tissue mask): a
16384 × 16384 level, decoded in bounded blocks in well under a minute, so flat (single-level)
exports of moderate size still plan. Slides without a level that small are planned from their
ROI alone, or refused (:class:`~worker.errors.SlideTooLarge`)."""

_THUMBNAIL_BLOCK = 4096
"""Side, in pixels of the level being read, of the blocks a thumbnail is assembled from, so the
memory a thumbnail needs stays bounded whatever the slide and pyramid."""

_WHITE = 255


def plausible_mpp(value: float | None) -> float | None:
    """Return ``value`` if it is a plausible microscope resolution in µm/px, else ``None``."""
    if value is None or not math.isfinite(value):
        return None
    if MIN_MPP <= value <= MAX_MPP:
        return float(value)
    return None


def check_user_mpp(mpp: float | None) -> float | None:
    """Validate a user-supplied µm/px override (``None`` = use the metadata).

    Raises
    ------
    TypeError
        If ``mpp`` is not a number.
    ValueError
        If ``mpp`` is not a plausible resolution (outside [``MIN_MPP``, ``MAX_MPP``]).
    """
    if mpp is None:
        return None
    if isinstance(mpp, bool) or not isinstance(mpp, int | float):
        raise TypeError(f"mpp must be a number of µm per pixel, got {type(mpp).__name__}")
    if plausible_mpp(float(mpp)) is None:
        raise ValueError(
            f"mpp must be between {MIN_MPP} and {MAX_MPP} µm per pixel, got {mpp} "
            "(e.g. 0.25 for a 40× scan, 0.5 for 20×)"
        )
    return float(mpp)


def resolve_mpp(
    found: float | None, override: float | None, path: Path, *, what: str = "its metadata"
) -> tuple[float, str]:
    """Choose the level-0 resolution: the user's override, else a plausible metadata value.

    Parameters
    ----------
    found : float or None
        µm/px read from the file (``None`` when absent); implausible values count as absent.
    override : float or None
        The user's µm/px (already validated with :func:`check_user_mpp`).
    path : Path
        The slide, for the error message.
    what : str
        Where ``found`` came from, for the error message.

    Returns
    -------
    mpp : float
        µm per level-0 pixel.
    source : str
        ``"user"`` or ``"metadata"``.

    Raises
    ------
    MissingResolution
        If neither gives a plausible resolution.
    """
    if override is not None:
        metadata = plausible_mpp(found)
        if metadata is not None and abs(metadata - override) > 0.1 * metadata:
            logger.warning(
                "%s: using mpp %.4g from the caller; the metadata says %.4g", path, override, metadata
            )
        return override, "user"
    metadata = plausible_mpp(found)
    if metadata is not None:
        return metadata, "metadata"
    detail = "" if found is None else f" ({found:.4g} µm/px there is not a microscope value)"
    raise MissingResolution(
        f"{path} has no resolution in {what}{detail}; pass --mpp (µm per pixel, "
        "e.g. --mpp 0.25 for 40×, 0.5 for 20×)"
    )


def composite_on_white(pixels: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """Return RGB pixels, compositing an alpha channel (if any) over white.

    Parameters
    ----------
    pixels : (H, W, 3) or (H, W, 4) uint8 ndarray
        RGB or straight (non-premultiplied) RGBA.

    Returns
    -------
    (H, W, 3) uint8 ndarray
    """
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4):
        raise ValueError(f"expected an (H, W, 3|4) image, got shape {pixels.shape}")
    if pixels.shape[2] == 3:
        return np.ascontiguousarray(pixels)
    alpha = pixels[..., 3:4]
    if np.all(alpha == _WHITE):
        return np.ascontiguousarray(pixels[..., :3])
    rgb = pixels[..., :3].astype(np.uint16)
    a = alpha.astype(np.uint16)
    # Integer rounding of rgb * a / 255 + 255 * (255 - a) / 255.
    out = (rgb * a + _WHITE * (_WHITE - a) + 127) // _WHITE
    return out.astype(np.uint8)


class ChunkCache:
    """Decoded chunks (tiles, strips, frames) by key, bounded in bytes; least recently used go
    first, but the newest is always kept (so one oversized strip is decoded once, not per read)."""

    def __init__(self, max_bytes: int = CHUNK_CACHE_BYTES) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, NDArray[np.uint8]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable) -> NDArray[np.uint8] | None:
        """The cached chunk for ``key``, or ``None``."""
        chunk = self._items.get(key)
        if chunk is not None:
            self._items.move_to_end(key)
        return chunk

    def put(self, key: Hashable, chunk: NDArray[np.uint8]) -> None:
        """Keep ``chunk`` under ``key``, evicting the oldest entries beyond the byte budget."""
        previous = self._items.pop(key, None)
        if previous is not None:
            self._bytes -= previous.nbytes
        self._items[key] = chunk
        self._bytes += chunk.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes

    def clear(self) -> None:
        """Drop every chunk."""
        self._items.clear()
        self._bytes = 0


@dataclass(frozen=True, slots=True)
class _ThumbnailGeometry:
    """A thumbnail's source ``level``, level (``scale``) and level-0 (``downsample``) pixels per
    thumbnail pixel, output size, box corner in level pixels and box area in level pixels."""

    level: int
    scale: float
    downsample: float
    out_h: int
    out_w: int
    row: float
    col: float
    level_pixels: int


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


class Slide(abc.ABC):
    """A whole-slide image opened for reading: a pyramid of RGB levels.

    Each process opens its own reader (instances are not meant to be pickled). Use it as a
    context manager or call :meth:`close`.

    Attributes
    ----------
    path : Path
        The file (or DICOM directory) read.
    format : str
        ``"aperio"``, ``"hamamatsu"``, ``"mirax"``, ``"generic-tiff"``, ``"dicom"`` … (OpenSlide's
        vendor name), or ``"ome-tiff"``, ``"tiff"``, ``"dicom"``, ``"image"`` for the other readers.
    mpp : float
        µm per level-0 pixel (the caller's override if one was given).
    level_shapes : tuple of (int, int)
        (height, width) of every level, level 0 first.
    level_downsamples : tuple of float
        Level-0 pixels per pixel of every level (1.0 first, increasing).
    properties : dict of str to str
        A few metadata entries worth recording (vendor, reader, objective power, mpp source…).
    """

    path: Path
    format: str
    mpp: float
    level_shapes: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    properties: dict[str, str]

    def __init__(
        self,
        path: Path,
        *,
        format: str,
        mpp: float,
        level_shapes: tuple[tuple[int, int], ...],
        level_downsamples: tuple[float, ...],
        properties: dict[str, str],
    ) -> None:
        if not level_shapes or len(level_shapes) != len(level_downsamples):
            raise ValueError(
                f"level_shapes ({len(level_shapes)}) and level_downsamples "
                f"({len(level_downsamples)}) must be non-empty and of equal length"
            )
        if any(h < 1 or w < 1 for h, w in level_shapes):
            raise ValueError(f"every level needs at least one pixel, got {level_shapes}")
        self.path = path
        self.format = format
        self.mpp = mpp
        self.level_shapes = tuple((int(h), int(w)) for h, w in level_shapes)
        self.level_downsamples = tuple(float(d) for d in level_downsamples)
        self.properties = dict(properties)

    def __repr__(self) -> str:
        h, w = self.shape
        return (
            f"{type(self).__name__}({str(self.path)!r}, format={self.format!r}, "
            f"shape=({h}, {w}), mpp={self.mpp:.4g}, levels={len(self.level_shapes)})"
        )

    def __enter__(self) -> Slide:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def shape(self) -> tuple[int, int]:
        """Level-0 (height, width) in pixels."""
        return self.level_shapes[0]

    def best_level(self, downsample: float) -> int:
        """Return the level with the largest downsample not above ``downsample``.

        Parameters
        ----------
        downsample : float
            Wanted level-0 pixels per output pixel (>= 0; below 1 gives level 0).
        """
        if not math.isfinite(downsample) or downsample < 0:
            raise ValueError(f"downsample must be a finite number >= 0, got {downsample}")
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            # The small tolerance keeps 4.0 asking for a level whose downsample reads 4.0000001.
            if level_downsample <= downsample * (1 + 1e-6):
                best = level
        return best

    def read(
        self, level: int, *, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        """Read a region of one level.

        Parameters
        ----------
        level : int
            Pyramid level (0 = full resolution).
        row, col : int
            Top-left corner in that level's pixels; may be negative or beyond the slide.
        height, width : int
            Region size in that level's pixels (>= 1).

        Returns
        -------
        (height, width, 3) uint8 ndarray
            RGB; pixels outside the slide are white (255).

        Raises
        ------
        SlideError
            If the file cannot be decoded (``UnsupportedSlide``).
        """
        level = _check_int("level", level)
        row, col = _check_int("row", row), _check_int("col", col)
        height, width = _check_int("height", height), _check_int("width", width)
        if not 0 <= level < len(self.level_shapes):
            raise ValueError(f"level must be in [0, {len(self.level_shapes)}), got {level}")
        if height < 1 or width < 1:
            raise ValueError(f"height and width must be >= 1, got {height}×{width}")
        if height * width > MAX_READ_PIXELS:
            raise ValueError(
                f"a {height}×{width} read exceeds the {MAX_READ_PIXELS} pixel limit; read smaller regions"
            )
        level_h, level_w = self.level_shapes[level]
        r0, c0 = max(row, 0), max(col, 0)
        r1, c1 = min(row + height, level_h), min(col + width, level_w)
        if r0 == row and c0 == col and r1 == row + height and c1 == col + width:
            return self._read_inside(level, r0, c0, height, width)
        out = np.full((height, width, 3), _WHITE, dtype=np.uint8)
        if r1 > r0 and c1 > c0:
            out[r0 - row : r1 - row, c0 - col : c1 - col] = self._read_inside(
                level, r0, c0, r1 - r0, c1 - c0
            )
        return out

    def thumbnail(
        self,
        *,
        max_side: int = 2048,
        box: tuple[int, int, int, int] | None = None,
        budget: int | None = PLANNING_PIXEL_BUDGET,
    ) -> tuple[NDArray[np.uint8], float]:
        """Return a low-resolution RGB image of the whole slide (or of a level-0 box).

        Reads the pyramid level closest to (not coarser than) the wanted scale, block by block,
        so memory stays bounded even for a single-level 100k × 100k slide; ``budget`` bounds the
        time (the pixels decoded).

        Parameters
        ----------
        max_side : int
            Longest side of the result, pixels (>= 1).
        box : (row, col, height, width), optional
            The level-0 area to show (default: the whole slide); parts outside the slide are white.
        budget : int or None
            Most pixels the read may decode (see :meth:`thumbnail_cost`); ``None`` = no limit.

        Returns
        -------
        image : (h, w, 3) uint8 ndarray
            RGB thumbnail; ``max(h, w) <= max_side``. Thumbnail pixel (r, c) covers level-0
            rows [row + r·d, row + (r+1)·d) and columns [col + c·d, col + (c+1)·d); the last
            row/column may reach past the box (slide pixels there, white beyond the slide).
        downsample : float
            ``d``, level-0 pixels per thumbnail pixel (1.0 when the box already fits).

        Raises
        ------
        SlideTooLarge
            If the read would decode more than ``budget`` pixels (no low-enough pyramid level).
        """
        geometry = self._thumbnail_geometry(max_side, box)
        cost = self.decoded_pixels(geometry.level, geometry.level_pixels)
        if budget is not None and cost > budget:
            raise SlideTooLarge(
                f"{self.path.name}: a {geometry.out_w}×{geometry.out_h} px overview of "
                f"{'the slide' if box is None else 'the area'} would decode {cost:,} px of "
                f"level {geometry.level} (budget {budget:,} px); read a smaller area, or "
                "convert the slide to a pyramidal TIFF"
            )
        out = np.empty((geometry.out_h, geometry.out_w, 3), dtype=np.uint8)
        block = max(1, int(_THUMBNAIL_BLOCK / geometry.scale))
        for r0 in range(0, geometry.out_h, block):
            r1 = min(r0 + block, geometry.out_h)
            for c0 in range(0, geometry.out_w, block):
                c1 = min(c0 + block, geometry.out_w)
                out[r0:r1, c0:c1] = self._thumbnail_block(geometry, r0, c0, r1, c1)
        return out, geometry.downsample

    def thumbnail_cost(
        self, *, max_side: int = 2048, box: tuple[int, int, int, int] | None = None
    ) -> int:
        """Pixels :meth:`thumbnail` would decode with these arguments (reads nothing): the
        box's area at the level the thumbnail is read from, as :meth:`decoded_pixels` counts."""
        geometry = self._thumbnail_geometry(max_side, box)
        return self.decoded_pixels(geometry.level, geometry.level_pixels)

    def decoded_pixels(self, level: int, pixels: int) -> int:
        """Pixels decoded to read ``pixels`` of ``level`` (0 for readers that decode at open)."""
        return pixels

    def _thumbnail_geometry(
        self, max_side: int, box: tuple[int, int, int, int] | None
    ) -> _ThumbnailGeometry:
        max_side = _check_int("max_side", max_side)
        if max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {max_side}")
        if box is None:
            row, col, (height0, width0) = 0, 0, self.shape
        else:
            if len(box) != 4:
                raise ValueError(f"box must be (row, col, height, width), got {box!r}")
            row, col, height0, width0 = (_check_int(name, value) for name, value in
                                         zip(("row", "col", "height", "width"), box, strict=True))
            if height0 < 1 or width0 < 1:
                raise ValueError(f"box height and width must be >= 1, got {height0}×{width0}")
        downsample = max(1.0, max(height0, width0) / max_side)
        out_h = min(max_side, math.ceil(height0 / downsample - 1e-9))
        out_w = min(max_side, math.ceil(width0 / downsample - 1e-9))
        level = self.best_level(downsample)
        level_downsample = self.level_downsamples[level]
        level_pixels = math.ceil(height0 / level_downsample) * math.ceil(width0 / level_downsample)
        return _ThumbnailGeometry(
            level=level,
            scale=downsample / level_downsample,  # level pixels per thumbnail pixel
            downsample=downsample,
            out_h=out_h,
            out_w=out_w,
            row=row / level_downsample,
            col=col / level_downsample,
            level_pixels=level_pixels,
        )

    def _thumbnail_block(
        self, geometry: _ThumbnailGeometry, r0: int, c0: int, r1: int, c1: int
    ) -> NDArray[np.uint8]:
        scale = geometry.scale
        row0 = math.floor(geometry.row + r0 * scale)
        col0 = math.floor(geometry.col + c0 * scale)
        row1 = max(row0 + 1, math.ceil(geometry.row + r1 * scale))
        col1 = max(col0 + 1, math.ceil(geometry.col + c1 * scale))
        pixels = self.read(geometry.level, row=row0, col=col0, height=row1 - row0, width=col1 - col0)
        if pixels.shape[:2] == (r1 - r0, c1 - c0):
            return pixels
        resized = cv2.resize(pixels, (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)
        return np.asarray(resized, dtype=np.uint8)

    def close(self) -> None:  # noqa: B027 - readers without resources need not override it
        """Release the file handles (idempotent)."""

    @abc.abstractmethod
    def _read_inside(
        self, level: int, row: int, col: int, height: int, width: int
    ) -> NDArray[np.uint8]:
        """Read a region lying entirely inside ``level``: (height, width, 3) uint8 RGB."""
