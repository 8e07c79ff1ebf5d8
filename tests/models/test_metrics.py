"""Specification of models.metrics on hand-made label maps whose scores are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from models.metrics import (
    CLASS_F1_WEIGHTS,
    ClassCounts,
    DetectionResult,
    MulticlassPQ,
    PQResult,
    aji,
    aji_plus,
    aji_sums,
    count_r2,
    detection_scores,
    dice,
    multiclass_pq,
    pair_centroids,
    panoptic_quality,
)
from tests.models._cases import CONSEP, shifted_case


def two_squares() -> np.ndarray:
    """6×6 GT: nucleus 1 = rows 0-2 × cols 0-2, nucleus 2 = rows 3-5 × cols 3-5 (9 px each)."""
    gt = np.zeros((6, 6), dtype=np.int32)
    gt[0:3, 0:3] = 1
    gt[3:6, 3:6] = 2
    return gt


# --------------------------------------------------------------------------- instance metrics


def test_perfect_prediction_scores_one_whatever_the_ids() -> None:
    gt = two_squares()
    pred = np.where(gt == 1, 70, np.where(gt == 2, 3, 0))
    assert dice(pred, gt) == 1.0
    assert aji(pred, gt) == 1.0
    assert aji_plus(pred, gt) == 1.0
    assert panoptic_quality(pred, gt) == PQResult(1.0, 1.0, 1.0, 2, 0, 0, 2.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.uint64, bool])
def test_any_integer_dtype_is_accepted(dtype: type) -> None:
    pred, gt = shifted_case()
    if dtype is bool:  # a boolean map is a single instance
        pred, gt = pred == 2, gt == 5
        assert aji(pred.astype(dtype), gt.astype(dtype)) == pytest.approx(9 / 15)
    else:
        assert aji(pred.astype(dtype), gt.astype(dtype)) == pytest.approx(9 / 21)
        assert panoptic_quality(pred.astype(dtype), gt).pq == pytest.approx(0.3)


def test_empty_prediction_scores_zero() -> None:
    gt = two_squares()
    empty = np.zeros_like(gt)
    assert dice(empty, gt) == 0.0
    assert aji(empty, gt) == 0.0
    assert aji_plus(empty, gt) == 0.0
    # TP 0, FP 0, FN 2: DQ = 0 / (0 + 0 + 1) = 0 and SQ is 0 by convention.
    assert panoptic_quality(empty, gt) == PQResult(0.0, 0.0, 0.0, 0, 0, 2, 0.0)


def test_both_empty_is_undefined_not_perfect() -> None:
    empty = np.zeros((4, 4), dtype=np.uint8)
    assert math.isnan(dice(empty, empty))
    assert math.isnan(aji(empty, empty))
    assert math.isnan(aji_plus(empty, empty))
    pq = panoptic_quality(empty, empty)
    assert math.isnan(pq.pq) and (pq.tp, pq.fp, pq.fn) == (0, 0, 0)


def test_shifted_nucleus_missed_nucleus_and_false_positive() -> None:
    pred, gt = shifted_case()
    # Dice: |P| = 14, |G| = 16, shared 9 -> 18 / 30.
    assert dice(pred, gt) == pytest.approx(0.6)
    # AJI: GT 5 <-> pred 2 adds 9 / 15; missed GT 9 adds 4 and unused pred 7 adds 2 to the
    # union: 9 / 21. AJI+ pairs the same way.
    assert aji(pred, gt) == pytest.approx(9 / 21)
    assert aji_plus(pred, gt) == pytest.approx(9 / 21)
    assert aji_sums(pred, gt) == (9, 21)
    # PQ: TP 1 (IoU 0.6), FP 1, FN 1 -> DQ = 1 / 2, SQ = 0.6, PQ = 0.3.
    pq = panoptic_quality(pred, gt)
    assert (pq.tp, pq.fp, pq.fn) == (1, 1, 1)
    assert (pq.dq, pq.sq, pq.pq, pq.iou_sum) == pytest.approx((0.5, 0.6, 0.3, 0.6))


def test_merge_two_nuclei_into_one() -> None:
    gt = two_squares()
    pred = (gt > 0).astype(np.int32) * 4  # one 18 px prediction over both nuclei
    assert dice(pred, gt) == 1.0
    # AJI lets both GT nuclei take the same prediction: (9 + 9) / (18 + 18) = 0.5.
    assert aji(pred, gt) == pytest.approx(0.5)
    # AJI+ pairs it once: 9 / (18 + 9 for the unpaired GT nucleus) = 1/3.
    assert aji_plus(pred, gt) == pytest.approx(1 / 3)


def test_iou_of_exactly_one_half_is_not_a_match() -> None:
    gt = two_squares()
    pred = (gt > 0).astype(np.int32)  # IoU with each GT nucleus is 9 / 18 = 0.5
    pq = panoptic_quality(pred, gt)
    assert (pq.tp, pq.fp, pq.fn) == (0, 1, 2)
    assert pq.pq == 0.0
    # Below 0.5 the unique maximum-IoU assignment pairs one of them:
    # TP 1, FP 0, FN 1 -> DQ = 1 / 1.5, SQ = 0.5.
    low = panoptic_quality(pred, gt, iou_threshold=0.4)
    assert (low.tp, low.fp, low.fn) == (1, 0, 1)
    assert (low.dq, low.sq, low.pq) == pytest.approx((2 / 3, 0.5, 1 / 3))


def test_split_nucleus() -> None:
    """GT 1 = rows 0-1 × cols 0-3 (8 px), GT 2 = rows 4-5 × cols 0-5 (12 px), split in halves."""
    gt = np.zeros((6, 6), dtype=np.int64)
    gt[0:2, 0:4] = 1
    gt[4:6, 0:6] = 2
    pred = np.zeros((6, 6), dtype=np.int64)
    pred[0:2, 0:4] = 30
    pred[4:6, 0:3] = 10
    pred[4:6, 3:6] = 20
    # Each half has IoU 6 / 12 = 0.5 with GT 2: no match. TP 1, FP 2, FN 1 -> DQ 1 / 2.5.
    pq = panoptic_quality(pred, gt)
    assert (pq.tp, pq.fp, pq.fn) == (1, 2, 1)
    assert pq.pq == pytest.approx(0.4)
    # AJI: 8/8 for GT 1, GT 2 takes half 10 (tie -> lower id): 6/12, half 20 unused adds 6.
    assert aji_sums(pred, gt) == (14, 26)
    assert aji_sums(pred, gt, plus=True) == (14, 26)


def test_pq_results_pool_by_adding_counts() -> None:
    a = PQResult.from_counts(1, 1, 1, 0.6)
    b = PQResult.from_counts(2, 0, 0, 1.8)
    pooled = a + b
    assert (pooled.tp, pooled.fp, pooled.fn) == (3, 1, 1)
    assert (pooled.dq, pooled.sq) == pytest.approx((3 / 4, 0.8))


def test_scores_ignore_label_permutation_and_id_values() -> None:
    pred, gt = shifted_case()
    rng = np.random.default_rng(0)
    # Permuted, huge (forces the sorting relabel path) and unsigned ids.
    relabelled = np.zeros_like(pred, dtype=np.uint64)
    for new, old in zip(rng.permutation(10) * 10**12 + 5, (2, 7), strict=False):
        relabelled[pred == old] = new
    assert aji(relabelled, gt) == aji(pred, gt)
    assert aji_plus(relabelled, gt) == aji_plus(pred, gt)
    assert panoptic_quality(relabelled, gt) == panoptic_quality(pred, gt)
    assert dice(relabelled.astype(bool), gt) == dice(pred, gt)


@pytest.mark.parametrize("func", [dice, aji, aji_plus, panoptic_quality])
def test_input_checks(func) -> None:  # type: ignore[no-untyped-def]
    gt = two_squares()
    with pytest.raises(ValueError, match=r"\(6, 5\).*\(6, 6\)"):
        func(gt[:, :5], gt)
    with pytest.raises(TypeError, match="integer dtype"):
        func(gt.astype(np.float32), gt)
    with pytest.raises(ValueError, match="negative"):
        func(-gt, gt)
    with pytest.raises(ValueError, match="2-D"):
        func(gt[None], gt[None])
    with pytest.raises(TypeError, match="numpy array"):
        func(gt.tolist(), gt)


def test_iou_threshold_range_is_checked() -> None:
    gt = two_squares()
    with pytest.raises(ValueError, match="iou_threshold"):
        panoptic_quality(gt, gt, iou_threshold=1.0)


# --------------------------------------------------------------------------- cross-check


def loop_scores(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float, float, float]:
    """AJI, AJI+, PQ and PQ at IoU > 0.3, the slow, obvious way: one mask per instance."""
    gt_ids = [i for i in np.unique(gt) if i]
    pred_ids = [i for i in np.unique(pred) if i]
    inter = np.zeros((len(gt_ids), len(pred_ids)))
    union = np.zeros((len(gt_ids), len(pred_ids)))
    for a, g in enumerate(gt_ids):
        g_mask = gt == g
        for b, p in enumerate(pred_ids):
            p_mask = pred == p
            inter[a, b] = np.sum(g_mask & p_mask)
            union[a, b] = np.sum(g_mask | p_mask)
    iou = inter / union
    gt_area = [np.sum(gt == g) for g in gt_ids]
    pred_area = [np.sum(pred == p) for p in pred_ids]

    def aji_from(pairs: list[tuple[int, int]]) -> float:
        total_i = sum(inter[a, b] for a, b in pairs)
        total_u = sum(union[a, b] for a, b in pairs)
        total_u += sum(gt_area[a] for a in range(len(gt_ids)) if a not in {x for x, _ in pairs})
        used = {y for _, y in pairs}
        total_u += sum(pred_area[b] for b in range(len(pred_ids)) if b not in used)
        return total_i / total_u

    best = [(a, int(np.argmax(iou[a]))) for a in range(len(gt_ids)) if iou[a].max() > 0]
    rows, cols = linear_sum_assignment(-iou)
    unique = [(a, b) for a, b in zip(rows, cols, strict=True) if iou[a, b] > 0]
    matched = iou[iou > 0.5]
    tp = matched.size
    fp, fn = len(pred_ids) - tp, len(gt_ids) - tp
    pq = (tp / (tp + fp / 2 + fn / 2)) * (matched.sum() / tp)
    low = [iou[a, b] for a, b in unique if iou[a, b] > 0.3]
    low_pq = sum(low) / (len(low) + (len(pred_ids) - len(low)) / 2 + (len(gt_ids) - len(low)) / 2)
    return aji_from(best), aji_from(unique), pq, low_pq


@pytest.fixture(scope="module")
def consep_maps() -> np.ndarray:
    with np.load(CONSEP) as data:
        return data["inst"][[3, 40, 77]]


def perturb(gt: np.ndarray, seed: int) -> np.ndarray:
    """Eroded, shifted copy with some nuclei dropped and a few merged, ids shuffled."""
    rng = np.random.default_rng(seed)
    pred = ndi.grey_erosion(gt, size=(2, 2))
    pred = np.roll(pred, shift=(2, -1), axis=(0, 1))
    ids = np.unique(pred)[1:]
    pred[np.isin(pred, rng.choice(ids, size=len(ids) // 6, replace=False))] = 0
    for a, b in rng.choice(ids, size=(3, 2), replace=False):
        pred[pred == b] = a
    lut = np.zeros(pred.max() + 1, dtype=np.int64)
    lut[ids] = rng.permutation(len(ids)) * 3 + 11
    return lut[pred]


def test_aji_and_pq_agree_with_a_loop_implementation(consep_maps: np.ndarray) -> None:
    for k, gt in enumerate(consep_maps):
        pred = perturb(gt, seed=k)
        want_aji, want_aji_plus, want_pq, want_low_pq = loop_scores(pred, gt)
        assert aji(pred, gt) == pytest.approx(want_aji, rel=1e-12)
        assert aji_plus(pred, gt) == pytest.approx(want_aji_plus, rel=1e-12)
        assert panoptic_quality(pred, gt).pq == pytest.approx(want_pq, rel=1e-12)
        low = panoptic_quality(pred, gt, iou_threshold=0.3).pq
        assert low == pytest.approx(want_low_pq, rel=1e-12)
        assert 0.2 < want_pq < 0.95  # the perturbation really is partial


# --------------------------------------------------------------------------- centroid pairing


def test_pair_centroids_keeps_pairs_up_to_the_radius() -> None:
    pred = np.array([[0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    gt = np.array([[0.0, 3.0], [10.0, 4.5], [90.0, 90.0]])
    pairs, unpaired_pred, unpaired_gt = pair_centroids(pred, gt, radius=4.0)
    # (0,0)-(0,3) is 3 px; (10,0)-(10,4.5) is 4.5 px > 4; the rest are far apart.
    assert pairs.tolist() == [[0, 0]]
    assert unpaired_pred.tolist() == [1, 2]
    assert unpaired_gt.tolist() == [1, 2]
    pairs, _, _ = pair_centroids(pred, gt, radius=4.5)  # exactly at the radius counts
    assert pairs.tolist() == [[0, 0], [1, 1]]


def test_pair_centroids_is_one_to_one() -> None:
    pred = np.array([[0.0, 0.0], [0.0, 2.0]])
    gt = np.array([[0.0, 1.0]])
    pairs, unpaired_pred, unpaired_gt = pair_centroids(pred, gt, radius=5)
    assert pairs.shape == (1, 2)
    assert unpaired_pred.size == 1 and unpaired_gt.size == 0


def test_pair_centroids_minimises_total_distance_before_the_radius() -> None:
    """HoVer-Net's rule: assign over all points, then drop far pairs.

    A-X = 1, A-Y = 12, B-X = 12, B-Y = 13 with radius 12.5: the assignment (A-X, B-Y) costs 14
    against 24 for (A-Y, B-X), so only A-X survives, although two in-radius pairs exist.
    """
    a, b = [0.0, 0.0], [5.87209251, 11.46511011]
    x, y = [0.0, 1.0], [12.0, 0.0]
    pairs, unpaired_pred, unpaired_gt = pair_centroids(np.array([a, b]), np.array([x, y]),
                                                       radius=12.5)
    assert pairs.tolist() == [[0, 0]]
    assert unpaired_pred.tolist() == [1] and unpaired_gt.tolist() == [1]


def test_pair_centroids_with_no_points() -> None:
    pairs, unpaired_pred, unpaired_gt = pair_centroids(np.zeros((0, 2)), np.ones((3, 2)),
                                                       radius=1)
    assert pairs.shape == (0, 2)
    assert unpaired_pred.size == 0 and unpaired_gt.tolist() == [0, 1, 2]


def test_pair_centroids_checks_arguments() -> None:
    with pytest.raises(ValueError, match="radius"):
        pair_centroids(np.zeros((1, 2)), np.zeros((1, 2)), radius=0)
    with pytest.raises(ValueError, match=r"\(n, 2\)"):
        pair_centroids(np.zeros((2, 3)), np.zeros((1, 2)), radius=1)
    with pytest.raises(ValueError, match="non-finite"):
        pair_centroids(np.array([[np.nan, 0.0]]), np.zeros((1, 2)), radius=1)


# --------------------------------------------------------------------------- detection / F_c


def points_map(spec: dict[int, tuple[int, int]], shape: tuple[int, int] = (40, 40)) -> np.ndarray:
    """Instance map of 2×2 nuclei; ``spec`` maps id -> top-left (row, col)."""
    inst = np.zeros(shape, dtype=np.int32)
    for i, (r, c) in spec.items():
        inst[r:r + 2, c:c + 2] = i
    return inst


# GT (id: position, class): 1 (0,0) c1; 2 (0,10) c1; 3 (0,20) c2; 4 (0,30) c2; 5 (20,0) c1.
GT_SPEC = {1: (0, 0), 2: (0, 10), 3: (0, 20), 4: (0, 30), 5: (20, 0)}
GT_CLASSES = {1: 1, 2: 1, 3: 2, 4: 2, 5: 1}
# Predictions over GT 1-4 (GT 5 is missed), plus two false positives 16 (c2) and 17 (c1).
PRED_SPEC = {11: (0, 0), 12: (0, 10), 13: (0, 20), 14: (0, 30), 16: (30, 30), 17: (20, 20)}
PRED_CLASSES = {11: 1, 12: 2, 13: 2, 14: 1, 16: 2, 17: 1}


def test_detection_and_class_f1_by_hand() -> None:
    """Pairs: 11-1 (c1,c1), 12-2 (pred c2, GT c1), 13-3 (c2,c2), 14-4 (pred c1, GT c2).

    Detection: TP 4, FP 2 (16, 17), FN 1 (5): F1_d = 8 / 11, precision 4/6, recall 4/5.

    Class 1, over the pairs involving class 1 (11-1, 12-2, 14-4; 13-3 is left out, so TN_1 = 0):
    TP_1 = 1 (11-1), FN_1 = 1 (12-2), FP_1 = 1 (14-4); FP_d = 1 (17), FN_d = 1 (GT 5).
    F_1 = 2·1 / (2·1 + 2·1 + 2·1 + 1 + 1) = 2 / 8.

    Class 2 (pairs 12-2, 13-3, 14-4): TP_2 = 1 (13-3), FP_2 = 1 (12-2), FN_2 = 1 (14-4),
    TN_2 = 0; FP_d = 1 (16), FN_d = 0. F_2 = 2 / (2 + 2 + 2 + 1) = 2 / 7.
    """
    pred, gt = points_map(PRED_SPEC), points_map(GT_SPEC)
    res = detection_scores(pred, PRED_CLASSES, gt, GT_CLASSES, radius=3, class_ids=[1, 2])
    assert (res.tp, res.fp, res.fn) == (4, 2, 1)
    assert (res.f1_d, res.precision, res.recall) == pytest.approx((8 / 11, 4 / 6, 4 / 5))
    assert res.class_counts == {1: ClassCounts(1, 1, 1, 1, 1), 2: ClassCounts(1, 1, 1, 1, 0)}
    assert res.per_class == pytest.approx({1: 2 / 8, 2: 2 / 7})
    assert res.type_accuracy == 0.5 and res.same_type == 2
    assert CLASS_F1_WEIGHTS == (2, 2, 1, 1)


def test_instance_types_may_be_a_lookup_table_or_a_type_map() -> None:
    pred, gt = points_map(PRED_SPEC), points_map(GT_SPEC)
    by_dict = detection_scores(pred, PRED_CLASSES, gt, GT_CLASSES, radius=3)
    pred_lut = np.zeros(18, dtype=np.int64)
    for i, c in PRED_CLASSES.items():
        pred_lut[i] = c
    gt_map = np.zeros(gt.shape, dtype=np.uint8)
    for i, c in GT_CLASSES.items():
        gt_map[gt == i] = c
    # Noise in the type map is outvoted: one pixel of GT 1 says class 2, 3 say class 1.
    gt_map[0, 0] = 2
    other = detection_scores(pred, pred_lut, gt, gt_map, radius=3)
    assert other == by_dict
    assert sorted(by_dict.per_class) == [1, 2]  # default: the classes present in the GT


def test_type_map_majority_vote_ignores_untyped_pixels() -> None:
    gt = np.zeros((2, 4), dtype=np.int32)
    gt[:, :] = 1
    type_map = np.array([[0, 0, 0, 2], [0, 0, 0, 0]], dtype=np.uint8)  # typed pixels win
    res = detection_scores(gt, {1: 2}, gt, type_map, radius=1)
    assert res.class_counts[2] == ClassCounts(tp=1)
    tie = np.array([[1, 1, 2, 2], [0, 0, 0, 0]], dtype=np.uint8)  # a tie goes to class 1
    res = detection_scores(gt, {1: 1}, gt, tie, radius=1, class_ids=[1])
    assert res.class_counts[1] == ClassCounts(tp=1)


def test_detection_without_types_and_type_errors() -> None:
    pred, gt = points_map(PRED_SPEC), points_map(GT_SPEC)
    res = detection_scores(pred, None, gt, None, radius=3)
    assert (res.tp, res.fp, res.fn) == (4, 2, 1)
    assert res.per_class == {} and res.same_type is None and math.isnan(res.type_accuracy)
    with pytest.raises(ValueError, match="both"):
        detection_scores(pred, PRED_CLASSES, gt, None, radius=3)
    with pytest.raises(ValueError, match="instance id 5"):
        detection_scores(pred, PRED_CLASSES, gt, {1: 1, 2: 1, 3: 2, 4: 2}, radius=3)
    with pytest.raises(ValueError, match="lookup table"):
        detection_scores(pred, np.zeros(5, dtype=int), gt, GT_CLASSES, radius=3)
    with pytest.raises(ValueError, match="type map shape"):
        detection_scores(pred, PRED_CLASSES, gt, np.zeros((3, 3), dtype=int), radius=3)


def test_detection_results_pool_by_adding_counts() -> None:
    pred, gt = points_map(PRED_SPEC), points_map(GT_SPEC)
    one = detection_scores(pred, PRED_CLASSES, gt, GT_CLASSES, radius=3, class_ids=[1, 2])
    perfect = detection_scores(gt, GT_CLASSES, gt, GT_CLASSES, radius=3, class_ids=[1, 2])
    both = DetectionResult.pooled([one, perfect])
    assert (both.tp, both.fp, both.fn) == (9, 2, 1)
    # Class 1 adds TP 3 from the perfect image: 2·4 / (8 + 2 + 2 + 1 + 1).
    assert both.per_class[1] == pytest.approx(8 / 14)
    assert both.type_accuracy == pytest.approx(7 / 9)
    assert perfect.f1_d == 1.0 and perfect.per_class == {1: 1.0, 2: 1.0}


# --------------------------------------------------------------------------- multi-class PQ, R²


def multiclass_images() -> list[tuple[np.ndarray, dict[int, int], np.ndarray, dict[int, int]]]:
    """Image 1: two squares, GT classes 1 and 2, both predicted class 1.
    Image 2: the shifted nucleus (IoU 0.6) of class 2, predicted class 2, nothing else."""
    gt1 = two_squares()
    gt2 = np.zeros((6, 6), dtype=np.int32)
    gt2[0:3, 0:4] = 4
    pred2 = np.zeros((6, 6), dtype=np.int32)
    pred2[0:3, 1:5] = 8
    return [(gt1 * 10, {10: 1, 20: 1}, gt1, {1: 1, 2: 2}), (pred2, {8: 2}, gt2, {4: 2})]


def test_multiclass_pq_by_hand() -> None:
    """Class 1: image 1 TP 1 (IoU 1), FP 1 (the class-2 nucleus called 1); image 2 nothing.
    Pooled PQ_1 = [1 / (1 + 0.5)] · 1 = 2/3.
    Class 2: image 1 FN 1; image 2 TP 1 (IoU 0.6). Pooled DQ = 1 / 1.5, SQ 0.6, PQ_2 = 0.4.
    mPQ+ = (2/3 + 0.4) / 2.
    PanNuke: image 1 PQ_1 = 2/3, PQ_2 = 0 -> 1/3; image 2 PQ_1 skipped (no GT), PQ_2 = 0.6.
    Counts per image (class 1, class 2): pred [2, 0], [0, 1]; GT [1, 1], [0, 1].
    R²_1 = 1 - (1 + 0) / 0.5 = -1; GT class 2 is constant and mispredicted -> 0."""
    res = multiclass_pq(multiclass_images(), class_ids=[1, 2])
    assert (res.per_class[1].tp, res.per_class[1].fp, res.per_class[1].fn) == (1, 1, 0)
    assert (res.per_class[2].tp, res.per_class[2].fp, res.per_class[2].fn) == (1, 0, 1)
    assert res.per_class[1].pq == pytest.approx(2 / 3)
    assert res.per_class[2].pq == pytest.approx(0.4)
    assert res.mpq_plus == pytest.approx((2 / 3 + 0.4) / 2)
    assert res.per_class_image_mean == pytest.approx({1: 2 / 3, 2: 0.3})
    assert res.mpq_image_mean == pytest.approx((1 / 3 + 0.6) / 2)
    assert res.pred_counts.tolist() == [[2, 0], [0, 1]]
    assert res.gt_counts.tolist() == [[1, 1], [0, 1]]
    assert res.r2 == pytest.approx({1: -1.0, 2: 0.0})


def test_multiclass_pq_accepts_type_maps() -> None:
    acc = MulticlassPQ([1, 2])
    for pred, pred_types, gt, gt_types in multiclass_images():
        pred_map = np.zeros(pred.shape, dtype=np.uint8)
        for i, c in pred_types.items():
            pred_map[pred == i] = c
        acc.update(pred, pred_map, gt, gt_types)
    assert acc.n_images == 2
    assert acc.result().mpq_plus == pytest.approx((2 / 3 + 0.4) / 2)


def test_multiclass_pq_masks_type_maps_pixel_by_pixel_like_conic() -> None:
    """A GT nucleus of 12 px whose type map says 9 px class 1 and 3 px class 2 becomes a
    class-1 nucleus of 9 px (IoU 9/12 with the class-1 prediction) and a class-2 one (missed)."""
    gt = np.zeros((6, 6), dtype=np.int32)
    gt[0:3, 0:4] = 1
    type_map = np.where(gt > 0, 1, 0).astype(np.uint8)
    type_map[0:3, 3] = 2
    acc = MulticlassPQ([1, 2])
    acc.update(gt, {1: 1}, gt, type_map)
    res = acc.result()
    assert res.per_class[1].iou_sum == pytest.approx(0.75)
    assert (res.per_class[2].tp, res.per_class[2].fn) == (0, 1)
    assert all(math.isnan(v) for v in res.r2.values())  # one image: R² undefined


def test_multiclass_pq_class_absent_everywhere_is_left_out() -> None:
    res = multiclass_pq(multiclass_images(), class_ids=[1, 2, 3])
    assert math.isnan(res.per_class[3].pq)
    assert res.mpq_plus == pytest.approx((2 / 3 + 0.4) / 2)


def test_multiclass_pq_checks_arguments() -> None:
    with pytest.raises(ValueError, match="class_ids"):
        MulticlassPQ([0, 1])
    gt = two_squares()
    with pytest.raises(ValueError, match="required"):
        MulticlassPQ([1]).update(gt, None, gt, {1: 1, 2: 1})


def test_count_r2_by_hand() -> None:
    gt = np.array([[1, 5], [2, 5], [3, 5]])
    # Class 0: residuals 0, 0, 1 over a GT spread of 2 -> 1 - 1/2. Class 1: constant, exact.
    assert count_r2(np.array([[1, 5], [2, 5], [4, 5]]), gt).tolist() == [0.5, 1.0]
    assert count_r2(np.array([[1, 5], [2, 5], [3, 6]]), gt).tolist() == [1.0, 0.0]


def test_count_r2_checks_arguments() -> None:
    with pytest.raises(ValueError, match="at least two"):
        count_r2(np.ones((1, 2)), np.ones((1, 2)))
    with pytest.raises(ValueError, match=r"\(3, 1\).*\(3, 2\)"):
        count_r2(np.ones((3, 1)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="n_images, n_classes"):
        count_r2(np.ones(3), np.ones(3))
