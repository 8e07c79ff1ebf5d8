"""Shared machinery for the metrics: label validation, overlap tables, centroids, instance types.

Everything here works on whole arrays (``np.bincount``/``np.unique`` over paired labels), never
on one instance mask at a time, so a 1000×1000 map with a thousand nuclei costs a few sorts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import linear_sum_assignment

__all__: list[str] = []

InstanceTypes = Mapping[int, int] | NDArray[np.integer] | None
"""Classes of the instances of one map: ``{instance id: class}``, a 1-D lookup table indexed by
instance id, or an (H, W) per-pixel type map; ``None`` when untyped."""


@dataclass(frozen=True, eq=False)
class Labels:
    """An instance map relabelled densely.

    ``ids[k - 1]`` is the original id of dense label ``k``; ``dense`` is 0 for background.
    Ids are sorted, so dense order equals original id order (which fixes tie-breaking).
    """

    ids: NDArray[np.int64]
    dense: NDArray[np.intp]
    area: NDArray[np.int64]

    @property
    def n(self) -> int:
        """Number of instances."""
        return int(self.ids.size)


def check_instance_map(inst: object, *, name: str) -> NDArray[np.integer]:
    """Return ``inst`` as a 2-D non-negative integer array or raise naming ``name``."""
    if not isinstance(inst, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(inst).__name__}")
    if inst.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H, W) instance map, got shape {inst.shape}")
    if inst.dtype == np.bool_:
        return inst.astype(np.int64)
    if not np.issubdtype(inst.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {inst.dtype}")
    if inst.size and np.issubdtype(inst.dtype, np.signedinteger) and inst.min() < 0:
        raise ValueError(f"{name} has negative instance ids (min {inst.min()})")
    return inst


def check_same_shape(pred: NDArray[np.integer], gt: NDArray[np.integer]) -> None:
    """Raise ValueError naming both shapes when ``pred`` and ``gt`` differ."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred shape {pred.shape} differs from gt shape {gt.shape}")


