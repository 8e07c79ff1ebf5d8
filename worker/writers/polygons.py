"""Polygons QuPath accepts: closed, valid, rounded to 0.01 px and inside the slide.

QuPath imports nothing from a file with one bad feature, so every ring is validated *after* its
coordinates are rounded to 0.01 px (rounding alone can create self-intersections), repaired when
invalid (the largest polygon of its valid form) and dropped when degenerate.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shapely
from numpy.typing import NDArray

from worker.nuclei import NucleusTable

__all__ = ["DECIMALS", "MIN_AREA_PX", "CleanPolygons", "clean_polygons", "clean_rings"]

logger = logging.getLogger(__name__)

MIN_AREA_PX = 0.01
"""Polygons smaller than this (level-0 px²) after rounding are degenerate and dropped."""

DECIMALS = 2
"""Coordinates are written rounded to 0.01 level-0 px (QuPath 0.6+ snaps to that grid anyway)."""


@dataclass(frozen=True, eq=False)
class CleanPolygons:
    """Polygons ready for QuPath: valid, closed, rounded to 0.01 px, inside the slide.

    Attributes
    ----------
    rows : (k,) int64 ndarray
        Rows of the nucleus table that are written, ascending.
    coords : (m, 2) float64 ndarray
        Closed rings (first vertex repeated last) as (x, y) level-0 pixels; ring ``i`` is
        ``coords[offsets[i]:offsets[i + 1]]``.
    offsets : (k + 1,) int64 ndarray
    repaired : (r,) int64 ndarray
        Rows whose polygon was invalid and was replaced by the largest polygon of its valid form.
    dropped : (d,) int64 ndarray
        Rows not written: fewer than 3 vertices, a non-finite vertex, no area inside the slide,
        or beyond repair.
    """

    rows: NDArray[np.int64]
    coords: NDArray[np.float64]
    offsets: NDArray[np.int64]
    repaired: NDArray[np.int64]
    dropped: NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"CleanPolygons(n={len(self)}, repaired={len(self.repaired)}, "
                f"dropped={len(self.dropped)})")

    def ring(self, i: int) -> NDArray[np.float64]:
        """Closed ring (x, y) of the ``i``-th kept polygon (table row ``rows[i]``)."""
        return self.coords[self.offsets[i] : self.offsets[i + 1]]

    @property
    def stats(self) -> dict[str, int]:
        return {"written": len(self), "repaired": len(self.repaired), "dropped": len(self.dropped)}


def _slide_size(slide_shape: Sequence[int]) -> tuple[float, float]:
    if len(slide_shape) < 2 or min(slide_shape[0], slide_shape[1]) <= 0:
        raise ValueError(f"slide_shape must be (height, width) > 0, got {tuple(slide_shape)}")
    return float(slide_shape[0]), float(slide_shape[1])


def _snap(xy: NDArray, width: float, height: float) -> NDArray[np.float64]:
    """Clip (x, y) into the slide and round to the 0.01 px grid (``+ 0.0`` turns -0.0 into 0.0)."""
    out = np.asarray(xy, dtype=np.float64).copy()
    np.clip(out[:, 0], 0.0, width, out=out[:, 0])
    np.clip(out[:, 1], 0.0, height, out=out[:, 1])
    return np.round(out, DECIMALS) + 0.0


def _largest_polygon(geometry: shapely.Geometry) -> shapely.Polygon | None:
    stack, polygons = [geometry], []
    while stack:
        g = stack.pop()
        if isinstance(g, shapely.Polygon):
            if not g.is_empty:
                polygons.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(g.geoms)
    return max(polygons, key=lambda p: p.area) if polygons else None


def _repair(polygon: shapely.Polygon, width: float, height: float,
            min_area: float) -> NDArray[np.float64] | None:
    """Closed, rounded ring of the largest part of ``polygon`` made valid, or None if none is.

    Only the exterior is kept: a nucleus is a filled shape, and the exterior ring of a valid
    polygon is itself a valid polygon. Rounding the new vertices (intersection points) can break
    validity again, so the second attempt snaps with GEOS' precision reducer first.
    """
    fixed = shapely.make_valid(polygon)
    for _ in range(2):
        part = _largest_polygon(fixed)
        if part is None:
            return None
        ring = _snap(np.asarray(part.exterior.coords), width, height)
        if len(ring) >= 4:
            candidate = shapely.Polygon(ring)
            if candidate.is_valid and candidate.area >= min_area:
                return ring
        fixed = shapely.make_valid(shapely.set_precision(part, 10.0**-DECIMALS))
    return None


def _splice(
    closed: NDArray[np.float64],
    offsets: NDArray[np.int64],
    good: NDArray[np.bool_],
    repaired: dict[int, NDArray[np.float64]],
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Rings kept (``good``) with the ``repaired`` ones put in their place, in ring order, using
    one slice per run of untouched rings rather than one array per ring.

    Returns the concatenated rings and the size of every ring (0 where dropped).
    """
    sizes = np.where(good, np.diff(offsets), 0)
    keep_vertex = np.repeat(good, np.diff(offsets))
    pieces, previous = [], 0
    for j in sorted(repaired):
        span = slice(offsets[previous], offsets[j])
        pieces += [closed[span][keep_vertex[span]], repaired[j]]
        sizes[j] = len(repaired[j])
        previous = j + 1
    span = slice(offsets[previous], offsets[-1])
    pieces.append(closed[span][keep_vertex[span]])
    return np.concatenate(pieces), sizes


