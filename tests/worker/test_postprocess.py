"""worker.postprocess: HoVer-Net post-processing, checked against maps whose answer is known.

Known answers come from three places: instances we draw ourselves (exact HV targets derived from
them, so a correct post-processing must give them back), real CoNSeP annotations turned into exact
maps the same way, and a plain transcription of the official algorithm
(``tests/worker/_official_reference.py``) that the fast implementation must reproduce exactly.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import shapely
from numpy.typing import NDArray
from scipy import ndimage
from skimage.measure import regionprops
from skimage.segmentation import watershed

from models.families import HoverOptions
from tests.worker._contours_reference import reference_eccentricity, reference_measure
from tests.worker._official_reference import reference_instances, target_maps
from worker.component_watershed import _flood, component_watershed
from worker.nuclei import Nucleus
from worker.postprocess import (
    HoverInstances,
    PostprocessConstants,
    hover_instances,
    measure_nuclei,
    scaled_constants,
    segment_maps,
    upsample_maps,
)

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # make_maps, the benchmark's map generator

CONSEP = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "nuclei" / (
    "consep_patches_train.npz"
)


# --------------------------------------------------------------------------- helpers


def _radius(a: float, b: float, angle_deg: float, theta: float) -> float:
    """Distance from an ellipse's centre to its edge in direction ``theta``."""
    phi = theta - np.deg2rad(angle_deg)
    return a * b / float(np.hypot(b * np.cos(phi), a * np.sin(phi)))


