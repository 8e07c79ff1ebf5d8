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

import pytest
import shapely

from models.zoo import resolve_model
from tests.worker._seams import assert_same_nuclei, overlapping_pairs, region_size_runs

MODEL = "hoverserve-panoptic"
SIZES = (256, 512, 768)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[shapely.Polygon]]:
    return region_size_runs(resolve_model(MODEL), SIZES, tmp_path_factory.mktemp("seams-panoptic"))


@pytest.mark.slow
@pytest.mark.parametrize(("a", "b"), [(256, 512), (256, 768), (512, 768)])
def test_two_region_sizes_report_the_same_nuclei(runs: dict[int, list[shapely.Polygon]],
                                                 a: int, b: int) -> None:
    assert len(runs[a]) > 2000
    assert_same_nuclei(runs[a], runs[b], f"{a} vs {b}")


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_no_two_reported_nuclei_overlap(runs: dict[int, list[shapely.Polygon]], size: int) -> None:
    assert overlapping_pairs(runs[size]) == 0
