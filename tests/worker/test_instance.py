"""The instance (panoptic Mask R-CNN) family's post-processing: detections → label maps → nuclei.

Every expected label image is built by hand: a box's pixels are those whose centres lie in it,
its mask is sampled bilinearly at those centres, and overlaps go to the higher score.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from worker.instance import (
    DetectionMaps,
    InstanceSizes,
    instance_nuclei,
    instance_sizes,
    paste_detections,
)
from worker.postprocess import HoverInstances, measure_nuclei

M = 28
FULL = np.ones((M, M), np.float32)
LEFT = np.zeros((M, M), np.float32)
LEFT[:, : M // 2] = 1.0
TOP = LEFT.T.copy()
RIGHT = LEFT[:, ::-1].copy()


def paste(boxes, scores, *, masks=None, classes=None, height=10, width=12, **kwargs) -> DetectionMaps:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    k = len(boxes)
    scores = np.asarray(scores, np.float32).reshape(k)
    classes = np.ones(k, np.int64) if classes is None else np.asarray(classes, np.int64)
    if masks is None:
        masks = [FULL] * k
    masks = np.asarray(masks, np.float32).reshape(k, 1, *np.shape(masks)[-2:]) if k else (
        np.zeros((0, 1, M, M), np.float32))
    return paste_detections(boxes, scores, classes, masks, height=height, width=width, **kwargs)


def rect(shape, rows, cols, value=1) -> np.ndarray:
    """A hand-made map: ``value`` on rows × cols (inclusive ranges), 0 elsewhere."""
    out = np.zeros(shape, np.int32)
    out[rows[0]: rows[1] + 1, cols[0]: cols[1] + 1] = value
    return out


# --------------------------------------------------------------------------- pasting one box


def test_a_full_mask_fills_exactly_the_pixels_whose_centres_lie_in_the_box() -> None:
    maps = paste([2.0, 3.0, 6.0, 8.0], [0.9])
    np.testing.assert_array_equal(maps.instances, rect((10, 12), (3, 7), (2, 5)))
    assert maps.instances.dtype == np.int32 and maps.classes.dtype == np.uint8
    assert maps.scores.dtype == np.float32


def test_box_edges_are_half_open_at_pixel_centres() -> None:
    # x: centres 2.5, 3.5, 4.5 are in [2.4, 5.5), 5.5 is not; y: 4.5..6.5 are in [3.6, 7.5).
    maps = paste([2.4, 3.6, 5.5, 7.5], [0.9])
    np.testing.assert_array_equal(maps.instances, rect((10, 12), (4, 6), (2, 4)))


def test_a_left_half_mask_gives_exactly_the_left_half_columns() -> None:
    maps = paste([2.0, 3.0, 6.0, 8.0], [0.9], masks=[LEFT])
    np.testing.assert_array_equal(maps.instances, rect((10, 12), (3, 7), (2, 3)))


def test_a_top_half_mask_sampled_at_exactly_the_threshold_is_outside() -> None:
    # Row 5's centre maps to mask row (2.5 / 5) · 28 - 0.5 = 13.5: halfway between a 1 and a 0.
    maps = paste([2.0, 3.0, 6.0, 8.0], [0.9], masks=[TOP])
    np.testing.assert_array_equal(maps.instances, rect((10, 12), (3, 4), (2, 5)))


@pytest.mark.parametrize(("threshold", "cols"), [(0.5, (2, 3)), (0.8, (3, 3)), (0.2, (1, 3))])
def test_masks_are_sampled_bilinearly_with_half_pixel_alignment_clamped_at_the_edges(
        threshold: float, cols: tuple[int, int]) -> None:
    # A 2×2 mask 0 | 1 over a 4-pixel-wide box: centres map to -0.25 (clamped to 0), 0.25, 0.75
    # and 1.25 (clamped to 1), so the columns sample 0, 0.25, 0.75 and 1.
    ramp = np.array([[0.0, 1.0], [0.0, 1.0]], np.float32)
    maps = paste([0.0, 0.0, 4.0, 2.0], [0.9], masks=[ramp], height=3, width=5,
                 mask_threshold=threshold)
    np.testing.assert_array_equal(maps.instances, rect((3, 5), (0, 1), cols))


def test_any_mask_resolution_of_at_least_two_is_accepted() -> None:
    mask = np.zeros((7, 7), np.float32)
    mask[:, :3] = 1.0  # 3 of 7 bins: x < 3/7 · 7 = 3 within a 7-pixel box
    maps = paste([1.0, 1.0, 8.0, 4.0], [0.9], masks=[mask], height=5, width=10)
    np.testing.assert_array_equal(maps.instances, rect((5, 10), (1, 3), (1, 3)))


# --------------------------------------------------------------------------- overlaps


@pytest.mark.parametrize("reverse", [False, True])
def test_the_higher_score_keeps_the_overlap_whatever_the_input_order(reverse: bool) -> None:
    boxes, scores, classes = [[0, 0, 6, 6], [4, 0, 10, 6]], [0.9, 0.7], [2, 3]
    if reverse:
        boxes, scores, classes = boxes[::-1], scores[::-1], classes[::-1]
    maps = paste(boxes, scores, classes=classes, height=6, width=10)
    expected = rect((6, 10), (0, 5), (0, 5), 1) + rect((6, 10), (0, 5), (6, 9), 2)
    np.testing.assert_array_equal(maps.instances, expected)
    np.testing.assert_array_equal(maps.classes, np.where(expected == 1, 2, 3).astype(np.uint8))
    np.testing.assert_array_equal(maps.scores, np.where(expected == 1, np.float32(0.9),
                                                        np.float32(0.7)))


def test_a_lower_score_duplicate_is_dropped() -> None:
    maps = paste([[0.1, 0.0, 6.0, 6.2], [0.0, 0.0, 6.0, 6.0]], [0.8, 0.95], height=8, width=8)
    np.testing.assert_array_equal(maps.instances, rect((8, 8), (0, 5), (0, 5)))
    assert maps.scores.max() == np.float32(0.95)


@pytest.mark.parametrize(("min_unclaimed", "kept"), [(0.0, True), (0.5, True), (0.51, False),
                                                     (1.0, False)])
def test_a_detection_half_claimed_is_kept_unless_more_must_be_unclaimed(
        min_unclaimed: float, kept: bool) -> None:
    # The second box's 16 pixels: 8 already taken by the first.
    maps = paste([[0, 0, 4, 4], [2, 0, 6, 4]], [0.9, 0.8], height=4, width=6,
                 min_unclaimed=min_unclaimed)
    expected = rect((4, 6), (0, 3), (0, 3), 1)
    if kept:
        expected += rect((4, 6), (0, 3), (4, 5), 2)
    np.testing.assert_array_equal(maps.instances, expected)


def test_a_detection_inside_a_higher_one_is_dropped_even_with_no_unclaimed_floor() -> None:
    maps = paste([[0, 0, 6, 6], [1, 1, 4, 4]], [0.9, 0.8], height=6, width=6, min_unclaimed=0.0)
    np.testing.assert_array_equal(maps.instances, rect((6, 6), (0, 5), (0, 5)))


def test_a_detection_split_by_a_higher_one_keeps_its_larger_piece() -> None:
    # The bar takes columns 4..5; the band keeps columns 6..11 (18 px), not 0..3 (12 px).
    maps = paste([[4, 0, 6, 8], [0, 2, 12, 5]], [0.9, 0.8], height=8, width=12)
    expected = rect((8, 12), (0, 7), (4, 5), 1) + rect((8, 12), (2, 4), (6, 11), 2)
    np.testing.assert_array_equal(maps.instances, expected)


def test_equal_pieces_keep_the_first_in_raster_order() -> None:
    maps = paste([[4, 0, 6, 8], [0, 2, 10, 5]], [0.9, 0.8], height=8, width=10)
    expected = rect((8, 10), (0, 7), (4, 5), 1) + rect((8, 10), (2, 4), (0, 3), 2)
    np.testing.assert_array_equal(maps.instances, expected)


def test_pieces_touching_only_diagonally_are_separate() -> None:
    # Two 2×2 squares of one mask, meeting at a corner: 4-connectivity keeps only the first.
    mask = np.zeros((4, 4), np.float32)
    mask[:2, :2] = mask[2:, 2:] = 1.0
    maps = paste([0, 0, 4, 4], [0.9], masks=[mask], height=4, width=4)
    np.testing.assert_array_equal(maps.instances, rect((4, 4), (0, 1), (0, 1)))


@pytest.mark.parametrize(("min_size", "kept"), [(12, True), (13, False)])
def test_pieces_under_min_size_are_dropped(min_size: int, kept: bool) -> None:
    maps = paste([[0, 0, 3, 4], [5, 0, 10, 5]], [0.6, 0.9], height=6, width=10, min_size=min_size)
    expected = rect((6, 10), (0, 4), (5, 9), 1)
    if kept:
        expected += rect((6, 10), (0, 3), (0, 2), 2)
    np.testing.assert_array_equal(maps.instances, expected)


def test_ids_follow_descending_score_and_ties_keep_the_input_order() -> None:
    boxes = [[0, 0, 2, 2], [3, 0, 5, 2], [6, 0, 8, 2], [9, 0, 11, 2]]
    maps = paste(boxes, [0.6, 0.9, 0.7, 0.6], height=2, width=12)
    expected = np.zeros((2, 12), np.int32)
    for (x0, _, x1, _), label in zip(boxes, [3, 1, 2, 4], strict=True):
        expected[:, x0:x1] = label
    np.testing.assert_array_equal(maps.instances, expected)


@pytest.mark.parametrize(("score", "kept"), [(0.49, False), (0.5, True)])
def test_detections_below_the_score_threshold_are_ignored(score: float, kept: bool) -> None:
    maps = paste([2.0, 3.0, 6.0, 8.0], [score], score_threshold=0.5)
    assert bool(maps.instances.any()) is kept


def test_a_detection_below_the_score_threshold_claims_nothing() -> None:
    maps = paste([[0, 0, 4, 4], [0, 0, 6, 4]], [0.4, 0.9], height=4, width=6)
    np.testing.assert_array_equal(maps.instances, rect((4, 6), (0, 3), (0, 5)))


# --------------------------------------------------------------------------- offset, clipping


def test_the_offset_is_subtracted_from_the_boxes() -> None:
    maps = paste([10.0, 20.0, 14.0, 24.0], [0.9], height=8, width=8, offset=(8.0, 18.0))
    np.testing.assert_array_equal(maps.instances, rect((8, 8), (2, 5), (2, 5)))


@pytest.mark.parametrize(("box", "rows", "cols"), [
    ([-2.0, -1.0, 3.0, 2.0], (0, 1), (0, 2)),
    ([3.0, 3.0, 9.0, 9.0], (3, 4), (3, 4)),
    ([-10.0, -10.0, 50.0, 50.0], (0, 4), (0, 4)),
])
def test_boxes_partly_outside_are_clipped_to_the_map(box, rows, cols) -> None:
    maps = paste(box, [0.9], height=5, width=5)
    np.testing.assert_array_equal(maps.instances, rect((5, 5), rows, cols))


def test_clipping_does_not_rescale_the_mask() -> None:
    # The box spans x -4..4: its mask's left half lies outside the map, its right half on 0..3.
    assert not paste([-4.0, 0.0, 4.0, 2.0], [0.9], masks=[LEFT], height=2, width=6).instances.any()
    maps = paste([-4.0, 0.0, 4.0, 2.0], [0.9], masks=[RIGHT], height=2, width=6)
    np.testing.assert_array_equal(maps.instances, rect((2, 6), (0, 1), (0, 3)))


@pytest.mark.parametrize("box", [[6.0, 0.0, 9.0, 3.0], [0.0, -5.0, 3.0, -0.5], [0.2, 0.2, 0.4, 0.4]])
def test_boxes_without_a_pixel_centre_in_the_map_paste_nothing(box) -> None:
    assert not paste(box, [0.9], height=4, width=6).instances.any()


@pytest.mark.parametrize("bad", [[3.0, 0.0, 3.0, 4.0], [0.0, 4.0, 4.0, 1.0], [math.nan, 0.0, 4.0, 4.0],
                                 [0.0, 0.0, math.inf, 4.0]])
def test_degenerate_boxes_are_skipped(bad) -> None:
    maps = paste([bad, [0.0, 0.0, 2.0, 2.0]], [0.95, 0.9], height=4, width=4)
    np.testing.assert_array_equal(maps.instances, rect((4, 4), (0, 1), (0, 1)))


def test_no_detections_give_empty_maps() -> None:
    maps = paste(np.zeros((0, 4)), np.zeros(0), height=3, width=4)
    for arr in (maps.instances, maps.classes, maps.scores):
        assert arr.shape == (3, 4) and not arr.any()


def test_pasting_matches_a_pixel_by_pixel_reading_of_the_rule() -> None:
    rng = np.random.default_rng(5)
    height, width, k = 17, 19, 40
    x0 = rng.uniform(-3, width - 3, k)
    y0 = rng.uniform(-3, height - 3, k)
    boxes = np.stack([x0, y0, x0 + rng.uniform(1.5, 10, k), y0 + rng.uniform(1.5, 10, k)], 1)
    masks = rng.uniform(0, 1, (k, 5, 5)).astype(np.float32)
    for box, mask in zip(boxes, masks, strict=True):
        got = paste(box, [0.9], masks=[mask], height=height, width=width).instances > 0
        np.testing.assert_array_equal(got, _reference_mask(box.astype(np.float32), mask, height, width))


def _reference_mask(box, mask, height, width) -> np.ndarray:
    x0, y0, x1, y1 = (float(v) for v in box)
    m = mask.shape[0]
    mask = mask.astype(np.float64)
    out = np.zeros((height, width), bool)
    for v in range(height):
        for u in range(width):
            cx, cy = u + 0.5, v + 0.5
            if not (x0 <= cx < x1 and y0 <= cy < y1):
                continue
            gx = min(max((cx - x0) / (x1 - x0) * m - 0.5, 0.0), m - 1.0)
            gy = min(max((cy - y0) / (y1 - y0) * m - 0.5, 0.0), m - 1.0)
            i, j = min(int(gy), m - 2), min(int(gx), m - 2)
            fy, fx = gy - i, gx - j
            value = ((1 - fy) * ((1 - fx) * mask[i, j] + fx * mask[i, j + 1])
                     + fy * ((1 - fx) * mask[i + 1, j] + fx * mask[i + 1, j + 1]))
            out[v, u] = value > 0.5
    # what a single detection keeps: its largest 4-connected piece of the mask, holes filled
    from scipy import ndimage

    out = ndimage.binary_fill_holes(out)
    pieces, n = ndimage.label(out)
    if n > 1:
        sizes = np.bincount(pieces.ravel())[1:]
        out = pieces == 1 + int(np.argmax(sizes))
    return out


# --------------------------------------------------------------------------- bad input


GOOD = {"boxes": np.array([[0, 0, 4, 4]], np.float32), "scores": np.array([0.9], np.float32),
        "classes": np.array([1], np.int64), "masks": np.ones((1, 1, M, M), np.float32)}


@pytest.mark.parametrize(("change", "message"), [
    ({"boxes": np.zeros((1, 3), np.float32)}, "boxes"),
    ({"boxes": np.zeros((2, 4), np.float32)}, "scores"),
    ({"scores": np.array([0.9, 0.8], np.float32)}, "scores"),
    ({"scores": np.array([math.nan], np.float32)}, "scores"),
    ({"scores": np.array([1.5], np.float32)}, "scores"),
    ({"classes": np.array([1, 1], np.int64)}, "classes"),
    ({"classes": np.array([0], np.int64)}, "classes"),
    ({"classes": np.array([256], np.int64)}, "classes"),
    ({"classes": np.array([1.0], np.float32)}, "classes"),
    ({"masks": np.ones((1, M, M), np.float32)}, "masks"),
    ({"masks": np.ones((1, 1, 1, 1), np.float32)}, "masks"),
    ({"masks": np.ones((2, 1, M, M), np.float32)}, "masks"),
    ({"masks": np.full((1, 1, M, M), math.nan, np.float32)}, "masks"),
    ({"score_threshold": 0.0}, "score_threshold"),
    ({"score_threshold": 1.0}, "score_threshold"),
    ({"mask_threshold": 1.2}, "mask_threshold"),
    ({"mask_threshold": math.nan}, "mask_threshold"),
    ({"min_unclaimed": -0.1}, "min_unclaimed"),
    ({"min_unclaimed": 1.1}, "min_unclaimed"),
    ({"min_size": 0}, "min_size"),
    ({"height": 0}, "height"),
    ({"width": 2.5}, "width"),
    ({"offset": (1.0,)}, "offset"),
    ({"offset": (math.inf, 0.0)}, "offset"),
])
def test_bad_input_raises_a_value_error_naming_the_problem(change: dict, message: str) -> None:
    arguments = {**GOOD, "height": 8, "width": 8, **change}
    with pytest.raises(ValueError, match=message):
        paste_detections(arguments.pop("boxes"), arguments.pop("scores"), arguments.pop("classes"),
                         arguments.pop("masks"), **arguments)


def test_a_score_one_float32_ulp_above_one_is_a_certainty_not_an_error() -> None:
    # ONNX Runtime's vectorised sigmoid rounds to 1.0000001; a job must not fail on it
    above = np.nextafter(np.float32(1.0), np.float32(2.0))
    result = instance_nuclei(paste([[0, 0, 6, 6]], [above], height=8, width=8), mpp=0.25, typed=True)
    assert [nu.type_prob for nu in result.nuclei] == [1.0]


# --------------------------------------------------------------------------- nuclei


def two_nuclei() -> DetectionMaps:
    return paste([[0, 0, 6, 6], [4, 0, 10, 6]], [0.9, 0.7], classes=[2, 3], height=8, width=12)


def test_typed_nuclei_take_the_detection_class_and_score() -> None:
    result = instance_nuclei(two_nuclei(), mpp=0.25, typed=True)
    assert isinstance(result, HoverInstances) and len(result) == 2
    expected = rect((8, 12), (0, 5), (0, 5), 1) + rect((8, 12), (0, 5), (6, 9), 2)
    np.testing.assert_array_equal(result.labels, expected)
    first, second = result.nuclei
    assert (first.label, first.type, first.area, first.bbox) == (1, 2, 36, (0, 0, 6, 6))
    assert (second.label, second.type, second.area, second.bbox) == (2, 3, 24, (6, 0, 10, 6))
    assert first.type_prob == first.np_prob == float(np.float32(0.9))
    assert second.type_prob == second.np_prob == float(np.float32(0.7))


def test_untyped_nuclei_have_type_zero_with_certainty_and_the_score_as_probability() -> None:
    result = instance_nuclei(two_nuclei(), mpp=0.25, typed=False)
    assert [(nu.type, nu.type_prob) for nu in result.nuclei] == [(0, 1.0), (0, 1.0)]
    assert [nu.np_prob for nu in result.nuclei] == [float(np.float32(0.9)), float(np.float32(0.7))]


def test_records_are_the_shared_measurements_of_the_label_image() -> None:
    maps = two_nuclei()
    result = instance_nuclei(maps, mpp=0.25, typed=True)
    reference = measure_nuclei(result.labels, np_prob=maps.scores)
    for got, want in zip(result.nuclei, reference, strict=True):
        assert (got.centroid, got.perimeter, got.solidity) == (want.centroid, want.perimeter,
                                                               want.solidity)
        np.testing.assert_array_equal(got.contour, want.contour)


def test_gapped_ids_are_renumbered_in_raster_order_of_first_appearance() -> None:
    instances = np.array([[0, 7, 7, 0],
                          [12, 0, 3, 3],
                          [12, 0, 7, 0]], np.int32)
    classes = np.where(instances > 0, 1, 0).astype(np.uint8)
    scores = np.where(instances > 0, 0.8, 0.0).astype(np.float32)
    maps: dict[str, np.ndarray] = {"instances": instances, "classes": classes, "scores": scores}
    for arr in maps.values():
        arr.flags.writeable = False  # like the shared-memory views the pipeline hands over
    result = instance_nuclei(maps, mpp=0.25, typed=True)
    np.testing.assert_array_equal(result.labels, np.array([[0, 1, 1, 0],
                                                           [2, 0, 3, 3],
                                                           [2, 0, 1, 0]], np.int32))
    assert result.labels.dtype == np.int32
    assert [nu.label for nu in result.nuclei] == [1, 2, 3]
    np.testing.assert_array_equal(instances[1], [12, 0, 3, 3])  # the input is untouched


def test_maps_without_nuclei_give_no_records() -> None:
    maps = paste(np.zeros((0, 4)), np.zeros(0), height=3, width=4)
    result = instance_nuclei(maps, mpp=0.5, typed=True)
    assert len(result) == 0 and not result.labels.any()


@pytest.mark.parametrize(("change", "message"), [
    ({"scores": None}, "missing"),
    ({"classes": np.zeros((3, 5), np.uint8)}, "classes"),
    ({"instances": np.full((3, 4), -1, np.int32)}, "instances"),
    ({"instances": np.zeros((3, 4), np.float32)}, "instances"),
    ({"scores": np.full((3, 4), math.nan, np.float32)}, "scores"),
])
def test_bad_maps_raise_a_value_error_naming_the_problem(change: dict, message: str) -> None:
    maps = {"instances": np.zeros((3, 4), np.int32), "classes": np.zeros((3, 4), np.uint8),
            "scores": np.zeros((3, 4), np.float32), **change}
    maps = {name: arr for name, arr in maps.items() if arr is not None}
    with pytest.raises(ValueError, match=message):
        instance_nuclei(maps, mpp=0.25, typed=True)


@pytest.mark.parametrize(("mpp", "min_size"), [(0.25, 10), (0.5, 3), (0.125, 40), (4.0, 1)])
def test_the_default_min_size_scales_with_resolution(mpp: float, min_size: int) -> None:
    assert instance_sizes(mpp) == InstanceSizes(min_size=min_size)


@pytest.mark.parametrize("mpp", [0.0, -0.25, math.nan, True])
def test_a_bad_resolution_is_refused(mpp) -> None:
    with pytest.raises(ValueError, match="mpp"):
        instance_sizes(mpp)
    with pytest.raises(ValueError, match="mpp"):
        instance_nuclei(two_nuclei(), mpp=mpp, typed=False)


def test_a_ring_shaped_mask_is_a_disc_and_keeps_what_it_encloses_out() -> None:
    ring = np.array(FULL, np.float32)
    third = ring.shape[0] // 3
    ring[third:-third, third:-third] = 0.0  # a hole in the middle third
    boxes = [[0.0, 0.0, 9.0, 9.0], [3.0, 3.0, 6.0, 6.0]]
    # the ring first (higher score): filled, it claims its middle, so the detection inside it is
    # a duplicate and dropped
    maps = paste(boxes, [0.9, 0.8], masks=[ring, FULL], height=9, width=9)
    np.testing.assert_array_equal(maps.instances, np.ones((9, 9), np.int32))
    # the small one first: the ring would enclose it (its outline would cover it), so it goes
    maps = paste(boxes, [0.8, 0.9], masks=[ring, FULL], height=9, width=9)
    np.testing.assert_array_equal(maps.instances, rect((9, 9), (3, 5), (3, 5)))
