"""A valid tiled TIFF of any claimed size whose every tile offset points at one stored tile.

A 100,000 × 100,000 px RGB slide becomes a ~1 MB file written in milliseconds: what a hostile
(or merely unusual) upload looks like to the planner, without 30 GB of pixels anywhere.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

_SHORT, _LONG, _RATIONAL = 3, 4, 5


def write_repeated_tile_tiff(
    path: Path, tile: NDArray[np.uint8], *, height: int, width: int, mpp: float
) -> Path:
    """Write a single-level, deflate-compressed, tiled RGB TIFF of ``height`` × ``width`` px.

    Parameters
    ----------
    path : Path
        Where to write it.
    tile : (s, s, 3) uint8 ndarray
        The one tile every tile offset points at (``s`` a multiple of 16).
    height, width : int
        The image size the file claims, pixels.
    mpp : float
        µm per pixel, written as resolution tags (pixels per centimetre).
    """
    side = tile.shape[0]
    if tile.shape != (side, side, 3) or tile.dtype != np.uint8 or side % 16:
        raise ValueError(f"tile must be (s, s, 3) uint8 with s a multiple of 16, got {tile.shape}")
    data = zlib.compress(np.ascontiguousarray(tile).tobytes(), 6)
    count = -(-height // side) * -(-width // side)
    # Layout: header, the tile, BitsPerSample values, offsets, byte counts, resolutions, IFD.
    tile_at = 8
    bits_at = tile_at + len(data) + len(data) % 2  # TIFF wants word-aligned offsets
    offsets_at = bits_at + 6
    counts_at = offsets_at + 4 * count
    resolution_at = counts_at + 4 * count
    ifd_at = resolution_at + 16
    pixels_per_cm = round(1e4 / mpp)
    tags = [  # (tag, type, count, value or offset), sorted by tag as TIFF requires
        (256, _LONG, 1, width), (257, _LONG, 1, height), (258, _SHORT, 3, bits_at),
        (259, _SHORT, 1, 8), (262, _SHORT, 1, 2), (277, _SHORT, 1, 3),
        (282, _RATIONAL, 1, resolution_at), (283, _RATIONAL, 1, resolution_at + 8),
        (284, _SHORT, 1, 1), (296, _SHORT, 1, 3), (322, _SHORT, 1, side), (323, _SHORT, 1, side),
        (324, _LONG, count, offsets_at), (325, _LONG, count, counts_at),
    ]
    with path.open("wb") as fh:
        fh.write(b"II*\x00" + struct.pack("<I", ifd_at))
        fh.write(data + b"\x00" * (len(data) % 2))
        fh.write(struct.pack("<3H", 8, 8, 8))
        fh.write(np.full(count, tile_at, "<u4").tobytes())
        fh.write(np.full(count, len(data), "<u4").tobytes())
        fh.write(struct.pack("<4I", pixels_per_cm, 1, pixels_per_cm, 1))
        fh.write(struct.pack("<H", len(tags)))
        for tag, kind, n, value in tags:
            if kind == _SHORT and n == 1:  # a single SHORT sits left-aligned in the value field
                fh.write(struct.pack("<HHIHH", tag, kind, n, value, 0))
            else:
                fh.write(struct.pack("<HHII", tag, kind, n, value))
        fh.write(struct.pack("<I", 0))
    return path
