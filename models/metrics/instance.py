"""Instance segmentation metrics: Dice, AJI, AJI+ and panoptic quality (DQ, SQ, PQ).

Definitions follow the HoVer-Net evaluation (Graham et al., 2019, section 4.3, and the authors'
``compute_stats``):

- AJI (Kumar et al., 2017): every GT nucleus takes the prediction with the highest IoU (a
  prediction may serve several GT nuclei); matched pairs add their intersection and union,
  GT nuclei overlapping nothing and predictions chosen by no GT nucleus add their area to the
  union. The reuse of predictions is what over-penalises merges.
- AJI+: the same sums over a unique one-to-one pairing that maximises the summed IoU.
- PQ (Kirillov et al., 2019): GT and prediction match when IoU > 0.5, which makes matches
  unique; DQ = TP / (TP + FP/2 + FN/2), SQ = mean IoU of the matches, PQ = DQ × SQ.

A score whose definition divides by zero (both maps empty) is NaN: "undefined", skipped by the
dataset means in :mod:`models.evaluate`, never silently 0 or 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from models.metrics._labels import (
    Overlap,
    check_instance_map,
    check_same_shape,
    max_weight_pairs,
    overlap,
)

__all__ = ["PQResult", "aji", "aji_plus", "aji_sums", "dice", "panoptic_quality"]


@dataclass(frozen=True)
class PQResult:
    """Panoptic quality of one image, or of counts summed over many.

    ``iou_sum`` is the summed IoU of the ``tp`` matched pairs, so results pool exactly by
    adding ``tp``, ``fp``, ``fn`` and ``iou_sum`` (see :meth:`from_counts`).
    """

    dq: float
    sq: float
    pq: float
    tp: int
    fp: int
    fn: int
    iou_sum: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int, iou_sum: float) -> PQResult:
        """Scores from match counts; all NaN when there is nothing to count."""
        denominator = tp + 0.5 * fp + 0.5 * fn
        if denominator == 0:
            return cls(math.nan, math.nan, math.nan, 0, 0, 0, 0.0)
        dq = tp / denominator
        sq = iou_sum / tp if tp else 0.0
        return cls(dq, sq, dq * sq, int(tp), int(fp), int(fn), float(iou_sum))

    def __add__(self, other: PQResult) -> PQResult:
        """Pool two results (dataset-level PQ)."""
        return PQResult.from_counts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.iou_sum + other.iou_sum,
        )


def _pair(pred: object, gt: object) -> Overlap:
    pred_arr = check_instance_map(pred, name="pred")
    gt_arr = check_instance_map(gt, name="gt")
    check_same_shape(pred_arr, gt_arr)
    return overlap(pred_arr, gt_arr)


def dice(pred: NDArray[np.integer], gt: NDArray[np.integer]) -> float:
    """Binary foreground Dice (HoVer-Net's "DICE"), ``2|P ∩ G| / (|P| + |G|)``.

    Parameters
    ----------
    pred, gt : (H, W) integer ndarray
        Instance maps (0 background); only foreground versus background matters.

    Returns
    -------
    float
        In [0, 1]; NaN when both maps are empty.
    """
    pred_arr = check_instance_map(pred, name="pred")
    gt_arr = check_instance_map(gt, name="gt")
    check_same_shape(pred_arr, gt_arr)
    p = pred_arr > 0
    g = gt_arr > 0
    total = int(p.sum()) + int(g.sum())
    if total == 0:
        return math.nan
    return 2.0 * int(np.count_nonzero(p & g)) / total


def _sums_for(ov: Overlap, chosen: NDArray[np.intp]) -> tuple[int, int]:
    """Overall (intersection, union) for AJI given the chosen pairs (indices into ``ov``)."""
    inter = int(ov.inter[chosen].sum())
    union = int(ov.union[chosen].sum())
    gt_matched = np.zeros(ov.gt.n, dtype=bool)
    gt_matched[ov.gt_index[chosen]] = True
    pred_used = np.zeros(ov.pred.n, dtype=bool)
    pred_used[ov.pred_index[chosen]] = True
    union += int(ov.gt.area[~gt_matched].sum()) + int(ov.pred.area[~pred_used].sum())
    return inter, union


def _best_pred_per_gt(ov: Overlap) -> NDArray[np.intp]:
    """Index of each overlapping GT nucleus's highest-IoU pair; ties go to the lower pred id."""
    if ov.inter.size == 0:
        return np.zeros(0, dtype=np.intp)
    order = np.lexsort((ov.pred_index, -ov.iou, ov.gt_index))
    gt_sorted = ov.gt_index[order]
    first = np.ones(order.size, dtype=bool)
    first[1:] = gt_sorted[1:] != gt_sorted[:-1]
    return order[first]


def aji_sums(
    pred: NDArray[np.integer], gt: NDArray[np.integer], *, plus: bool = False
) -> tuple[int, int]:
    """Overall intersection and union behind AJI (or AJI+ when ``plus``).

    Summing these over images and dividing once gives the dataset-level ("pooled") AJI.

    Parameters
    ----------
    pred, gt : (H, W) integer ndarray
        Instance maps, 0 background; ids need not be contiguous.
    plus : bool
        Use AJI+'s unique maximum-IoU pairing instead of AJI's best match per GT nucleus.

    Returns
    -------
    (int, int)
        Pixel counts ``(intersection, union)``.
    """
    ov = _pair(pred, gt)
    chosen = max_weight_pairs(ov, ov.iou) if plus else _best_pred_per_gt(ov)
    return _sums_for(ov, chosen)


def aji(pred: NDArray[np.integer], gt: NDArray[np.integer]) -> float:
    """Aggregated Jaccard Index (Kumar et al., 2017), as computed for HoVer-Net.

    Parameters
    ----------
    pred, gt : (H, W) integer ndarray
        Instance maps, 0 background; ids need not be contiguous.

    Returns
    -------
    float
        In [0, 1]; NaN when both maps are empty.
    """
    inter, union = aji_sums(pred, gt)
    return inter / union if union else math.nan


def aji_plus(pred: NDArray[np.integer], gt: NDArray[np.integer]) -> float:
    """AJI+ (Graham et al., 2019): AJI over a unique maximum-IoU pairing.

    Parameters
    ----------
    pred, gt : (H, W) integer ndarray
        Instance maps, 0 background; ids need not be contiguous.

    Returns
    -------
    float
        In [0, 1]; NaN when both maps are empty.
    """
    inter, union = aji_sums(pred, gt, plus=True)
    return inter / union if union else math.nan


def pq_from_overlap(ov: Overlap, iou_threshold: float) -> PQResult:
    """Panoptic quality from a prepared overlap table (shared with the multi-class PQ)."""
    iou = ov.iou
    if iou_threshold >= 0.5:
        # Above 0.5 a nucleus can match at most one partner, so thresholding is the matching.
        matched = np.flatnonzero(iou > iou_threshold)
    else:
        chosen = max_weight_pairs(ov, iou)
        matched = chosen[iou[chosen] > iou_threshold]
    tp = int(matched.size)
    return PQResult.from_counts(tp, ov.pred.n - tp, ov.gt.n - tp, float(iou[matched].sum()))


def panoptic_quality(
    pred: NDArray[np.integer], gt: NDArray[np.integer], *, iou_threshold: float = 0.5
) -> PQResult:
    """Detection, segmentation and panoptic quality of one instance map.

    Parameters
    ----------
    pred, gt : (H, W) integer ndarray
        Instance maps, 0 background; ids need not be contiguous.
    iou_threshold : float
        A pair matches when IoU is strictly greater than this, in [0, 1). Below 0.5 matches
        are no longer unique, so a maximum-IoU one-to-one assignment is made first.

    Returns
    -------
    PQResult
        ``dq``, ``sq``, ``pq`` in [0, 1] (NaN when both maps are empty), and the counts.
    """
    if not 0.0 <= iou_threshold < 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
    return pq_from_overlap(_pair(pred, gt), iou_threshold)
