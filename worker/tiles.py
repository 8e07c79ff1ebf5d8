"""DeepZoom tiles of a slide, for any format :func:`worker.slide.open_slide` reads.

The pyramid is the one openslide's ``DeepZoomGenerator`` defines with ``limit_bounds=False``:
DeepZoom level ``L`` of ``N`` is the level-0 image halved (rounding up) ``N - 1 - L`` times, down to
1 × 1 px at level 0; tiles are ``tile_size`` px squares on that level's grid, each grown by
``overlap`` px on every side that has a neighbour. A tile is read from the slide level with the
largest downsample not above the DeepZoom level's, then reduced with Pillow's ``thumbnail``
(Lanczos), exactly as openslide does, so the tiles match openslide's pixel for pixel on slides both
read. Readers composite on white, so the background is white (openslide uses the slide's
background-colour property, white when absent).

A tile whose source region is larger than :data:`MAX_DIRECT_PIXELS` (the coarse levels of a big
single-level image) is reduced block by block instead, so memory stays bounded by the tile, not
the slide.
"""

from __future__ import annotations

import io
import logging
import math
import threading
from xml.etree import ElementTree as ET

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image

from worker.slide import Slide

__all__ = [
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE_SIZE",
    "DZI_NAMESPACE",
    "FORMATS",
    "JPEG_QUALITY",
    "MAX_DIRECT_PIXELS",
    "DeepZoom",
    "TileOutOfRange",
]

logger = logging.getLogger(__name__)

DEFAULT_TILE_SIZE = 254
"""Tile side without overlap, px (openslide's default: 254 + 2 overlap = 256)."""

DEFAULT_OVERLAP = 1
"""Overlap added on each inner side of a tile, px (openslide's default)."""

JPEG_QUALITY = 75
"""JPEG quality of the tiles (openslide's DeepZoom examples use 75)."""

FORMATS = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png"}
"""Tile formats served, by file extension, with their media types."""

DZI_NAMESPACE = "http://schemas.microsoft.com/deepzoom/2008"

MAX_DIRECT_PIXELS = 4096 * 4096
"""Largest source region read at once for one tile, px of the slide level."""

_BLOCK_PIXELS = 2048 * 2048
"""Source pixels per block when a tile's region is reduced block by block."""


class TileOutOfRange(ValueError):
    """A DeepZoom level or tile address outside the pyramid."""


