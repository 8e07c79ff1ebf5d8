"""Merge: a region reports the nuclei centred in its core; seam duplicates are settled once."""

from __future__ import annotations

import numpy as np

from worker.merge import region_table, resolve_seams
from worker.nuclei import Nucleus, NucleusTable
from worker.plan import Box, Region
from worker.read import ModelGrid

GRID = ModelGrid(level=0, scale=1.0, level0_per_model=2.0, mpp=0.5, shape=(400, 400))


def _square(cx: float, cy: float, half: float = 4.0, label: int = 1) -> Nucleus:
    contour = np.array([[cx - half, cy - half], [cx + half, cy - half], [cx + half, cy + half],
                        [cx - half, cy + half]], np.float32)
    box = (int(cx - half), int(cy - half), int(cx + half) + 1, int(cy + half) + 1)
    return Nucleus(label=label, centroid=(cx, cy), bbox=box, area=int((2 * half + 1) ** 2),
                   contour=contour, type=1, type_prob=0.9, np_prob=0.95, perimeter=8 * half)


LEFT = Region(0, core=Box(0, 0, 200, 100), maps=Box(-50, -50, 250, 150))
RIGHT = Region(1, core=Box(0, 100, 200, 200), maps=Box(-50, 50, 250, 250))
AREA = Box(0, 0, 200, 200)


def test_region_reports_nuclei_centred_in_its_core_and_maps_to_level0() -> None:
    # maps-local centroids: (60, 60) -> global (10, 10): inside; (170, 60) -> global (120, 10): out
    table = region_table([_square(60, 60), _square(170, 60)], LEFT, GRID, area=AREA)
    assert len(table) == 1
    # level0 = (model + 0.5) * 2
    np.testing.assert_allclose(table.centroid[0], [21.0, 21.0])
    np.testing.assert_allclose(table.area_um2, [81 * 0.25])
    assert table.region.tolist() == [0]


def test_nuclei_from_upsampled_maps_land_where_the_model_grid_puts_them() -> None:
    # Model pixel p is fine pixel 2p + 0.5 on maps upsampled twice; the region's origin doubles.
    coarse = region_table([_square(60, 60), _square(149, 60)], LEFT, GRID, area=AREA)
    fine = region_table([_square(120.5, 120.5, half=8.5), _square(298.5, 120.5, half=8.5)], LEFT, GRID,
                        area=AREA, upsample=2)
    assert len(fine) == len(coarse) == 2
    np.testing.assert_allclose(fine.centroid, coarse.centroid)
    np.testing.assert_allclose(fine.bbox, coarse.bbox, atol=1.0)
    np.testing.assert_allclose(fine.vertices, coarse.vertices, atol=1.0)
    # Areas in µm² whatever the grid: 18² fine pixels of 0.25 µm.
    np.testing.assert_allclose(fine.area_um2, [18 * 18 * 0.25 * 0.25] * 2)
    # A centroid just past the band is dropped on either grid.
    assert len(region_table([_square(306.5, 120.5)], LEFT, GRID, area=AREA, upsample=2)) == 0


def test_region_keeps_a_narrow_band_beyond_its_core_but_never_beyond_the_area() -> None:
    near = _square(151.5, 60)   # global x = 101.5: 1.5 px into the right core
    outside = _square(40, 40)   # global (-10, -10): outside the analysed area
    table = region_table([near, outside], LEFT, GRID, area=AREA)
    assert len(table) == 1


def _both_regions(x_left: float, x_right: float) -> NucleusTable:
    # The same nucleus as seen by two regions, centroids slightly apart across the seam at x=100.
    left = region_table([_square(x_left + 50, 60)], LEFT, GRID, area=AREA)
    right = region_table([_square(x_right - 50, 60)], RIGHT, GRID, area=AREA)
    return NucleusTable.concat([left, right])


def test_duplicate_on_a_seam_is_reported_once_by_the_region_that_owns_its_centre() -> None:
    # Right reports it through its band (99.8 < 100); left owns it (99.6 is in its core).
    merged = resolve_seams(_both_regions(99.6, 99.8), [LEFT, RIGHT], GRID)
    assert merged.region.tolist() == [0]
    merged = resolve_seams(_both_regions(100.3, 100.4), [LEFT, RIGHT], GRID)
    assert merged.region.tolist() == [1]


def test_duplicate_centred_in_both_cores_is_reported_once() -> None:
    merged = resolve_seams(_both_regions(99.6, 100.4), [LEFT, RIGHT], GRID)
    assert len(merged) == 1


def test_nucleus_whose_centre_falls_outside_both_cores_is_not_lost() -> None:
    # Left sees it at 100.6 (right core), right sees it at 99.4 (left core): neither owns it
    # strictly, both report it through the band, and exactly one survives.
    merged = resolve_seams(_both_regions(100.6, 99.4), [LEFT, RIGHT], GRID)
    assert len(merged) == 1


def test_a_piece_centred_deep_in_the_other_core_still_meets_its_duplicate() -> None:
    # Left reports a large nucleus through its band (global x 101, spanning 89..113); right cut the
    # same nucleus smaller, centred at 108: 8 px inside its core, beyond the seam band, yet
    # overlapping left's (IoU 0.28). Right owns it (its centre is in its core); left's goes.
    left = region_table([_square(151, 60, half=12)], LEFT, GRID, area=AREA)
    right = region_table([_square(58, 60, half=7)], RIGHT, GRID, area=AREA)
    merged = resolve_seams(NucleusTable.concat([left, right]), [LEFT, RIGHT], GRID)
    assert merged.region.tolist() == [1]


def test_distinct_neighbours_across_a_seam_are_both_kept() -> None:
    left = region_table([_square(145, 60)], LEFT, GRID, area=AREA)    # global x 95
    right = region_table([_square(56, 60)], RIGHT, GRID, area=AREA)   # global x 106
    merged = resolve_seams(NucleusTable.concat([left, right]), [LEFT, RIGHT], GRID)
    assert len(merged) == 2


def test_table_take_and_concat_keep_polygons_with_their_rows() -> None:
    a = region_table([_square(60, 60), _square(80, 90, half=2)], LEFT, GRID, area=AREA)
    b = region_table([_square(100, 60, half=3)], RIGHT, GRID, area=AREA)
    both = NucleusTable.concat([a, b])
    assert len(both) == 3 and both.offsets.tolist() == [0, 4, 8, 12]
    picked = both.take(np.array([False, True, True]))
    np.testing.assert_array_equal(picked.polygon(1), b.polygon(0))
    np.testing.assert_array_equal(picked.polygon(0), a.polygon(1))


def test_a_detectors_slight_overlap_across_a_seam_is_settled_too() -> None:
    # Two regions' detector inputs cut a nucleus pair differently: left's nucleus (global x 92..108)
    # overlaps right's (105..121) by IoU 0.1. A dense family keeps both (its maps agree where
    # regions overlap, so such a pair is two nuclei); a whole-box family (iou=0) keeps one.
    left = region_table([_square(150, 60, half=8)], LEFT, GRID, area=AREA)
    right = region_table([_square(63, 60, half=8)], RIGHT, GRID, area=AREA)
    both = NucleusTable.concat([left, right])
    assert len(resolve_seams(both, [LEFT, RIGHT], GRID)) == 2
    assert resolve_seams(both, [LEFT, RIGHT], GRID, iou=0.0).region.tolist() == [1]
