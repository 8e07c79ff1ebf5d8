"""Region plan: cores partition the analysed area; maps are tile-aligned and cover the halo."""

from __future__ import annotations

import numpy as np
import pytest

from worker.plan import Box, plan_regions, tile_boxes


@pytest.mark.parametrize("area", [Box(0, 0, 1000, 1300), Box(37, 411, 999, 2050), Box(5, 5, 6, 6)])
@pytest.mark.parametrize("region_size", [164, 500, 2048])
def test_cores_partition_the_area(area: Box, region_size: int) -> None:
    regions = plan_regions(area, tile=164, region_size=region_size, halo=40)
    cover = np.zeros((area.row1, area.col1), np.int32)
    for region in regions:
        c = region.core
        cover[c.row0 : c.row1, c.col0 : c.col1] += 1
    assert (cover[area.row0 :, area.col0 :] == 1).all()
    assert cover.sum() == area.area


def test_maps_are_tile_aligned_and_cover_core_plus_halo() -> None:
    for region in plan_regions(Box(0, 0, 900, 900), tile=100, region_size=300, halo=30):
        m, c = region.maps, region.core
        assert all(v % 100 == 0 for v in (m.row0, m.col0, m.row1, m.col1))
        assert m.row0 <= c.row0 - 30 and m.col0 <= c.col0 - 30
        assert m.row1 >= c.row1 + 30 and m.col1 >= c.col1 + 30
        assert len(tile_boxes(m, tile=100)) == (m.height // 100) * (m.width // 100)


def test_region_size_rounds_to_whole_tiles() -> None:
    regions = plan_regions(Box(0, 0, 1000, 1000), tile=164, region_size=500, halo=0)
    assert {r.core.height for r in regions} - {1000 - 984} == {492}


def test_keep_predicate_skips_regions_without_tissue() -> None:
    keep = lambda core: core.col0 < 300  # noqa: E731 - a one-line predicate reads best inline
    regions = plan_regions(Box(0, 0, 600, 900), tile=100, region_size=300, halo=0, keep=keep)
    assert {r.core.col0 for r in regions} == {0}
    assert [r.index for r in regions] == list(range(len(regions)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"tile": 0}, "tile"), ({"region_size": 0}, "region_size"), ({"halo": -1}, "halo")],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    args = {"tile": 100, "region_size": 300, "halo": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        plan_regions(Box(0, 0, 10, 10), **args)


def test_tile_boxes_refuses_unaligned_maps() -> None:
    with pytest.raises(ValueError, match="aligned"):
        tile_boxes(Box(1, 0, 100, 100), tile=50)
