"""Merging per-region nuclei into one slide-wide set, without duplicates or gaps.

Each region keeps the nuclei whose centroid lies in its core. Network maps are identical where
regions overlap (global tile grid), but post-processing normalises per region, so a nucleus right on
a seam can come out with its centroid a fraction of a pixel apart in the two regions — inside both
cores (a duplicate) or inside neither (a gap). Regions therefore also keep nuclei whose centroid lies
within a narrow band *outside* their core, and :func:`resolve_seams` settles every nucleus near a seam
against the overlapping ones from other regions: the one inside its own core wins. Only nuclei in
the seam bands are compared, so the cost grows with the seam length, not the slide.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import shapely
from numpy.typing import NDArray

from worker.nuclei import Nucleus, NucleusTable
from worker.plan import Box, Region
from worker.read import ModelGrid

__all__ = ["DETECTOR_SEAM_BAND", "DUPLICATE_IOU", "SEAM_BAND", "region_table", "reported", "resolve_seams"]

SEAM_BAND = 3.0
"""Width, model pixels, of the band outside a core whose nuclei a region also reports."""

DETECTOR_SEAM_BAND = 24.0
"""The band (model pixels) in which :func:`resolve_seams` looks for a whole-box family's seam
duplicates: nuclei within twice this of a core edge, i.e. up to a large nucleus away."""

DUPLICATE_IOU = 0.2
"""Two nuclei from different regions overlapping more than this are the same nucleus."""


def _model_centroids(table: NucleusTable, grid: ModelGrid) -> NDArray[np.float64]:
    """(x, y) centroids back on the model grid (pixel-index convention)."""
    return table.centroid / grid.level0_per_model - 0.5


def reported(
    nuclei: Sequence[Nucleus], region: Region, *, area: Box, band: float = SEAM_BAND,
    upsample: int = 1,
) -> NDArray[np.bool_]:
    """Which of a region's nuclei :func:`region_table` keeps (same arguments)."""
    if not nuclei:
        return np.zeros(0, bool)
    f = upsample
    cx = (np.array([n.centroid[0] for n in nuclei]) + 0.5) / f - 0.5 + region.maps.col0
    cy = (np.array([n.centroid[1] for n in nuclei]) + 0.5) / f - 0.5 + region.maps.row0
    core = region.core
    return np.asarray(
        (cy >= core.row0 - band) & (cy < core.row1 + band)
        & (cx >= core.col0 - band) & (cx < core.col1 + band)
        & area.contains_points(cy, cx), dtype=bool,
    )


def region_table(
    nuclei: Sequence[Nucleus],
    region: Region,
    grid: ModelGrid,
    *,
    area: Box,
    band: float = SEAM_BAND,
    upsample: int = 1,
) -> NucleusTable:
    """Nuclei of one region's maps that the region reports, in level-0 pixels.

    Kept: centroid inside ``core`` grown by ``band``, and inside the analysed ``area``. With
    ``upsample`` > 1 the nuclei come from the region's maps upsampled by that factor (their pixel
    ``u`` sits at model position ``(u + 0.5) / upsample - 0.5``).
    """
    if not nuclei:
        return NucleusTable()
    f = upsample
    origin_x, origin_y = region.maps.col0, region.maps.row0
    keep = reported(nuclei, region, area=area, band=band, upsample=upsample)
    chosen = [n for n, k in zip(nuclei, keep, strict=True) if k]
    # The fine grid is a model grid of its own: f times the pixels, origin f times further.
    return NucleusTable.from_nuclei(
        chosen,
        scale=grid.level0_per_model / f,
        offset=(float(origin_x * f), float(origin_y * f)),
        mpp=grid.mpp / f,
        region=region.index,
    )


def _near_seam(table: NucleusTable, regions: Sequence[Region], grid: ModelGrid,
               band: float) -> tuple[NDArray[np.bool_], NDArray[np.bool_]]:
    """Which nuclei lie within ``2·band`` of their core's edge, and which lie inside their core."""
    cores = np.array([(r.core.row0, r.core.col0, r.core.row1, r.core.col1) for r in regions],
                     dtype=np.float64)
    pos = {r.index: i for i, r in enumerate(regions)}
    idx = np.array([pos[int(k)] for k in table.region], dtype=np.int64)
    c = cores[idx]
    xy = _model_centroids(table, grid)
    x, y = xy[:, 0], xy[:, 1]
    inside = (y >= c[:, 0]) & (y < c[:, 2]) & (x >= c[:, 1]) & (x < c[:, 3])
    edge = np.minimum.reduce([np.abs(y - c[:, 0]), np.abs(y - c[:, 2]),
                              np.abs(x - c[:, 1]), np.abs(x - c[:, 3])])
    return (~inside) | (edge < 2 * band), inside


def _polygon(vertices: NDArray[np.float32]) -> shapely.Geometry:
    if len(vertices) >= 3:
        return shapely.Polygon(np.asarray(vertices, np.float64))
    # A nucleus of one or two boundary pixels: a small disc stands in for its outline.
    return shapely.Point(np.asarray(vertices, np.float64).mean(axis=0)).buffer(0.5)


def _with_partners(table: NucleusTable, near: NDArray[np.intp]) -> NDArray[np.intp]:
    """``near`` plus every nucleus of another region whose bounding box meets one of theirs.

    A nucleus seen by two regions can be cut differently by each: the piece one region keeps may
    have its centroid well inside that region's core, far from the seam, yet overlap the other
    region's nucleus there. Comparing by box contact finds it whatever its centroid.
    """
    if len(near) == 0:
        return near
    boxes = shapely.box(*table.bbox.T.astype(np.float64))
    which, partner = shapely.STRtree(boxes).query(boxes[near], predicate="intersects")
    other = table.region[partner] != table.region[near[which]]
    return np.union1d(near, partner[other])


def resolve_seams(
    table: NucleusTable,
    regions: Sequence[Region],
    grid: ModelGrid,
    *,
    band: float = SEAM_BAND,
    iou: float = DUPLICATE_IOU,
) -> NucleusTable:
    """Drop seam duplicates: of two overlapping nuclei from different regions keep one.

    Preference: the nucleus whose centroid lies inside its own region's core; then the higher
    region index is dropped (a deterministic tie-break).
    """
    if len(table) == 0:
        return table
    near, inside = _near_seam(table, regions, grid, band)
    cand = _with_partners(table, np.flatnonzero(near))
    if len(cand) < 2:
        return table
    shapes = [_polygon(table.polygon(i)) for i in cand.tolist()]
    polys = shapely.make_valid(np.array(shapes, dtype=np.object_))
    tree = shapely.STRtree(polys)
    left, right = tree.query(polys, predicate="intersects")
    pairs = left < right
    left, right = left[pairs], right[pairs]
    drop = np.zeros(len(table), bool)
    for a, b in zip(left, right, strict=True):
        ia, ib = cand[a], cand[b]
        if table.region[ia] == table.region[ib] or drop[ia] or drop[ib]:
            continue
        inter = shapely.area(shapely.intersection(polys[a], polys[b]))
        union = shapely.area(polys[a]) + shapely.area(polys[b]) - inter
        if union <= 0 or inter / union <= iou:
            continue
        if inside[ia] != inside[ib]:
            loser = ib if inside[ia] else ia
        else:
            loser = ia if table.region[ia] > table.region[ib] else ib
        drop[loser] = True
    if not drop.any():
        return table
    return table.take(~drop)
