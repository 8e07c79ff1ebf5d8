"""Seams no region size can see, with the shipped panoptic model (``instance`` family) on a real
slide.

A detector runs each region whole, and what it finds depends on the whole input (larger inputs
lost nuclei: proposals per input are capped, and it was trained on 256-px patches), so the
family fixes every region core at 256 model px
(``worker.families.WHOLE_BOX_CORE``) on the slide-wide tile grid, and each input is that core
with its halo as context. The region size a job asks for then changes nothing, by construction;
these tests guard it on CMU-1-Small-Region at region sizes 256, 512 and 768 (≥ 99.5 % of nuclei
identical, IoU > 0.95, both ways) and check that the merge never reports two overlapping nuclei
across the 65 regions' seams. (Before the fixed core, the same model gave 78-87 % identical.)
"""

from __future__ import annotations

import fsspec
import pytest
import shapely

from models.zoo import resolve_model
from tests.service._server import CMU1
from tests.worker._seams import IDENTICAL_IOU, best_iou, overlapping_pairs, polygons
from worker.options import InferenceOptions
from worker.pipeline import run_slide

MODEL = "hoverserve-panoptic"
SIZES = (256, 512, 768)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[shapely.Polygon]]:
    work = tmp_path_factory.mktemp("seams-panoptic")
    found = {}
    for size in SIZES:
        options = InferenceOptions(model=resolve_model(MODEL), region_size=size, workers=0)
        result = run_slide(CMU1, fs=fsspec.filesystem("file"), root=str(work / str(size)),
                           options=options)
        assert len({r.core for r in result.plan.regions}) == len(result.plan.regions) > 1
        found[size] = polygons(result.table)
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("a", "b"), [(256, 512), (256, 768), (512, 768)])
def test_two_region_sizes_report_the_same_nuclei(runs: dict[int, list[shapely.Polygon]],
                                                 a: int, b: int) -> None:
    assert len(runs[a]) > 2000
    for one, other in ((runs[a], runs[b]), (runs[b], runs[a])):
        identical = best_iou(one, other) > IDENTICAL_IOU
        assert identical.mean() >= 0.995, f"{a} vs {b}: {identical.mean():.4f} identical"


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_no_two_reported_nuclei_overlap(runs: dict[int, list[shapely.Polygon]], size: int) -> None:
    assert overlapping_pairs(runs[size]) == 0
