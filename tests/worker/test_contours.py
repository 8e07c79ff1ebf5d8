"""Pixel-edge outlines: the boundary of a mask's pixel squares, turning corners only.

The batched tracer (every nucleus of a label image at once) must give exactly the rings of the
per-crop tracer it replaced, kept in ``tests/worker/_contours_reference.py``.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import shapely
from numpy.typing import NDArray
from scipy import ndimage

from tests.worker._contours_reference import reference_ring
from worker.contours import PINCH_CUT, Rings, pixel_edge_ring, pixel_edge_rings, ring_area


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


# --------------------------------------------------------------------------- all nuclei at once


def _rings_of(labels: NDArray[np.integer]) -> tuple[list[tuple[slice, slice]], Rings]:
    """Every label's box and the batched rings of a label image (labels 1..n, all present)."""
    boxes = ndimage.find_objects(labels)
    flat = np.flatnonzero(labels)
    owner = labels.ravel()[flat].astype(np.intp) - 1
    corner = np.array([(b[0].start, b[1].start) for b in boxes])
    shape = np.array([(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in boxes])
    rows, cols = np.divmod(flat, labels.shape[1])
    rings = pixel_edge_rings(rows - corner[owner, 0], cols - corner[owner, 1], owner, shape)
    return boxes, rings


def _assert_rings_are_the_per_crop_rings(labels: NDArray[np.integer]) -> int:
    boxes, rings = _rings_of(labels)
    assert len(rings) == len(boxes)
    for k, box in enumerate(boxes):
        expected = reference_ring(labels[box] == k + 1)
        got = rings[k]
        assert got.dtype == expected.dtype == np.float32
        # Vertex for vertex: same start, same direction, same chamfers.
        np.testing.assert_array_equal(got, expected, err_msg=f"label {k + 1}")
    return len(boxes)


def _random_labels(rng: np.random.Generator, size: int, count: int) -> NDArray[np.int32]:
    """``count`` labels painted over each other as random speckles of random density: pinches,
    holes, 1-px arms, pieces touching at a corner, several pieces (often of equal size)."""
    labels = np.zeros((size, size), np.int32)
    for label in range(1, count + 1):
        h, w = rng.integers(1, 16, 2)
        y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
        speckle = rng.random((h, w)) < rng.uniform(0.15, 0.95)
        if not speckle.any():
            speckle[rng.integers(h), rng.integers(w)] = True
        labels[y:y + h, x:x + w][speckle] = label
    # Labels painted over completely vanish: renumber the survivors 1..n.
    present = np.unique(labels[labels > 0])
    lut = np.zeros(count + 1, np.int32)
    lut[present] = np.arange(1, present.size + 1)
    return lut[labels]


def test_batched_rings_are_the_per_crop_rings_on_thousands_of_random_masks() -> None:
    rng = np.random.default_rng(15)
    masks = sum(_assert_rings_are_the_per_crop_rings(_random_labels(rng, 48, 12))
                for _ in range(250))
    assert masks > 2000


def test_batched_rings_split_into_several_images_are_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import worker.contours

    rng = np.random.default_rng(16)
    labels = [_random_labels(rng, 64, 30) for _ in range(20)]
    monkeypatch.setattr(worker.contours, "ATLAS_CELLS", 600)  # a few grids per image
    assert sum(_assert_rings_are_the_per_crop_rings(lab) for lab in labels) > 400


def test_batched_rings_of_hand_made_shapes() -> None:
    labels = np.zeros((24, 40), np.int32)
    labels[1:3, 1:3] = labels[3:5, 3:5] = 1  # two blocks touching at a corner
    labels[1:8, 8:15] = 2
    labels[4, 11] = 0  # a hole
    labels[1:8, 17] = 3
    labels[7, 17:23] = 3  # 1-px arms
    labels[10, 1] = labels[10, 3] = 4  # two equal pieces: the first found is kept
    labels[12:17, 8:13] = 5
    labels[13:16, 9:12] = 0
    labels[14, 10] = 5  # a piece inside its own hole
    labels[12, 20] = labels[13, 21] = labels[12, 22] = labels[13, 23] = 6  # a zigzag of pinches
    labels[18:20, 30:39] = 7
    labels[19, 30:39:2] = 0  # a comb
    assert _assert_rings_are_the_per_crop_rings(labels) == 7
    rings = _rings_of(labels)[1]
    assert shapely.Polygon(rings[0]).area == pytest.approx(8 + PINCH_CUT**2)
    assert shapely.Polygon(rings[5]).area == pytest.approx(4 + 3 * PINCH_CUT**2)


def test_no_masks_give_no_rings() -> None:
    empty = np.zeros(0, np.intp)
    rings = pixel_edge_rings(empty, empty, empty, np.zeros((0, 2), np.intp))
    assert len(rings) == 0 and rings.vertices.shape == (0, 2)


def test_one_mask_ring_is_the_reference_ring_on_random_masks() -> None:
    rng = np.random.default_rng(17)
    for _ in range(1000):
        h, w = rng.integers(1, 16, 2)
        mask = rng.random((h, w)) < rng.uniform(0.2, 0.95)
        if mask.any():
            np.testing.assert_array_equal(pixel_edge_ring(mask), reference_ring(mask))
