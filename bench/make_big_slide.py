"""Build a real-size pyramidal 40× test slide from real tissue.

The slide is CMU-1-Small-Region (20×, 0.499 µm/px, real H&E skin with its real background)
upsampled 2× to 40× and repeated by mirroring across the requested size, so the tissue stays
continuous at the repeat edges and the tissue fraction is the source's (about a third). It is
written with tifffile as a tiled BigTIFF: level 0 plus pages downsampled by 4 and by 16, each a
separate reduced-resolution page (``NewSubfileType`` 1) of the main IFD chain, which both
OpenSlide (generic tiled TIFF) and HoVerServe's tifffile reader take as pyramid levels. The
resolution tags say 40,000 px per cm, i.e. 0.25 µm/px.

Memory is bounded by the source, never by the output: every level is mirrored from the
source resampled to that level's scale (about 80 MB for level 0), and tiles are handed to
tifffile one at a time.

Run ``python bench/make_big_slide.py [--size 20000] [--out bench/work/big_slide_40x.tiff]``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile
from numpy.typing import NDArray

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SOURCE = ROOT / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
DEFAULT_OUT = BENCH / "work" / "big_slide_40x.tiff"
sys.path.insert(0, str(ROOT))  # ``worker`` when run as a script

__all__ = [
    "DEFAULT_OUT",
    "DOWNSAMPLES",
    "MPP",
    "SOURCE",
    "build_slide",
    "level_tiles",
    "mirror_indices",
]

logger = logging.getLogger(__name__)

MPP = 0.25
"""µm per level-0 pixel of the built slide (40×)."""

DOWNSAMPLES = (1, 4, 16)
"""Downsample of each pyramid level."""

_UPSAMPLE = 2  # 20× source to 40×
_PX_PER_CM = 10_000.0 / MPP


def mirror_indices(start: int, stop: int, period: int) -> NDArray[np.intp]:
    """Source indices of output positions ``start..stop-1`` when a length-``period`` axis is
    repeated by mirroring (0, 1, …, n-1, n-1, …, 0, 0, 1, …), so neighbours stay neighbours.

    Parameters
    ----------
    start, stop : int
        Output positions, ``0 <= start <= stop``.
    period : int
        Length of the source axis (>= 1).
    """
    if period < 1:
        raise ValueError(f"period must be >= 1, got {period}")
    if not 0 <= start <= stop:
        raise ValueError(f"need 0 <= start <= stop, got {start}, {stop}")
    phase = np.arange(start, stop, dtype=np.intp) % (2 * period)
    return np.where(phase < period, phase, 2 * period - 1 - phase)


def _read_source(source: Path) -> NDArray[np.uint8]:
    """Level 0 of the source slide, cropped to a multiple of 8 px so every level's repeat
    period is a whole number of pixels."""
    from worker.slide import open_slide

    with open_slide(source) as slide:
        height, width = slide.shape
        keep_h, keep_w = height - height % 8, width - width % 8
        return slide.read(0, row=0, col=0, height=keep_h, width=keep_w)


def _source_at(source: NDArray[np.uint8], downsample: int) -> NDArray[np.uint8]:
    """The source resampled to a level of the built slide (``downsample`` of the 40× level 0)."""
    height, width = source.shape[:2]
    size = (width * _UPSAMPLE // downsample, height * _UPSAMPLE // downsample)
    interpolation = cv2.INTER_CUBIC if downsample < _UPSAMPLE else cv2.INTER_AREA
    return np.ascontiguousarray(cv2.resize(source, size, interpolation=interpolation))


def level_tiles(
    source: NDArray[np.uint8],
    shape: tuple[int, int],
    tile: int,
    *,
    offset: tuple[int, int] = (0, 0),
) -> Iterator[NDArray[np.uint8]]:
    """The ``tile``×``tile`` tiles, row-major, of a ``shape`` (height, width) image mirrored
    from ``source`` starting at its pixel ``offset`` (row, col); edge tiles are padded with
    white, as TIFF tiles are always whole."""
    height, width = shape
    period_h, period_w = source.shape[:2]
    dy, dx = offset
    for top in range(0, height, tile):
        rows = mirror_indices(top + dy, min(top + tile, height) + dy, period_h)
        for left in range(0, width, tile):
            cols = mirror_indices(left + dx, min(left + tile, width) + dx, period_w)
            out = np.full((tile, tile, 3), 255, dtype=np.uint8)
            out[: rows.size, : cols.size] = source[rows[:, None], cols[None, :]]
            yield out


def build_slide(
    out: Path,
    *,
    size: int = 20_000,
    tile: int = 512,
    compression: str = "jpeg",
    quality: int = 90,
    source: Path = SOURCE,
) -> Path:
    """Write the pyramidal 40× TIFF.

    Parameters
    ----------
    out : Path
        File to write (its folder is created).
    size : int
        Level-0 width and height in pixels (>= 256).
    tile : int
        Tile side in pixels, a multiple of 16.
    compression : {"jpeg", "deflate"}
        Tile compression.
    quality : int
        JPEG quality (1-100; ignored for deflate).
    source : Path
        The 20× slide whose tissue is used.

    Returns
    -------
    Path
        ``out``.
    """
    if size < 256:
        raise ValueError(f"size must be >= 256, got {size}")
    if tile < 16 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression not in ("jpeg", "deflate"):
        raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    base = _read_source(source)
    out.parent.mkdir(parents=True, exist_ok=True)
    codec_args = {"level": quality} if compression == "jpeg" else {"level": 6}
    with tifffile.TiffWriter(out, bigtiff=True) as writer:
        for level, downsample in enumerate(DOWNSAMPLES):
            shape = (max(1, size // downsample), max(1, size // downsample))
            scaled = _source_at(base, downsample)
            # Start at the source's centre (tissue), so even a small slide holds some; the
            # offset is a whole pixel on every level.
            offset = tuple(
                n * _UPSAMPLE // DOWNSAMPLES[-1] // 2 * DOWNSAMPLES[-1] // downsample
                for n in base.shape[:2]
            )
            writer.write(
                level_tiles(scaled, shape, tile, offset=(offset[0], offset[1])),
                shape=(*shape, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression=compression,
                compressionargs=codec_args,
                resolution=(_PX_PER_CM / downsample, _PX_PER_CM / downsample),
                resolutionunit="CENTIMETER",
                subfiletype=0 if level == 0 else 1,
                metadata=None,
                software="HoVerServe bench/make_big_slide.py",
            )
            del scaled
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=20_000, help="level-0 side in px (default 20000)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--compression", choices=("jpeg", "deflate"), default="jpeg")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality")
    parser.add_argument("--source", type=Path, default=SOURCE, help="20× source slide")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        path = build_slide(args.out, size=args.size, tile=args.tile, compression=args.compression,
                           quality=args.quality, source=args.source)
    except (ValueError, OSError) as exc:
        print(f"make_big_slide: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - start
    print(f"{path}: {args.size}×{args.size} px at {MPP} µm/px, levels /"
          + " /".join(str(d) for d in DOWNSAMPLES)
          + f", {path.stat().st_size / 2**20:.0f} MB in {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
