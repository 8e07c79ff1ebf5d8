"""bench/tiatoolbox_end_to_end.py's pure helpers: the region's area, the mask that tells
TIAToolbox's engine which region to run, nucleus matching between the two sides, the summary,
and the official-format random checkpoint (keys and shapes). TIAToolbox itself is never run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import _tiatoolbox_pipeline  # noqa: E402
import tiatoolbox_end_to_end as e2e  # noqa: E402


def test_roi_area_is_width_times_height_at_the_resolution() -> None:
    assert e2e.roi_area_mm2((0, 0, 1024, 1024), 0.25) == pytest.approx(0.065536)
    assert e2e.roi_area_mm2((7, 9, 4000, 2000), 0.5) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="mpp"):
        e2e.roi_area_mm2((0, 0, 1, 1), 0)


def test_roi_mask_is_one_exactly_over_the_region() -> None:
    mask = _tiatoolbox_pipeline.roi_mask(160, 320, (32, 48, 64, 16))
    assert mask.shape == (10, 20)
    assert mask.sum() == 4 * 1
    assert np.argwhere(mask).tolist() == [[3, 2], [3, 3], [3, 4], [3, 5]]
    with pytest.raises(ValueError, match="multiples"):
        _tiatoolbox_pipeline.roi_mask(160, 320, (30, 48, 64, 16))


def test_centroids_match_one_to_one_within_the_radius() -> None:
    a = np.array([[0.0, 0.0], [10.0, 10.0], [50.0, 50.0]])
    b = np.array([[0.5, 0.0], [0.0, 0.6], [10.0, 12.5], [80.0, 80.0]])
    assert e2e.match_centroids(a, b, 1.0) == 1  # two of b near a[0], only one may pair with it
    assert e2e.match_centroids(a, b, 3.0) == 2
    assert e2e.match_centroids(a, np.empty((0, 2)), 3.0) == 0
    with pytest.raises(ValueError, match="radius"):
        e2e.match_centroids(a, b, -1.0)


def _run(side: str, wall: float, patches: int, centroids: list[list[float]]) -> dict:
    return {"side": side, "returncode": 0, "wall_s": wall, "peak_rss_mb": 100.0 + wall,
            "patches": patches, "nuclei": len(centroids), "centroids": centroids, "seconds": {}}


def test_summary_takes_each_sides_fastest_run_and_their_ratio() -> None:
    roi = (0, 0, 1000, 1000)
    inside, outside = [[10.0, 10.0], [500.0, 500.0]], [[1100.0, 5.0]]
    runs = [_run("tiatoolbox", 30.0, 49, inside + outside), _run("hoverserve", 12.0, 64, inside),
            _run("tiatoolbox", 24.0, 49, inside + outside), _run("hoverserve", 16.0, 64, inside)]
    summary = e2e.summarise(runs, roi)
    tia, ours = summary["sides"]["tiatoolbox"], summary["sides"]["hoverserve"]
    assert (tia["wall_s_min"], ours["wall_s_min"]) == (24.0, 12.0)
    assert summary["ratio_wall"] == pytest.approx(2.0)
    assert summary["ratio_patches"] == pytest.approx(64 / 49)
    assert tia["peak_rss_mb_max"] == pytest.approx(130.0)  # the largest of its runs, not the fastest's
    assert (tia["nuclei"], tia["nuclei_in_roi"], summary["matched"]) == (3, 2, 2)
    assert ours["s_per_mm2"] == pytest.approx(12.0 / e2e.roi_area_mm2(roi))


@pytest.mark.slow
def test_random_checkpoint_has_the_official_keys_and_shapes() -> None:
    state = e2e.official_state_dict(3)
    shapes = json.loads(e2e.KEYS.read_text())
    assert list(state) == list(shapes)
    assert all(list(state[k].shape) == v for k, v in shapes.items())
