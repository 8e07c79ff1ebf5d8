"""Seams with the shipped default model on a real slide.

The oracle tests (test_seams.py) prove the plan and merge exact on known nuclei; these check that
the real network, whose predictions near a region border depend on context, still reports the
same nuclei whatever the region size, and never two overlapping nuclei.
"""

from __future__ import annotations

from pathlib import Path

import fsspec
import numpy as np
import pytest
import shapely

from models.zoo import default_model
from worker.nuclei import NucleusTable
from worker.pipeline import InferenceOptions, run_slide

SLIDE = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
# CMU-1-Small-Region is 2220 x 2967 px at 0.499 µm/px, so 512-px regions put ~30 seams through it.
REGION_SIZES = (512, 1024)


def _polygons(table: NucleusTable) -> list[shapely.Polygon]:
    return [shapely.Polygon(table.polygon(i)).buffer(0) for i in range(len(table))]


def _iou(a: shapely.Polygon, b: shapely.Polygon) -> float:
    inter = a.intersection(b).area
    return inter / (a.area + b.area - inter)


def _best_iou(polys: list[shapely.Polygon], others: list[shapely.Polygon]) -> np.ndarray:
    """For each polygon of ``polys``, its highest IoU with any of ``others``."""
    tree = shapely.STRtree(others)
    best = np.zeros(len(polys))
    for i, poly in enumerate(polys):
        for j in tree.query(poly, predicate="intersects"):
            best[i] = max(best[i], _iou(poly, others[j]))
    return best


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, NucleusTable]:
    model = default_model()
    assert model is not None, "the default model must ship in models/zoo"
    root = tmp_path_factory.mktemp("real-seams")
    tables = {}
    for size in REGION_SIZES:
        options = InferenceOptions(model=model, region_size=size, workers=0, tissue="auto")
        result = run_slide(SLIDE, fs=fsspec.filesystem("file"), root=str(root / str(size)), options=options)
        tables[size] = result.table
    return tables


def test_many_nuclei_are_found(runs: dict[int, NucleusTable]) -> None:
    # CMU-1-Small-Region holds a few thousand nuclei; a model that finds few would make the
    # agreement below meaningless.
    assert all(len(table) > 1500 for table in runs.values())


def test_two_region_sizes_report_the_same_nuclei(runs: dict[int, NucleusTable]) -> None:
    small, large = (_polygons(runs[size]) for size in REGION_SIZES)
    matched_small = (_best_iou(small, large) >= 0.5).mean()
    matched_large = (_best_iou(large, small) >= 0.5).mean()
    assert matched_small >= 0.98, f"{1 - matched_small:.2%} of the 512-px run's nuclei unmatched"
    assert matched_large >= 0.98, f"{1 - matched_large:.2%} of the 1024-px run's nuclei unmatched"


@pytest.mark.parametrize("size", REGION_SIZES)
def test_no_two_reported_nuclei_overlap(runs: dict[int, NucleusTable], size: int) -> None:
    polys = _polygons(runs[size])
    tree = shapely.STRtree(polys)
    overlapping = []
    for i, j in zip(*tree.query(polys, predicate="intersects"), strict=True):
        if i < j and _iou(polys[i], polys[j]) > 0.2:
            overlapping.append((int(i), int(j)))
    assert not overlapping, f"{len(overlapping)} pairs overlap with IoU > 0.2, e.g. {overlapping[:3]}"
