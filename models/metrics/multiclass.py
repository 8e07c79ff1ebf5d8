"""Multi-class panoptic quality and per-class count R² over a data set.

Two conventions for multi-class PQ exist and both are reported:

- **CoNIC mPQ+** (Graham et al., 2021/2024): for each class c, keep only the pixels whose class
  is c in both maps, compute PQ's TP, FP, FN and matched-IoU sum per image, *sum them over all
  images*, form PQ_c from the sums and average PQ_c over the classes. Classes rare in single
  images are then scored fairly.
- **PanNuke mPQ** (Gamper et al., 2020): PQ_c per image, skipped (not 0) for images without a
  GT nucleus of class c; an image's mPQ is the mean over its scored classes, the data set's is
  the mean over images (PanNuke then also averages over tissues, which we have no labels for).

Count R² (CoNIC task 2): per class, ``1 - Σ(pred - gt)² / Σ(gt - mean gt)²`` over images of the
per-image nucleus counts, as ``sklearn.metrics.r2_score`` with its defaults computes it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from models.metrics._labels import (
    InstanceTypes,
    check_instance_map,
    check_same_shape,
    overlap,
    pixel_classes,
    relabel,
)
from models.metrics.instance import PQResult, pq_from_overlap

__all__ = ["MulticlassPQ", "MulticlassPQResult", "count_r2", "multiclass_pq"]


def _mean_defined(values: Iterable[float]) -> float:
    """Mean of the finite values; NaN when there are none (no RuntimeWarning)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def count_r2(
    pred_counts: NDArray[np.number], gt_counts: NDArray[np.number]
) -> NDArray[np.float64]:
    """Coefficient of determination of predicted nucleus counts, per class.

    Parameters
    ----------
    pred_counts, gt_counts : (n_images, n_classes) numeric ndarray
        Nuclei of each class in each image; at least two images.

    Returns
    -------
    (n_classes,) float64 ndarray
        R² per class, at most 1 and unbounded below. A class whose GT count is the same in
        every image scores 1.0 if predicted exactly and 0.0 otherwise (scikit-learn's rule).
    """
    pred = np.asarray(pred_counts, dtype=np.float64)
    gt = np.asarray(gt_counts, dtype=np.float64)
    if pred.shape != gt.shape:
        raise ValueError(f"pred_counts shape {pred.shape} differs from gt_counts shape {gt.shape}")
    if gt.ndim != 2:
        raise ValueError(f"counts must have shape (n_images, n_classes), got {gt.shape}")
    if gt.shape[0] < 2:
        raise ValueError(f"R² needs at least two images, got {gt.shape[0]}")
    residual = ((gt - pred) ** 2).sum(axis=0)
    total = ((gt - gt.mean(axis=0)) ** 2).sum(axis=0)
    r2 = np.empty(gt.shape[1], dtype=np.float64)
    varies = total > 0
    r2[varies] = 1.0 - residual[varies] / total[varies]
    r2[~varies] = np.where(residual[~varies] == 0, 1.0, 0.0)
    return r2


@dataclass(frozen=True)
class MulticlassPQResult:
    """Multi-class PQ and count statistics of a data set; every dict is keyed by class id.

    ``per_class`` and ``mpq_plus`` are CoNIC's (pooled counts); ``per_class_image_mean`` and
    ``mpq_image_mean`` are PanNuke's (per-image, then averaged). A class with no nucleus in
    either map anywhere has NaN PQ and is left out of ``mpq_plus`` (CoNIC's script would count
    it as 0; when every class occurs, as in CoNIC, the two agree). ``r2`` is NaN with fewer
    than two images. ``pred_counts``/``gt_counts`` are (n_images, n_classes) in ``class_ids`` order.
    """

    class_ids: tuple[int, ...]
    per_class: dict[int, PQResult]
    mpq_plus: float
    per_class_image_mean: dict[int, float]
    mpq_image_mean: float
    r2: dict[int, float]
    pred_counts: NDArray[np.int64]
    gt_counts: NDArray[np.int64]


