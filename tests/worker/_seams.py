"""What the seam tests of real models compare: reported nuclei as polygons, matched by IoU."""

from __future__ import annotations

import numpy as np
import shapely

from worker.nuclei import NucleusTable

IDENTICAL_IOU = 0.95
"""Two reports of a nucleus are the same nucleus above this polygon IoU."""


def polygons(table: NucleusTable) -> list[shapely.Polygon]:
    return [shapely.Polygon(table.polygon(i)) for i in range(len(table))]


def best_iou(polys: list[shapely.Polygon], others: list[shapely.Polygon]) -> np.ndarray:
    """For each polygon, its highest IoU with any of ``others``."""
    tree = shapely.STRtree(others)
    best = np.zeros(len(polys))
    for i, poly in enumerate(polys):
        for j in tree.query(poly, predicate="intersects"):
            inter = poly.intersection(others[j]).area
            best[i] = max(best[i], inter / (poly.area + others[j].area - inter))
    return best


def overlapping_pairs(polys: list[shapely.Polygon]) -> int:
    """Pairs of nuclei sharing area (touching along an edge does not count)."""
    tree = shapely.STRtree(polys)
    left, right = tree.query(polys, predicate="intersects")
    return sum(1 for i, j in zip(left, right, strict=True)
               if i < j and polys[i].intersection(polys[j]).area > 1e-6)