def _check_size(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class DeepZoom:
    """The DeepZoom tile pyramid of an open slide.

    Parameters
    ----------
    slide : Slide
        An open reader (closing it stays the caller's job).
    tile_size : int
        Tile side without overlap, px (>= 1).
    overlap : int
        Overlap on each inner side of a tile, px (>= 0).

    Attributes
    ----------
    level_count : int
        DeepZoom levels; the last is level 0 of the slide, the first 1 × 1 px.
    level_dimensions : tuple of (int, int)
        (width, height) of every DeepZoom level.
    level_tiles : tuple of (int, int)
        (columns, rows) of tiles of every DeepZoom level.

    Tiles may be read from several threads: reads of the slide are serialised.
    """

    def __init__(self, slide: Slide, *, tile_size: int = DEFAULT_TILE_SIZE,
                 overlap: int = DEFAULT_OVERLAP) -> None:
        if not isinstance(slide, Slide):
            raise TypeError(f"slide must be a worker.slide.Slide, got {type(slide).__name__}")
        self.slide = slide
        self.tile_size = _check_size("tile_size", tile_size, 1)
        self.overlap = _check_size("overlap", overlap, 0)
        height, width = slide.shape
        sizes = [(width, height)]
        while sizes[-1] != (1, 1):
            w, h = sizes[-1]
            sizes.append((max(1, math.ceil(w / 2)), max(1, math.ceil(h / 2))))
        self.level_dimensions: tuple[tuple[int, int], ...] = tuple(reversed(sizes))
        self.level_count = len(self.level_dimensions)
        self.level_tiles: tuple[tuple[int, int], ...] = tuple(
            (math.ceil(w / self.tile_size), math.ceil(h / self.tile_size))
            for w, h in self.level_dimensions)
        downsamples = [2 ** (self.level_count - 1 - level) for level in range(self.level_count)]
        self._slide_level = tuple(slide.best_level(float(d)) for d in downsamples)
        # Slide-level pixels per DeepZoom pixel, for every DeepZoom level.
        self._scale = tuple(d / slide.level_downsamples[s]
                            for d, s in zip(downsamples, self._slide_level, strict=True))
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"DeepZoom({self.slide!r}, tile_size={self.tile_size}, overlap={self.overlap}, "
                f"levels={self.level_count})")

    def dzi(self, format: str = "jpeg") -> str:
        """The DeepZoom descriptor (``.dzi`` XML): tile size, overlap, format, level-0 size."""
        if format not in FORMATS:
            raise ValueError(f"format must be one of {sorted(FORMATS)}, got {format!r}")
        image = ET.Element("Image", {"xmlns": DZI_NAMESPACE, "Format": format,
                                     "Overlap": str(self.overlap), "TileSize": str(self.tile_size)})
        width, height = self.level_dimensions[-1]
        ET.SubElement(image, "Size", {"Height": str(height), "Width": str(width)})
        return ET.tostring(image, encoding="unicode", xml_declaration=True)

    def _check_address(self, level: int, col: int, row: int) -> None:
        for name, value in (("level", level), ("col", col), ("row", row)):
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= level < self.level_count:
            raise TileOutOfRange(f"DeepZoom level {level} outside 0..{self.level_count - 1}")
        cols, rows = self.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileOutOfRange(f"tile {col}_{row} outside level {level}'s {cols} × {rows} tiles")

    def tile_size_of(self, level: int, col: int, row: int) -> tuple[int, int]:
        """(width, height) of a tile, overlap included (raises TileOutOfRange)."""
        self._check_address(level, col, row)
        return self._tile_geometry(level, col, row)[0]

    def _tile_geometry(self, level: int, col: int, row: int
                       ) -> tuple[tuple[int, int], tuple[float, float], tuple[int, int]]:
        """(tile width, height), (x, y) of its source region in slide-level px, and the
        region's (width, height) in slide-level px."""
        ts, ov = self.tile_size, self.overlap
        scale = self._scale[level]
        level_h, level_w = self.slide.level_shapes[self._slide_level[level]]
        size, origin, source = [], [], []
        for t, t_count, z_lim, l_lim in ((col, self.level_tiles[level][0],
                                          self.level_dimensions[level][0], level_w),
                                         (row, self.level_tiles[level][1],
                                          self.level_dimensions[level][1], level_h)):
            before = ov if t != 0 else 0
            after = ov if t != t_count - 1 else 0
            z_size = min(ts, z_lim - ts * t) + before + after
            start = scale * (ts * t - before)
            size.append(z_size)
            origin.append(start)
            source.append(int(min(math.ceil(scale * z_size), l_lim - math.ceil(start))))
        return (size[0], size[1]), (origin[0], origin[1]), (source[0], source[1])

    def tile(self, level: int, col: int, row: int) -> NDArray[np.uint8]:
        """One tile as an (h, w, 3) uint8 RGB array.

        Parameters
        ----------
        level : int
            DeepZoom level (``level_count - 1`` = full resolution).
        col, row : int
            Tile address within the level.

        Raises
        ------
        TileOutOfRange
            If the level or address lies outside the pyramid.
        """
        self._check_address(level, col, row)
        (z_w, z_h), (x, y), (l_w, l_h) = self._tile_geometry(level, col, row)
        slide_level = self._slide_level[level]
        # openslide truncates the level-0 origin; truncating in level pixels is the same for the
        # power-of-two downsamples pyramids have (and within a pixel otherwise).
        x0, y0 = math.floor(x + 1e-9), math.floor(y + 1e-9)
        if l_w * l_h <= MAX_DIRECT_PIXELS:
            with self._lock:
                pixels = self.slide.read(slide_level, row=y0, col=x0, height=l_h, width=l_w)
            if (l_w, l_h) == (z_w, z_h):
                return pixels
            image = Image.fromarray(pixels)
            image.thumbnail((z_w, z_h), Image.Resampling.LANCZOS)
            return np.asarray(image, dtype=np.uint8)
        return self._reduced(slide_level, x0, y0, l_w, l_h, z_w, z_h)

    def _reduced(self, slide_level: int, x0: int, y0: int, l_w: int, l_h: int,
                 z_w: int, z_h: int) -> NDArray[np.uint8]:
        """A tile reduced from a large region block by block (area averaging)."""
        sx, sy = l_w / z_w, l_h / z_h
        block = max(1, int(math.sqrt(_BLOCK_PIXELS / (sx * sy))))
        out = np.empty((z_h, z_w, 3), np.uint8)
        for r0 in range(0, z_h, block):
            r1 = min(r0 + block, z_h)
            for c0 in range(0, z_w, block):
                c1 = min(c0 + block, z_w)
                top, left = math.floor(r0 * sy), math.floor(c0 * sx)
                bottom, right = max(top + 1, math.ceil(r1 * sy)), max(left + 1, math.ceil(c1 * sx))
                with self._lock:
                    pixels = self.slide.read(slide_level, row=y0 + top, col=x0 + left,
                                             height=bottom - top, width=right - left)
                out[r0:r1, c0:c1] = cv2.resize(pixels, (c1 - c0, r1 - r0),
                                               interpolation=cv2.INTER_AREA)
        logger.debug("tile reduced block by block from %d × %d px", l_w, l_h)
        return out

    def tile_bytes(self, level: int, col: int, row: int, format: str = "jpeg",
                   *, quality: int = JPEG_QUALITY) -> bytes:
        """One tile encoded as ``format`` (``"jpeg"``, ``"jpg"`` or ``"png"``)."""
        if format not in FORMATS:
            raise TileOutOfRange(f"tile format must be one of {sorted(FORMATS)}, got {format!r}")
        image = Image.fromarray(self.tile(level, col, row))
        buffer = io.BytesIO()
        if FORMATS[format] == "image/jpeg":
            image.save(buffer, format="JPEG", quality=quality)
        else:
            image.save(buffer, format="PNG")
        return buffer.getvalue()