class MulticlassPQ:
    """Accumulates per-class PQ statistics image by image.

    Parameters
    ----------
    class_ids : sequence of int
        Non-zero classes to score (0 is background).
    iou_threshold : float
        Match threshold of PQ, as in :func:`models.metrics.panoptic_quality`.

    Examples
    --------
    >>> acc = MulticlassPQ([1, 2])
    >>> for pred, pred_types, gt, gt_types in images:  # doctest: +SKIP
    ...     acc.update(pred, pred_types, gt, gt_types)
    >>> acc.result().mpq_plus  # doctest: +SKIP
    """

    def __init__(self, class_ids: Sequence[int], *, iou_threshold: float = 0.5) -> None:
        ids = tuple(int(c) for c in class_ids)
        if not ids or min(ids) < 1 or len(set(ids)) != len(ids):
            raise ValueError(f"class_ids must be distinct positive ints, got {class_ids!r}")
        if not 0.0 <= iou_threshold < 1.0:
            raise ValueError(f"iou_threshold must be in [0, 1), got {iou_threshold}")
        self.class_ids = ids
        self.iou_threshold = iou_threshold
        self._images: list[list[PQResult]] = []
        self._pred_counts: list[list[int]] = []
        self._gt_counts: list[list[int]] = []

    def __repr__(self) -> str:
        return f"MulticlassPQ(class_ids={self.class_ids}, n_images={self.n_images})"

    @property
    def n_images(self) -> int:
        """Images added so far."""
        return len(self._images)

    def update(
        self,
        pred_inst: NDArray[np.integer],
        pred_types: InstanceTypes,
        gt_inst: NDArray[np.integer],
        gt_types: InstanceTypes,
    ) -> None:
        """Add one image.

        Parameters
        ----------
        pred_inst, gt_inst : (H, W) integer ndarray
            Instance maps, 0 background; ids need not be contiguous.
        pred_types, gt_types : mapping, (max_id + 1,) or (H, W) integer ndarray
            Per-instance classes (``{id: class}`` or a lookup table indexed by id), or a
            per-pixel type map, which is applied pixel by pixel as CoNIC does.
        """
        pred = check_instance_map(pred_inst, name="pred_inst")
        gt = check_instance_map(gt_inst, name="gt_inst")
        check_same_shape(pred, gt)
        pred_px = pixel_classes(pred, relabel(pred), pred_types, name="pred_types")
        gt_px = pixel_classes(gt, relabel(gt), gt_types, name="gt_types")
        results: list[PQResult] = []
        for c in self.class_ids:
            ov = overlap(np.where(pred_px == c, pred, 0), np.where(gt_px == c, gt, 0))
            results.append(pq_from_overlap(ov, self.iou_threshold))
        self._images.append(results)
        self._pred_counts.append([r.tp + r.fp for r in results])
        self._gt_counts.append([r.tp + r.fn for r in results])

    def result(self) -> MulticlassPQResult:
        """Scores over all images added so far (NaN where undefined)."""
        n_cls = len(self.class_ids)
        pooled: dict[int, PQResult] = {}
        image_mean: dict[int, float] = {}
        for i, c in enumerate(self.class_ids):
            column = [image[i] for image in self._images]
            pooled[c] = sum(column[1:], column[0]) if column else PQResult.from_counts(0, 0, 0, 0)
            # PanNuke skips an image for class c when its GT has no nucleus of class c.
            image_mean[c] = _mean_defined(r.pq for r in column if r.tp + r.fn > 0)
        per_image = [
            _mean_defined(r.pq for r in image if r.tp + r.fn > 0) for image in self._images
        ]
        pred_counts = np.array(self._pred_counts, dtype=np.int64).reshape(-1, n_cls)
        gt_counts = np.array(self._gt_counts, dtype=np.int64).reshape(-1, n_cls)
        if self.n_images >= 2:
            r2 = dict(zip(self.class_ids, count_r2(pred_counts, gt_counts).tolist(), strict=True))
        else:
            r2 = dict.fromkeys(self.class_ids, math.nan)
        return MulticlassPQResult(
            class_ids=self.class_ids,
            per_class=pooled,
            mpq_plus=_mean_defined(r.pq for r in pooled.values()),
            per_class_image_mean=image_mean,
            mpq_image_mean=_mean_defined(per_image),
            r2=r2,
            pred_counts=pred_counts,
            gt_counts=gt_counts,
        )


def multiclass_pq(
    images: Iterable[
        tuple[NDArray[np.integer], InstanceTypes, NDArray[np.integer], InstanceTypes]
    ],
    *,
    class_ids: Sequence[int],
    iou_threshold: float = 0.5,
) -> MulticlassPQResult:
    """Multi-class PQ (CoNIC mPQ+ and PanNuke mPQ) and count R² of a data set.

    Parameters
    ----------
    images : iterable of (pred_inst, pred_types, gt_inst, gt_types)
        One tuple per image, as taken by :meth:`MulticlassPQ.update`.
    class_ids : sequence of int
        Non-zero classes to score.
    iou_threshold : float
        PQ match threshold.

    Returns
    -------
    MulticlassPQResult
    """
    acc = MulticlassPQ(class_ids, iou_threshold=iou_threshold)
    for pred_inst, pred_types, gt_inst, gt_types in images:
        acc.update(pred_inst, pred_types, gt_inst, gt_types)
    return acc.result()