def relabel(inst: NDArray[np.integer]) -> Labels:
    """Relabel an instance map to 1..n in increasing id order, with per-instance areas."""
    flat = inst.ravel()
    max_id = int(flat.max()) if flat.size else 0
    if max_id <= 4 * flat.size + 1024:
        # Ids small enough for a lookup table: linear time instead of a sort.
        present = np.bincount(flat, minlength=max_id + 1)
        ids = np.flatnonzero(present[1:]).astype(np.int64) + 1
        lut = np.zeros(max_id + 1, dtype=np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        dense = lut[inst]
        area = present[ids].astype(np.int64)
    else:
        uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        has_bg = uniq.size > 0 and uniq[0] == 0
        ids = uniq[1:] if has_bg else uniq
        dense = (inverse + (0 if has_bg else 1)).reshape(inst.shape).astype(np.intp)
        area = (counts[1:] if has_bg else counts).astype(np.int64)
        ids = ids.astype(np.int64)
    return Labels(ids=ids, dense=dense, area=area)


@dataclass(frozen=True, eq=False)
class Overlap:
    """Every (GT, prediction) instance pair that shares at least one pixel.

    ``gt_index``/``pred_index`` are 0-based dense indices, sorted by GT then prediction;
    ``inter`` is the number of shared pixels.
    """

    gt: Labels
    pred: Labels
    gt_index: NDArray[np.intp]
    pred_index: NDArray[np.intp]
    inter: NDArray[np.int64]

    @property
    def union(self) -> NDArray[np.int64]:
        """Pixel count of the union of each pair."""
        return self.gt.area[self.gt_index] + self.pred.area[self.pred_index] - self.inter

    @property
    def iou(self) -> NDArray[np.float64]:
        """Intersection over union of each pair (always > 0)."""
        return self.inter / self.union


def overlap(pred: NDArray[np.integer], gt: NDArray[np.integer]) -> Overlap:
    """Build the sparse contingency table of two instance maps of equal shape."""
    check_same_shape(pred, gt)
    g = relabel(gt)
    p = relabel(pred)
    both = (g.dense > 0) & (p.dense > 0)
    # One integer code per (gt, pred) pair; only overlapping pixels take part, so the table
    # stays as small as the number of touching pairs.
    codes = (g.dense[both].astype(np.int64) - 1) * max(p.n, 1) + (p.dense[both] - 1)
    uniq, counts = np.unique(codes, return_counts=True)
    return Overlap(
        gt=g,
        pred=p,
        gt_index=(uniq // max(p.n, 1)).astype(np.intp),
        pred_index=(uniq % max(p.n, 1)).astype(np.intp),
        inter=counts.astype(np.int64),
    )


def max_weight_pairs(ov: Overlap, weight: NDArray[np.float64]) -> NDArray[np.intp]:
    """Indices (into the overlap lists) of a unique GT↔prediction pairing maximising ``weight``.

    Hungarian assignment on the dense sub-matrix of instances that overlap anything; pairs the
    assignment makes between non-overlapping instances are dropped.
    """
    if ov.inter.size == 0:
        return np.zeros(0, dtype=np.intp)
    rows, row_pos = np.unique(ov.gt_index, return_inverse=True)
    cols, col_pos = np.unique(ov.pred_index, return_inverse=True)
    matrix = np.zeros((rows.size, cols.size), dtype=np.float64)
    matrix[row_pos, col_pos] = weight
    which = np.full((rows.size, cols.size), -1, dtype=np.intp)
    which[row_pos, col_pos] = np.arange(ov.inter.size)
    r, c = linear_sum_assignment(matrix, maximize=True)
    chosen = which[r, c]
    return np.sort(chosen[chosen >= 0])


def centroids(labels: Labels) -> NDArray[np.float64]:
    """(n, 2) float64 (row, col) centroids: the mean pixel position of each instance."""
    if labels.n == 0:
        return np.zeros((0, 2), dtype=np.float64)
    rr, cc = np.nonzero(labels.dense)
    lab = labels.dense[rr, cc]
    size = labels.n + 1
    sum_r = np.bincount(lab, weights=rr, minlength=size)[1:]
    sum_c = np.bincount(lab, weights=cc, minlength=size)[1:]
    return np.stack([sum_r, sum_c], axis=1) / labels.area[:, None]


def instance_classes(labels: Labels, types: InstanceTypes, *, name: str) -> NDArray[np.int64]:
    """(n,) class of each instance, in dense order.

    A per-pixel type map is reduced by majority vote over the instance's pixels; background
    (0) wins only when the instance has no typed pixel at all, as in HoVer-Net's
    post-processing. Ties go to the smaller class id.
    """
    if types is None:
        raise ValueError(f"{name} is required for class-aware metrics")
    if isinstance(types, Mapping):
        try:
            return np.array([int(types[int(i)]) for i in labels.ids], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"{name} has no class for instance id {exc.args[0]}") from exc
    if not isinstance(types, np.ndarray) or not np.issubdtype(types.dtype, np.integer):
        raise TypeError(f"{name} must be a mapping or an integer numpy array, got {types!r:.80}")
    if types.ndim == 1:
        if labels.n and types.size <= labels.ids[-1]:
            raise ValueError(
                f"{name} lookup table has {types.size} entries but instance ids go up to "
                f"{labels.ids[-1]}"
            )
        return types[labels.ids].astype(np.int64)
    if types.shape != labels.dense.shape:
        raise ValueError(
            f"{name} type map shape {types.shape} differs from its instance map shape "
            f"{labels.dense.shape}"
        )
    if types.size and types.min() < 0:
        raise ValueError(f"{name} has negative classes (min {types.min()})")
    fg = labels.dense > 0
    n_cls = int(types.max()) + 1 if types.size else 1
    votes = np.bincount(
        labels.dense[fg].astype(np.int64) * n_cls + types[fg],
        minlength=(labels.n + 1) * n_cls,
    ).reshape(labels.n + 1, n_cls)[1:]
    classes = np.zeros(labels.n, dtype=np.int64)
    if n_cls > 1:
        typed = votes[:, 1:].sum(axis=1) > 0
        classes[typed] = np.argmax(votes[typed, 1:], axis=1) + 1
    return classes


def pixel_classes(
    inst: NDArray[np.integer], labels: Labels, types: InstanceTypes, *, name: str
) -> NDArray[np.int64]:
    """(H, W) class of every foreground pixel (0 on background).

    A type map is used as it is, pixel by pixel, as CoNIC's multi-class PQ does; per-instance
    classes are painted onto their instances.
    """
    if isinstance(types, np.ndarray) and types.ndim == 2:
        if types.shape != inst.shape:
            raise ValueError(
                f"{name} type map shape {types.shape} differs from its instance map shape "
                f"{inst.shape}"
            )
        if not np.issubdtype(types.dtype, np.integer):
            raise TypeError(f"{name} type map must have an integer dtype, got {types.dtype}")
        return np.where(labels.dense > 0, types, 0).astype(np.int64)
    per_instance = instance_classes(labels, types, name=name)
    return np.concatenate([[0], per_instance])[labels.dense]
