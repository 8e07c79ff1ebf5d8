"""Seams no region size can see, with the shipped default model on a real slide.

The oracle tests (test_seams.py) prove the plan and merge exact on known nuclei; these check that
the real network reports the same nuclei on CMU-1-Small-Region whatever the region size (512,
1024 and 2048 px: ≥ 99.5 % identical, IoU > 0.95, both ways) and never two overlapping nuclei.

Patches lie on one slide-wide grid (a pixel's prediction does not depend on its region) and the
default card fixes the edge-map normalisation (``edge_range``), so the watershed of a nucleus
depends on its neighbourhood alone, not on the extent of the region that holds it.
"""

from __future__ import annotations

import pytest
import shapely

from models.zoo import resolve_model
from tests.worker._seams import assert_same_nuclei, overlapping_pairs, region_size_runs

SIZES = (512, 1024, 2048)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[shapely.Polygon]]:
    return region_size_runs(resolve_model(None), SIZES, tmp_path_factory.mktemp("seams"))


@pytest.mark.slow
@pytest.mark.parametrize(("a", "b"), [(512, 1024), (512, 2048), (1024, 2048)])
def test_two_region_sizes_report_the_same_nuclei(runs: dict[int, list[shapely.Polygon]],
                                                 a: int, b: int) -> None:
    assert len(runs[a]) > 2000
    assert_same_nuclei(runs[a], runs[b], f"{a} vs {b}")


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_no_two_reported_nuclei_overlap(runs: dict[int, list[shapely.Polygon]], size: int) -> None:
    assert overlapping_pairs(runs[size]) == 0