def draw_nuclei(
    size: int = 512, *, seed: int = 0, step: int = 56
) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
    """~100 ellipses of 40× nucleus size on a jittered grid, 30 % with a touching partner.

    Returns the instance map and a type map (one random type 1..4 per instance).
    """
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    kinds = [0]
    for cy in range(step // 2, size - step // 2 + 1, step):
        for cx in range(step // 2, size - step // 2 + 1, step):
            x, y = cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4)
            a, b, angle = rng.uniform(8, 14), rng.uniform(6, 10), rng.uniform(0, 180)
            kinds.append(int(rng.integers(1, 5)))
            cv2.ellipse(inst, ((x, y), (2 * a, 2 * b), angle), len(kinds) - 1, -1)
            if rng.random() < 0.3:
                theta = rng.uniform(0, 2 * np.pi)
                a2, b2, angle2 = rng.uniform(7, 11), rng.uniform(5, 8), rng.uniform(0, 180)
                # One pixel closer than touching, so the pair shares a boundary.
                d = _radius(a, b, angle, theta) + _radius(a2, b2, angle2, theta + np.pi) - 1.0
                kinds.append(int(rng.integers(1, 5)))
                centre = (x + d * np.cos(theta), y + d * np.sin(theta))
                cv2.ellipse(inst, (centre, (2 * a2, 2 * b2), angle2), len(kinds) - 1, -1)
    return inst, np.asarray(kinds)[inst]


def noisy_prob(inst: NDArray, seed: int) -> NDArray[np.float32]:
    """About 0.95 inside nuclei and 0.05 outside, with ±0.05 uniform noise."""
    rng = np.random.default_rng(seed)
    prob = np.where(inst > 0, 0.95, 0.05) + rng.uniform(-0.05, 0.05, inst.shape)
    return np.clip(prob, 0, 1).astype(np.float32)


def match(gt: NDArray, pred: NDArray) -> tuple[NDArray[np.intp], NDArray[np.bool_]]:
    """For each gt id: the pred id of highest IoU, and whether that IoU is >= 0.5.

    Only ids present in ``gt`` are flagged True/False; absent ids are False.
    """
    g, p = gt.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    n_gt, n_pred = int(g.max()) + 1, int(p.max()) + 1
    inter = np.bincount(g * n_pred + p, minlength=n_gt * n_pred).reshape(n_gt, n_pred)
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    iou[0, :] = iou[:, 0] = 0
    best = iou.argmax(1)
    return best, iou[np.arange(n_gt), best] >= 0.5


def present_ids(inst: NDArray) -> NDArray[np.bool_]:
    present = np.bincount(inst.ravel()) > 0
    present[0] = False
    return present


def type_of_instance(inst: NDArray, type_map: NDArray) -> NDArray[np.int64]:
    kinds = np.zeros(int(inst.max()) + 1, np.int64)
    kinds[inst.ravel()] = type_map.ravel()
    return kinds


def assert_same_as_reference(result: HoverInstances, np_prob: NDArray, hv: NDArray,
                             types: NDArray | None = None, **options: int) -> None:
    """Labels identical up to renumbering; bbox, centroid, contour and type vote identical."""
    ref_labels, records = reference_instances(np_prob, hv, types, **options)
    ids = np.unique(ref_labels)
    renumber = np.zeros(int(ids.max()) + 1, np.int32)
    renumber[ids] = np.arange(len(ids), dtype=np.int32)
    np.testing.assert_array_equal(result.labels, renumber[ref_labels])
    assert len(result.nuclei) == len(records)
    for nucleus, ref in zip(result.nuclei, records, strict=True):
        assert nucleus.bbox == ref.bbox
        np.testing.assert_allclose(nucleus.centroid, ref.centroid, rtol=0, atol=1e-9)
        # The pixel-edge outline encloses the official centre-line contour and no more pixels
        # than the nucleus has.
        outline = shapely.Polygon(nucleus.contour)
        filled = int(ndimage.binary_fill_holes(result.labels == nucleus.label).sum())
        assert outline.is_valid and outline.area <= filled + 0.1
        assert shapely.contains(outline.buffer(1e-6), shapely.points(ref.contour)).all()
        if types is not None:
            assert nucleus.type == ref.type
            assert nucleus.type_prob == pytest.approx(ref.type_prob, rel=1e-5)


@pytest.fixture(scope="module")
def drawn() -> tuple[NDArray, NDArray, NDArray, NDArray]:
    """(instances, type map, np_prob, hv) of the drawn map at 0.25 µm/px."""
    inst, type_map = draw_nuclei(seed=0)
    _, hv = target_maps(inst)
    return inst, type_map, noisy_prob(inst, seed=1), hv


@pytest.fixture(scope="module")
def consep() -> dict[str, NDArray]:
    with np.load(CONSEP) as data:
        # Two patches from each of four source images.
        pick = [i for i, name in enumerate(data["names"]) if name.endswith(("_003", "_011"))][:8]
        return {"inst": data["inst"][pick], "type_map": data["type_map"][pick]}


# --------------------------------------------------------------------------- known answers


def test_recovers_drawn_nuclei_and_their_types(drawn: tuple) -> None:
    inst, type_map, np_prob, hv = drawn
    # Mild type noise: 15 % of nucleus pixels vote for a random type (background included);
    # the per-instance majority must still win.
    rng = np.random.default_rng(2)
    noisy_types = type_map.copy()
    flip = (inst > 0) & (rng.random(inst.shape) < 0.15)
    noisy_types[flip] = rng.integers(0, 5, int(flip.sum()))

    result = hover_instances(np_prob, hv, noisy_types)

    best, ok = match(inst, result.labels)
    present = present_ids(inst)
    assert present.sum() >= 95
    assert ok[present].mean() >= 0.99
    found_types = np.array([0] + [nucleus.type for nucleus in result.nuclei])
    expected = type_of_instance(inst, type_map)
    matched = present & ok
    np.testing.assert_array_equal(found_types[best[matched]], expected[matched])


def test_drawn_map_is_identical_to_the_official_algorithm(drawn: tuple) -> None:
    _, type_map, np_prob, hv = drawn
    assert_same_as_reference(hover_instances(np_prob, hv, type_map), np_prob, hv, type_map)


def test_consep_annotations_are_identical_to_the_official_algorithm(consep: dict) -> None:
    recovered = total = 0
    for k, (inst, type_map) in enumerate(zip(consep["inst"], consep["type_map"], strict=True)):
        _, hv = target_maps(inst)
        np_prob = noisy_prob(inst, seed=k)
        result = hover_instances(np_prob, hv, type_map)

        assert_same_as_reference(result, np_prob, hv, type_map)
        _, ok = match(inst, result.labels)
        present = present_ids(inst)
        recovered += int(ok[present].sum())
        total += int(present.sum())
    # Against the annotations themselves: instances under 10 px and fragments cut by the patch
    # edge are lost by design (86 % over all 160 patches).
    assert total > 300
    assert recovered / total >= 0.8


def test_consep_reference_instances_are_matched_with_equal_types(consep: dict) -> None:
    inst, type_map = consep["inst"][0], consep["type_map"][0]
    _, hv = target_maps(inst)
    np_prob = noisy_prob(inst, seed=0)
    ref_labels, records = reference_instances(np_prob, hv, type_map)
    result = hover_instances(np_prob, hv, type_map)

    best, ok = match(ref_labels, result.labels)
    present = present_ids(ref_labels)
    assert ok[present].mean() >= 0.99
    ref_type = {rec.label: rec.type for rec in records}
    for ref_id in np.flatnonzero(present & ok):
        assert result.nuclei[best[ref_id] - 1].type == ref_type[int(ref_id)]


def test_type_map_and_type_probabilities_give_the_same_result(drawn: tuple) -> None:
    _, type_map, np_prob, hv = drawn
    rng = np.random.default_rng(3)
    probs = rng.random((5, *type_map.shape), dtype=np.float32) * 0.5
    np.put_along_axis(probs, type_map[None], 1.0, axis=0)

    from_map = hover_instances(np_prob, hv, type_map.astype(np.uint8))
    from_probs = hover_instances(np_prob, hv, probs)

    np.testing.assert_array_equal(from_map.labels, from_probs.labels)
    assert [n.type for n in from_map.nuclei] == [n.type for n in from_probs.nuclei]
    assert [n.type_prob for n in from_map.nuclei] == [n.type_prob for n in from_probs.nuclei]
    assert {n.type for n in from_map.nuclei} == {1, 2, 3, 4}


def test_untyped_nuclei_have_type_zero_and_probability_one(drawn: tuple) -> None:
    _, _, np_prob, hv = drawn
    result = hover_instances(np_prob, hv)
    assert len(result) > 90
    assert {(n.type, n.type_prob) for n in result.nuclei} == {(0, 1.0)}


def test_half_resolution_uses_scaled_constants_and_recovers_nuclei() -> None:
    inst, type_map = draw_nuclei(seed=4)
    inst, type_map = inst[::2, ::2], type_map[::2, ::2]
    _, hv = target_maps(inst)
    np_prob = noisy_prob(inst, seed=5)

    result = hover_instances(np_prob, hv, type_map, mpp=0.5)

    best, ok = match(inst, result.labels)
    present = present_ids(inst)
    assert ok[present].mean() >= 0.97
    found_types = np.array([0] + [n.type for n in result.nuclei])
    matched = present & ok
    np.testing.assert_array_equal(found_types[best[matched]],
                                  type_of_instance(inst, type_map)[matched])
    # The scaled run is the official algorithm with the scaled constants...
    assert_same_as_reference(result, np_prob, hv, type_map, ksize=11, min_size=3, opening=3)
    # ...and the scaling matters: the 40× constants merge most of these small nuclei.
    _, ok_unscaled = match(inst, hover_instances(np_prob, hv, mpp=0.25).labels)
    assert ok_unscaled[present].mean() < 0.8


def _matched_iou(gt: NDArray, pred: NDArray) -> NDArray[np.float64]:
    """For each gt id present: IoU with its best-overlapping predicted instance."""
    g, p = gt.astype(np.int64).ravel(), pred.astype(np.int64).ravel()
    n_pred = int(p.max()) + 1
    inter = np.bincount(g * n_pred + p, minlength=(int(g.max()) + 1) * n_pred).reshape(-1, n_pred)
    union = inter.sum(1)[:, None] + inter.sum(0)[None, :] - inter
    iou = np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0)
    iou[:, 0] = 0
    return iou.max(1)[present_ids(gt)]


