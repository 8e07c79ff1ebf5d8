"""What the seam tests of real models compare: reported nuclei as polygons, matched by IoU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import fsspec
import numpy as np
import shapely

from tests.service._server import CMU1
from worker.nuclei import NucleusTable
from worker.options import InferenceOptions
from worker.pipeline import run_slide

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



def region_size_runs(model: Path, sizes: Sequence[int], work: Path) -> dict[int, list[shapely.Polygon]]:
    """CMU-1-Small-Region with ``model`` at each region size (several regions each): the
    reported nuclei as polygons."""
    found = {}
    for size in sizes:
        options = InferenceOptions(model=model, region_size=size, workers=0)
        result = run_slide(CMU1, fs=fsspec.filesystem("file"), root=str(work / str(size)),
                           options=options)
        assert len({r.core for r in result.plan.regions}) == len(result.plan.regions) > 1
        found[size] = polygons(result.table)
    return found


def assert_same_nuclei(one: list[shapely.Polygon], other: list[shapely.Polygon], label: str) -> None:
    """≥ 99.5 % of each run's nuclei have an identical one (IoU > 0.95) in the other."""
    for a, b in ((one, other), (other, one)):
        identical = best_iou(a, b) > IDENTICAL_IOU
        assert identical.mean() >= 0.995, f"{label}: {identical.mean():.4f} identical"