def clean_polygons(
    table: NucleusTable,
    *,
    slide_shape: Sequence[int],
    min_area: float = MIN_AREA_PX,
) -> CleanPolygons:
    """Make every nucleus polygon importable by QuPath, or drop it (see :func:`clean_rings`).

    Parameters
    ----------
    table : NucleusTable
        Nuclei in level-0 pixels.
    slide_shape : (int, int)
        Level-0 (height, width) of the slide.
    min_area : float
        Smallest area kept, level-0 px².

    Returns
    -------
    CleanPolygons
    """
    if not isinstance(table, NucleusTable):
        raise TypeError(f"table must be a NucleusTable, got {type(table).__name__}")
    return clean_rings(table.vertices, table.offsets, slide_shape=slide_shape, min_area=min_area)


def clean_rings(
    vertices: NDArray[np.floating],
    offsets: NDArray[np.integer],
    *,
    slide_shape: Sequence[int],
    min_area: float = MIN_AREA_PX,
) -> CleanPolygons:
    """Make every ring importable by QuPath, or drop it.

    Vertices are clipped to ``[0, width] × [0, height]`` and rounded to 0.01 px; the rings are
    then checked (vectorised) for validity and area, and invalid ones repaired one by one.

    Parameters
    ----------
    vertices : (m, 2) float ndarray
        (x, y) level-0 px; ring ``i`` is ``vertices[offsets[i]:offsets[i + 1]]``, not closed.
    offsets : (n + 1,) int ndarray
    slide_shape : (int, int)
        Level-0 (height, width) of the slide.
    min_area : float
        Smallest area kept, level-0 px².

    Returns
    -------
    CleanPolygons
        ``rows`` index the rings.
    """
    height, width = _slide_size(slide_shape)
    offsets = np.asarray(offsets, np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    vertex_row = np.repeat(np.arange(n), lengths)
    bad_vertices = np.bincount(vertex_row, weights=~np.isfinite(vertices).all(axis=1),
                               minlength=n)
    is_candidate = (lengths >= 3) & (bad_vertices == 0)
    candidates = np.flatnonzero(is_candidate)
    verts = _snap(np.asarray(vertices)[is_candidate[vertex_row]], width, height)
    ring_len = lengths[candidates]
    starts = np.concatenate([[0], np.cumsum(ring_len)]).astype(np.int64)
    # Close each ring by repeating its first vertex after its last.
    closed = np.insert(verts, starts[1:], verts[starts[:-1]], axis=0)
    closed_offsets = starts + np.arange(len(starts))
    ring_id = np.repeat(np.arange(len(candidates)), ring_len + 1)
    polygons = shapely.polygons(shapely.linearrings(closed, indices=ring_id))
    good = shapely.is_valid(polygons) & (shapely.area(polygons) >= min_area)

    repaired: dict[int, NDArray[np.float64]] = {}  # ring index -> its repaired ring
    dropped: list[int] = np.flatnonzero(~is_candidate).tolist()
    for j in np.flatnonzero(~good).tolist():
        # Valid but (near) zero area: nothing to repair, the nucleus is degenerate.
        ring = _repair(polygons[j], width, height, min_area) if not polygons[j].is_valid else None
        if ring is None:
            dropped.append(int(candidates[j]))
        else:
            repaired[j] = ring
    if not len(candidates):
        return CleanPolygons(rows=np.zeros(0, np.int64), coords=np.zeros((0, 2)),
                             offsets=np.zeros(1, np.int64), repaired=np.zeros(0, np.int64),
                             dropped=np.asarray(sorted(dropped), np.int64))
    coords, sizes = _splice(closed, closed_offsets, good, repaired)
    good[list(repaired)] = True
    kept = np.flatnonzero(good)
    if dropped:
        logger.info("GeoJSON: dropped %d degenerate nuclei polygons (rows %s%s)", len(dropped),
                    sorted(dropped)[:10], "..." if len(dropped) > 10 else "")
    if repaired:
        logger.info("GeoJSON: repaired %d invalid nuclei polygons", len(repaired))
    return CleanPolygons(
        rows=candidates[kept].astype(np.int64),
        coords=coords,
        offsets=np.concatenate([[0], np.cumsum(sizes[kept])]).astype(np.int64),
        repaired=candidates[sorted(repaired)].astype(np.int64),
        dropped=np.asarray(sorted(dropped), np.int64),
    )