def test_upsampled_maps_trace_outlines_finer_than_the_model_grid() -> None:
    # A 20x model's ideal output: exact 40x maps averaged down to half resolution.
    inst, type_map = draw_nuclei(seed=6)
    prob, hv = target_maps(inst)
    half = (inst.shape[1] // 2, inst.shape[0] // 2)
    coarse_prob = np.asarray(cv2.resize(prob.astype(np.float32), half,
                                        interpolation=cv2.INTER_AREA), np.float32)
    coarse_hv = np.stack([cv2.resize(c.astype(np.float32), half, interpolation=cv2.INTER_AREA) for c in hv])
    coarse_types = type_map[::2, ::2].astype(np.uint8)

    fine = segment_maps(coarse_prob, coarse_hv, coarse_types, mpp=0.5,
                        options=HoverOptions(upsample=2))
    coarse = segment_maps(coarse_prob, coarse_hv, coarse_types, mpp=0.5, options=HoverOptions())

    assert fine.labels.shape == inst.shape
    assert coarse.labels.shape == (half[1], half[0])
    blocky = cv2.resize(coarse.labels, inst.shape[::-1], interpolation=cv2.INTER_NEAREST)
    fine_iou, blocky_iou = _matched_iou(inst, fine.labels), _matched_iou(inst, blocky)
    assert (fine_iou >= 0.5).mean() >= 0.97
    assert fine_iou.mean() > blocky_iou.mean() + 0.05  # measured 0.98 against 0.90
    # Records are in the fine grid: centroids near the 40x truth, areas in 40x pixels.
    best, ok = match(inst, fine.labels)
    truth = {i: np.argwhere(inst == i).mean(0)[::-1] for i in np.flatnonzero(present_ids(inst) & ok)}
    by_label = {n.label: n for n in fine.nuclei}
    errors = [np.hypot(*(np.asarray(by_label[best[i]].centroid) - c)) for i, c in truth.items()]
    assert np.median(errors) < 0.5
    areas = np.array([by_label[best[i]].area / (inst == i).sum() for i in truth])
    assert 0.9 < np.median(areas) < 1.1


def test_upsampling_keeps_pixel_centres_in_place() -> None:
    np_prob = np.zeros((16, 16), np.float32)
    np_prob[5, 9] = 1.0
    hv = np.zeros((2, 16, 16), np.float32)
    types = np.full((16, 16), 2, np.uint8)
    fine_prob, fine_hv, fine_types = upsample_maps(np_prob, hv, types, 3)
    assert fine_prob.shape == (48, 48) and fine_hv.shape == (2, 48, 48)
    assert fine_types is not None and fine_types.dtype == np.uint8 and set(np.unique(fine_types)) == {2}
    # Coarse pixel (5, 9) covers fine pixels 15..17 x 27..29; its centre is fine pixel (16, 28).
    assert np.unravel_index(fine_prob.argmax(), fine_prob.shape) == (16, 28)
    assert upsample_maps(np_prob, hv, types, 1)[0] is np_prob


def test_postprocess_options_come_from_a_card_and_reject_bad_values() -> None:
    card = {"np_threshold": 0.45, "marker_threshold": 0.5, "upsample": 2, "other": "ignored"}
    assert HoverOptions.from_mapping(card) == HoverOptions(0.45, 0.5, 2)
    assert HoverOptions.from_mapping({}) == HoverOptions(0.5, 0.4, 1)
    for bad in ({"upsample": 0}, {"upsample": 5}, {"upsample": 1.5}, {"upsample": True},
                {"np_threshold": float("nan")}, {"marker_threshold": "0.4"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            HoverOptions.from_mapping(bad)


def test_scaled_constants_are_official_at_40x_and_shrink_with_resolution() -> None:
    assert scaled_constants(0.25) == PostprocessConstants(sobel_ksize=21, min_size=10, opening=5)
    assert scaled_constants(0.5) == PostprocessConstants(sobel_ksize=11, min_size=3, opening=3)
    assert scaled_constants(1.0) == PostprocessConstants(sobel_ksize=7, min_size=1, opening=3)
    assert scaled_constants(0.125) == PostprocessConstants(sobel_ksize=31, min_size=40, opening=11)
    for mpp in (0.1, 0.2, 0.3, 0.46, 0.5, 0.7, 2.0):
        c = scaled_constants(mpp)
        assert c.sobel_ksize % 2 == 1 and 3 <= c.sobel_ksize <= 31
        assert c.opening % 2 == 1 and c.opening >= 3
        assert c.min_size >= 1
    for bad in (0, -0.25, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mpp"):
            scaled_constants(bad)


def test_float64_and_float16_inputs_give_the_float32_result(drawn: tuple) -> None:
    _, type_map, np_prob, hv = drawn
    expected = hover_instances(np_prob, hv, type_map).labels
    got64 = hover_instances(np_prob.astype(np.float64), hv.astype(np.float64), type_map)
    np.testing.assert_array_equal(got64.labels, expected)
    got16 = hover_instances(np_prob.astype(np.float16), hv, type_map)
    assert got16.labels.dtype == np.int32
    _, ok = match(expected, got16.labels)
    assert ok[present_ids(expected)].mean() >= 0.99


def test_measurements_agree_with_skimage_regionprops(drawn: tuple) -> None:
    _, _, np_prob, hv = drawn
    result = hover_instances(np_prob, hv)
    props = regionprops(result.labels)
    for nucleus, prop in zip(result.nuclei, props, strict=True):
        assert nucleus.label == prop.label
        assert nucleus.area == prop.area
        min_row, min_col, max_row, max_col = prop.bbox
        assert nucleus.bbox == (min_col, min_row, max_col, max_row)
        np.testing.assert_allclose(nucleus.centroid, prop.centroid[::-1], atol=1e-9)
        assert nucleus.eccentricity == pytest.approx(prop.eccentricity, abs=1e-9)
        assert 0.0 < nucleus.solidity <= 1.0
        assert nucleus.solidity == pytest.approx(prop.solidity, abs=0.1)
        polygon = shapely.Polygon(nucleus.contour)
        assert polygon.is_valid
        # Area and perimeter of the pixel-edge outline itself (holes filled).
        assert polygon.area == pytest.approx(prop.area_filled, abs=0.01)
        assert nucleus.perimeter == pytest.approx(polygon.length, rel=1e-6)
        mean = float(np_prob[result.labels == nucleus.label].mean(dtype=np.float64))
        assert nucleus.np_prob == pytest.approx(mean, rel=1e-6)


# --------------------------------------------------------------------------- tiny hand-made maps


def square_maps(size: int = 32) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """One 10×10 nucleus at rows 10..19, cols 12..21 (8×8 is too small for the official markers)."""
    inst = np.zeros((size, size), np.int32)
    inst[10:20, 12:22] = 1
    return target_maps(inst)


def test_empty_map_gives_no_nuclei() -> None:
    result = hover_instances(np.zeros((16, 24), np.float32), np.zeros((2, 16, 24), np.float32))
    assert result.nuclei == []
    assert len(result) == 0
    assert result.labels.dtype == np.int32
    assert result.labels.shape == (16, 24)
    assert not result.labels.any()


def test_one_square_nucleus_is_measured_exactly() -> None:
    np_prob, hv = square_maps()
    result = hover_instances(np_prob, hv, np.full((32, 32), 3, np.uint8))

    assert result.labels.dtype == np.int32
    expected = np.zeros((32, 32), np.int32)
    expected[10:20, 12:22] = 1
    np.testing.assert_array_equal(result.labels, expected)
    (nucleus,) = result.nuclei
    assert isinstance(nucleus, Nucleus)
    assert nucleus.label == 1
    assert nucleus.area == 100
    assert nucleus.bbox == (12, 10, 22, 20)
    assert nucleus.centroid == (16.5, 14.5)
    assert nucleus.contour.dtype == np.float32
    # Pixel edges: the squares' corners, half a pixel out from the boundary pixels' centres.
    assert sorted(map(tuple, nucleus.contour.tolist())) == [
        (11.5, 9.5), (11.5, 19.5), (21.5, 9.5), (21.5, 19.5)]
    assert nucleus.perimeter == 40.0
    assert nucleus.solidity == 1.0
    assert nucleus.eccentricity == 0.0
    assert (nucleus.type, nucleus.type_prob, nucleus.np_prob) == (3, 1.0, 1.0)


def test_objects_under_min_size_are_dropped() -> None:
    np_prob, hv = square_maps()
    assert len(hover_instances(np_prob, hv)) == 1
    assert len(hover_instances(np_prob, hv, min_size=0)) == 1
    assert hover_instances(np_prob, hv, min_size=101).nuclei == []


def test_type_vote_follows_the_official_rules() -> None:
    labels = np.zeros((4, 10), np.int32)
    labels[0, :] = 1  # 6 background votes, 3 for type 2, 1 for type 1 -> type 2
    labels[1, :] = 2  # 5 for type 1, 5 for type 3 -> the lower index, 1
    labels[2, :] = 4  # all background -> stays 0 (id 3 absent: skipped)
    types = np.zeros((4, 10), np.int64)
    types[0, :4] = [2, 2, 2, 1]
    types[1, :] = [1, 3] * 5

    nuclei = measure_nuclei(labels, types=types)

    assert [n.label for n in nuclei] == [1, 2, 4]
    assert [n.type for n in nuclei] == [2, 1, 0]
    assert [n.type_prob for n in nuclei] == pytest.approx([0.3, 0.5, 1.0])
    assert [n.np_prob for n in nuclei] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize("pixels", [
    [(5, 5)],
    [(5, 4), (5, 5)],
    [(5, 3), (5, 4), (5, 5)],
    [(3, 3), (4, 4), (5, 5)],
    [(4, 4), (4, 5), (5, 4), (5, 5)],
])
def test_tiny_nuclei_still_get_a_valid_polygon(pixels: list[tuple[int, int]]) -> None:
    labels = np.zeros((10, 10), np.uint16)
    for row, col in pixels:
        labels[row, col] = 7
    (nucleus,) = measure_nuclei(labels)
    assert nucleus.label == 7 and nucleus.area == len(pixels)
    assert nucleus.contour.dtype == np.float32 and nucleus.contour.shape[1] == 2
    assert len(nucleus.contour) >= 3
    polygon = shapely.Polygon(nucleus.contour)
    assert polygon.is_valid and polygon.area > 0
    # The polygon covers every pixel centre.
    assert all(polygon.buffer(1e-6).contains(shapely.Point(c, r)) for r, c in pixels)
    assert nucleus.perimeter > 0
    assert 0 < nucleus.solidity <= 1


def test_solidity_is_area_over_the_hull_of_the_pixel_squares() -> None:
    labels = np.zeros((8, 8), np.int32)
    labels[2, 2] = labels[3, 2] = labels[3, 3] = 1  # 3-pixel L: hull of the squares is 3.5
    labels[5:7, 4:7] = 2  # 2×3 block: convex
    labels[5, 0] = 3
    first, second, third = measure_nuclei(labels)
    assert first.solidity == pytest.approx(3 / 3.5)
    assert second.solidity == 1.0
    assert third.solidity == 1.0


def test_thin_shapes_get_a_valid_pixel_edge_outline() -> None:
    # An L of 1-px-wide arms: OpenCV's centre-line contour retraces the arms (not a simple
    # polygon); the pixel-edge outline is simple, keeps only its 6 corners and holds 5 pixels.
    labels = np.zeros((10, 10), np.int32)
    labels[2:5, 5] = labels[4, 5:8] = 1
    (nucleus,) = measure_nuclei(labels)
    outline = shapely.Polygon(nucleus.contour)
    assert outline.is_valid and outline.area == 5.0
    assert len(nucleus.contour) == 6


def test_labels_and_contours_keep_their_dtypes(drawn: tuple) -> None:
    _, _, np_prob, hv = drawn
    result = hover_instances(np_prob, hv)
    assert result.labels.dtype == np.int32
    assert np.array_equal(np.unique(result.labels), np.arange(len(result) + 1))
    assert all(n.contour.dtype == np.float32 for n in result.nuclei)
    assert [n.label for n in result.nuclei] == list(range(1, len(result) + 1))


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("np_prob", "hv", "types", "message"), [
    (np.zeros((8, 8, 1)), np.zeros((2, 8, 8)), None, r"np_prob .*shape \(8, 8, 1\)"),
    (np.zeros((8, 8)), np.zeros((8, 8, 2)), None, r"hv .*shape \(8, 8, 2\)"),
    (np.zeros((8, 8)), np.zeros((2, 8, 9)), None, r"hv .*shape \(2, 8, 9\)"),
    (np.zeros((8, 8)), np.zeros((2, 8)), None, r"hv .*shape \(2, 8\)"),
    (np.zeros((0, 8)), np.zeros((2, 0, 8)), None, r"np_prob .*shape \(0, 8\)"),
    (np.full((8, 8), np.nan), np.zeros((2, 8, 8)), None, r"np_prob .*NaN"),
    (np.zeros((8, 8)), np.full((2, 8, 8), np.inf), None, r"hv .*NaN"),
    (np.zeros((8, 8), "U1"), np.zeros((2, 8, 8)), None, r"np_prob .*dtype"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((8, 9), int), r"types .*shape \(8, 9\)"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((3, 8, 9)), r"types .*\(3, 8, 9\)"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((8,), int), r"types .*shape \(8,\)"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((8, 8)), r"types .*float64"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.full((8, 8), -1), r"types .*>= 0"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.full((8, 8), 300), r"types .*< 256"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.zeros((300, 8, 8)), r"types .*\(300, 8, 8\)"),
    (np.zeros((8, 8)), np.zeros((2, 8, 8)), np.full((4, 8, 8), np.nan), r"types .*NaN"),
])
def test_bad_arrays_raise_value_error_naming_the_argument(
    np_prob: NDArray, hv: NDArray, types: NDArray | None, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        hover_instances(np_prob, hv, types)


@pytest.mark.parametrize(("option", "value"), [
    ("mpp", 0.0), ("mpp", -1.0), ("np_threshold", float("nan")),
    ("marker_threshold", float("inf")), ("min_size", -1), ("min_size", 2.5),
    ("sobel_ksize", 4), ("sobel_ksize", 33), ("sobel_ksize", 1),
])
def test_bad_options_raise_value_error_naming_the_option(option: str, value: float) -> None:
    np_prob, hv = square_maps()
    options: dict[str, Any] = {option: value}
    with pytest.raises(ValueError, match=option):
        hover_instances(np_prob, hv, **options)


def test_measure_nuclei_rejects_non_integer_or_negative_labels() -> None:
    with pytest.raises(ValueError, match=r"labels .*float"):
        measure_nuclei(np.zeros((4, 4)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"labels"):
        measure_nuclei(np.full((4, 4), -2))
    with pytest.raises(ValueError, match=r"np_prob .*\(4, 5\)"):
        measure_nuclei(np.zeros((4, 4), np.int32), np_prob=np.zeros((4, 5)))


# --------------------------------------------------------------------------- the per-component watershed


def _plateau_case(seed: int) -> tuple[NDArray, NDArray, NDArray]:
    """A blobby mask, an energy of 2..5 flat levels (plateaus and ties everywhere) and
    random markers."""
    rng = np.random.default_rng(seed)
    h, w = (int(v) for v in rng.integers(20, 120, 2))
    fg = cv2.GaussianBlur(rng.random((h, w)), (0, 0), 2) > 0.5
    levels = int(rng.integers(2, 6))
    energy = np.floor(rng.random((h, w)) * levels) / levels
    markers = np.where(rng.random((h, w)) < 0.05, rng.integers(1, 30, (h, w)), 0).astype(np.int32)
    return energy, markers, fg


@pytest.mark.slow
def test_component_watershed_equals_the_whole_map_watershed_on_plateaus() -> None:
    # Ties are the hard part: equal-energy markers pop in an order set by scikit-image's heap
    # layout, which the per-component code must reproduce or defer to the whole-map call.
    paths: Counter[str] = Counter()
    for seed in range(120):
        energy, markers, fg = _plateau_case(seed)
        got, used = component_watershed(energy, markers, fg)
        np.testing.assert_array_equal(got, watershed(energy, markers=markers, mask=fg),
                                      err_msg=f"seed {seed}")
        paths += used
    # Every path was taken, so each is checked against scikit-image.
    assert {"single", "cropped", "orders", "whole_map"} <= set(paths)


def test_component_watershed_equals_the_whole_map_watershed_on_smooth_maps(drawn: tuple) -> None:
    _, _, np_prob, hv = drawn
    fg = np_prob >= 0.5
    energy = -cv2.GaussianBlur(np.abs(hv).sum(0).astype(np.float64), (5, 5), 0)
    rng = np.random.default_rng(7)
    markers = np.where(fg & (rng.random(fg.shape) < 0.01), rng.integers(1, 500, fg.shape), 0)
    markers = markers.astype(np.int32)
    got, paths = component_watershed(energy, markers, fg)
    np.testing.assert_array_equal(got, watershed(energy, markers=markers, mask=fg))
    assert paths["cropped"] > 10


def _per_nucleus(np_prob: NDArray, hv: NDArray, types: NDArray, *, mpp: float,
                 factor: int) -> HoverInstances:
    """``segment_maps`` as it was before the batched measurement: one crop, one
    ``cv2.findContours`` and one ``cv2.moments`` per nucleus (tests/worker/_contours_reference.py)."""
    import worker.postprocess

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(worker.postprocess, "measure", reference_measure)
        return segment_maps(np_prob, hv, types, mpp=mpp, options=HoverOptions(upsample=factor))


def assert_same_records(ours: HoverInstances, before: HoverInstances) -> None:
    """Same labels and, nucleus by nucleus, every field equal with the same type (contours:
    same dtype, same vertices in the same order)."""
    np.testing.assert_array_equal(ours.labels, before.labels)
    assert len(ours.nuclei) == len(before.nuclei)
    for a, b in zip(ours.nuclei, before.nuclei, strict=True):
        for name in Nucleus.__dataclass_fields__:
            x, y = getattr(a, name), getattr(b, name)
            if isinstance(y, np.ndarray):
                assert x.dtype == y.dtype, (a.label, name)
                np.testing.assert_array_equal(x, y, err_msg=f"nucleus {a.label} {name}")
            else:
                assert type(x) is type(y) and x == y, (a.label, name, x, y)


def test_records_are_identical_to_the_per_nucleus_measurement_on_drawn_maps(drawn: tuple) -> None:
    _, type_map, np_prob, hv = drawn
    for mpp, factor in ((0.25, 1), (0.5, 2)):
        ours = segment_maps(np_prob, hv, type_map, mpp=mpp, options=HoverOptions(upsample=factor))
        assert len(ours) > 50
        assert_same_records(ours, _per_nucleus(np_prob, hv, type_map, mpp=mpp, factor=factor))


def test_batched_moments_and_eccentricity_are_the_per_crop_values_bit_for_bit() -> None:
    from worker.instances import _eccentricity, _moments

    rng = np.random.default_rng(21)
    labels = np.zeros((300, 300), np.int32)
    for label in range(1, 400):
        y, x = rng.integers(0, 290, 2)
        h, w = rng.integers(1, 11, 2)
        labels[y:y + h, x:x + w][rng.random((h, w)) < 0.7] = label
    boxes = ndimage.find_objects(labels)
    present = [k for k, box in enumerate(boxes) if box is not None]
    flat = np.flatnonzero(labels)
    owner = np.searchsorted(np.array(present) + 1, labels.ravel()[flat])
    corner = np.array([(boxes[k][0].start, boxes[k][1].start) for k in present])
    rows, cols = np.divmod(flat, labels.shape[1])
    area = np.bincount(owner).astype(np.float64)
    m10, m01, mu20, mu11, mu02 = _moments(cols - corner[owner, 1], rows - corner[owner, 0],
                                          owner, area)
    for i, k in enumerate(present):
        expected = cv2.moments((labels[boxes[k]] == k + 1).view(np.uint8), binaryImage=True)
        got = (m10[i], m01[i], mu20[i], mu11[i], mu02[i])
        assert got == tuple(expected[name] for name in ("m10", "m01", "mu20", "mu11", "mu02"))
    # The formula on its own, over moments of every scale (Python's ** is not numpy's square).
    mu = rng.uniform(-1, 1, (3, 100_000)) * 10.0 ** rng.uniform(-3, 6, (3, 100_000))
    mu[0], mu[2] = np.abs(mu[0]), np.abs(mu[2])
    pixels = rng.integers(1, 5000, 100_000).astype(np.float64)
    got_ecc = _eccentricity(mu[0], mu[1], mu[2], pixels).tolist()
    assert got_ecc == [reference_eccentricity(*v) for v in zip(*mu.tolist(), pixels.tolist(),
                                                                strict=True)]


@pytest.mark.slow
def test_labels_are_identical_to_the_baseline_on_generated_maps(tmp_path: Path) -> None:
    import _postprocess_reference as baseline  # the frozen pre-issue-15 code
    import make_maps

    patches = make_maps.load_patches()
    cases = 0
    for seed, size in ((0, 512), (1, 768), (2, 1024)):
        folder = make_maps.write_map_set(tmp_path, size, seed=seed, patches=patches)
        maps = make_maps.load_map_set(folder)
        half = (size // 2, size // 2)
        coarse = (cv2.resize(maps.np_prob, half, interpolation=cv2.INTER_AREA),
                  np.stack([cv2.resize(c, half, interpolation=cv2.INTER_AREA) for c in maps.hv]),
                  maps.types[::2, ::2])
        for (np_prob, hv, types), mpp, factor in (((maps.np_prob, maps.hv, maps.types), 0.25, 1),
                                                  (coarse, 0.5, 2), (coarse, 0.5, 1)):
            np_prob = np.asarray(np_prob, np.float32)
            ours = segment_maps(np_prob, hv, types, mpp=mpp, options=HoverOptions(upsample=factor))
            theirs = baseline.segment_maps(np_prob, hv, types, mpp=mpp,
                                           options=baseline.PostprocessOptions(upsample=factor))
            assert len(ours) > 50
            np.testing.assert_array_equal(ours.labels, theirs.labels, err_msg=f"{size} {mpp} x{factor}")
            assert [n.type for n in ours.nuclei] == [n.type for n in theirs.nuclei]
            assert [n.bbox for n in ours.nuclei] == [n.bbox for n in theirs.nuclei]
            assert_same_records(ours, _per_nucleus(np_prob, hv, types, mpp=mpp, factor=factor))
            cases += 1
    assert cases == 9


@pytest.mark.slow
def test_labels_are_identical_to_the_baseline_on_real_model_maps(tmp_path: Path) -> None:
    import _postprocess_reference as baseline
    import make_maps

    folder = make_maps.write_model_maps(tmp_path, size=448, origin=(900, 1300))
    np_prob, hv, types = (np.load(folder / f"{name}.npy") for name in ("np_prob", "hv", "types"))
    mpp = json.loads((folder / "meta.json").read_text())["mpp"]
    for factor in (1, 2):
        ours = segment_maps(np_prob, hv, types, mpp=mpp, options=HoverOptions(upsample=factor))
        theirs = baseline.segment_maps(np_prob, hv, types, mpp=mpp,
                                       options=baseline.PostprocessOptions(upsample=factor))
        assert len(ours) > 20
        np.testing.assert_array_equal(ours.labels, theirs.labels, err_msg=f"x{factor}")
        assert [n.type for n in ours.nuclei] == [n.type for n in theirs.nuclei]
        assert_same_records(ours, _per_nucleus(np_prob, hv, types, mpp=mpp, factor=factor))


def test_written_out_flood_is_scikit_images_when_markers_do_not_tie() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        energy = rng.random((40, 50))  # continuous: no two markers share a value
        mask = rng.random((40, 50)) < 0.9
        markers = np.where(rng.random((40, 50)) < 0.03, rng.integers(1, 9, (40, 50)), 0).astype(np.int32)
        np.testing.assert_array_equal(_flood(energy, markers, mask, {}),
                                      watershed(energy, markers=markers, mask=mask))


# --------------------------------------------------------------------------- class probabilities


def test_class_calibration_and_floor_are_checked_card_options() -> None:
    card = {"class_prob_calibration": [[0.2, 0.1], [1.0, 0.9]], "min_class_prob": 0.5}
    options = HoverOptions.from_mapping(card)
    assert options.class_prob_calibration == ((0.2, 0.1), (1.0, 0.9))
    assert options.class_probability(0.6) == pytest.approx(0.5)
    assert options.class_probability(0.0) == pytest.approx(0.1)  # flat beyond the ends
    for bad in ({"min_class_prob": 1.5}, {"min_class_prob": float("nan")},
                {"class_prob_calibration": [[0.5, 0.5]]},
                {"class_prob_calibration": [[0.5, 0.6], [0.4, 0.7]]},
                {"class_prob_calibration": [[0.2, 0.6], [0.4, 0.5]]},
                {"class_prob_calibration": "steep"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            HoverOptions.from_mapping(bad)


def test_nuclei_below_the_class_floor_are_left_unclassified(drawn: tuple) -> None:
    inst, type_map, np_prob, hv = drawn
    rng = np.random.default_rng(5)
    noisy = type_map.copy()
    flip = (inst > 0) & (rng.random(inst.shape) < 0.4)
    noisy[flip] = rng.integers(1, 5, int(flip.sum()))
    plain = segment_maps(np_prob, hv, noisy, mpp=0.25, options=HoverOptions())
    floor = 0.75
    floored = segment_maps(np_prob, hv, noisy, mpp=0.25, options=HoverOptions(min_class_prob=floor))
    np.testing.assert_array_equal(plain.labels, floored.labels)  # outlines never change
    unsure = [a.type_prob < floor for a in plain.nuclei]
    assert 0 < sum(unsure) < len(unsure)
    for before, after, low in zip(plain.nuclei, floored.nuclei, unsure, strict=True):
        assert after.type == (0 if low else before.type)
        assert after.type_prob == before.type_prob
    calibrated = segment_maps(np_prob, hv, noisy, mpp=0.25, options=HoverOptions(
        class_prob_calibration=((0.0, 0.0), (1.0, 0.5))))
    assert [n.type for n in calibrated.nuclei] == [n.type for n in plain.nuclei]
    assert [n.type_prob for n in calibrated.nuclei] == pytest.approx([n.type_prob / 2 for n in plain.nuclei])
