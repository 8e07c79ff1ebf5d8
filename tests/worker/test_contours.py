"""Pixel-edge outlines: the boundary of a mask's pixel squares, turning corners only."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely  # type: ignore[import-untyped]
from scipy import ndimage

from worker.contours import PINCH_CUT, pixel_edge_ring, ring_area


def test_one_pixel_is_its_square() -> None:
    mask = np.zeros((5, 5), np.uint8)
    mask[2, 3] = 1
    ring = pixel_edge_ring(mask)

    assert ring.dtype == np.float32
    # Pixel (row 2, col 3) is centred on (3, 2): its corners are half a pixel away.
    assert sorted(map(tuple, ring.tolist())) == [(2.5, 1.5), (2.5, 2.5), (3.5, 1.5), (3.5, 2.5)]


def test_straight_runs_keep_only_their_ends() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[3:15, 2:27] = 1
    ring = pixel_edge_ring(mask)

    assert len(ring) == 4 and ring_area(ring) == 12 * 25


def test_disc_area_is_its_pixel_count_and_fewer_vertices_than_pixels() -> None:
    mask = np.zeros((41, 41), np.uint8)
    cv2.circle(mask, (20, 20), 12, 1, -1)
    ring = pixel_edge_ring(mask)
    polygon = shapely.Polygon(ring)

    assert polygon.is_valid and polygon.area == mask.sum()
    # Every vertex is a turning corner of the staircase: no two consecutive collinear edges.
    steps = np.diff(np.vstack([ring, ring[:1]]), axis=0)
    following = np.roll(steps, -1, axis=0)
    assert not np.any((np.sign(steps) == np.sign(following)).all(axis=1))
    assert (np.count_nonzero(steps, axis=1) == 1).all()  # axis-parallel edges only


def test_one_pixel_wide_arms_are_not_retraced() -> None:
    mask = np.zeros((10, 10), np.uint8)
    mask[2:5, 5] = mask[4, 5:8] = 1
    polygon = shapely.Polygon(pixel_edge_ring(mask))

    assert polygon.is_valid and polygon.area == 5 and len(polygon.exterior.coords) == 7


def test_pixels_touching_at_a_corner_stay_one_valid_polygon() -> None:
    mask = np.zeros((6, 6), np.uint8)
    mask[1:3, 1:3] = 1
    mask[3:5, 3:5] = 1  # touches the first block at one corner only
    polygon = shapely.Polygon(pixel_edge_ring(mask))

    assert polygon.is_valid
    assert polygon.area == pytest.approx(8 + PINCH_CUT**2)  # both blocks, joined by a thin neck


def test_largest_piece_and_holes_filled() -> None:
    mask = np.zeros((20, 20), np.uint8)
    mask[2:12, 2:12] = 1
    mask[5, 5] = 0  # a hole
    mask[15:17, 15:17] = 1  # a smaller, separate piece
    polygon = shapely.Polygon(pixel_edge_ring(mask))

    assert polygon.area == 100


@pytest.mark.parametrize("seed", range(3))
def test_random_masks_give_valid_polygons_of_their_pixel_count(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(300):
        h, w = rng.integers(1, 14, 2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        if not mask.any():
            continue
        polygon = shapely.Polygon(pixel_edge_ring(mask))
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        filled = [int(ndimage.binary_fill_holes(labels == i).sum()) for i in range(1, n + 1)]
        assert polygon.is_valid
        # One piece's pixels (holes filled), up to the chamfers where it touches itself.
        assert min(abs(polygon.area - f) for f in filled) < 0.05


def test_bad_masks_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        pixel_edge_ring(np.ones((2, 2, 2), np.uint8))
    with pytest.raises(ValueError, match="no foreground"):
        pixel_edge_ring(np.zeros((3, 3), np.uint8))
