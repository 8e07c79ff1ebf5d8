"""Evaluate predicted nuclei against ground truth: one image, a data set, or two label files.

Aggregation over images follows the literature, and where two conventions exist both are
reported, named after where they come from:

- ``instance.per_image_mean``: Dice, AJI, AJI+, DQ, SQ and PQ computed per image and averaged
  over images, as HoVer-Net, MoNuSeg and PanNuke's bPQ report them. Images where a score is
  undefined (both maps empty) are left out and counted in ``instance.n_undefined``.
- ``instance.pooled``: the same scores from counts summed over the data set (TP/FP/FN/IoU sums
  for PQ, intersection/union sums for AJI and Dice); large images weigh more.
- ``detection``: F1_d, precision, recall and type accuracy from centroid pairs pooled over the
  data set, as HoVer-Net's ``compute_stats`` does; ``classes[name].f1`` is eq. 8's F_c.
- ``classes[name].pq`` and ``mpq_plus``: CoNIC's multi-class PQ (pooled counts per class);
  ``classes[name].pq_image_mean`` and ``mpq_image_mean``: PanNuke's per-image multi-class PQ.
- ``classes[name].r2`` and ``r2_mean``: CoNIC's count R² over images.

Every returned dict is JSON-ready: plain ints, floats and strings, with ``None`` for NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from models.label_files import LabelFile, class_names_for, load_label_file
from models.metrics import (
    DetectionResult,
    InstanceTypes,
    MulticlassPQ,
    PQResult,
    aji_sums,
    detection_scores,
    panoptic_quality,
)

__all__ = [
    "DEFAULT_MPP",
    "PAIRING_RADIUS_UM",
    "evaluate_dataset",
    "evaluate_files",
    "evaluate_pair",
    "radius_for_mpp",
]

logger = logging.getLogger(__name__)

PAIRING_RADIUS_UM = 3.0
"""Centroid pairing radius in µm: 12 px at 0.25 µm/px (40×), 6 px at 0.5 µm/px (20×)."""

DEFAULT_MPP = 0.25
"""µm per pixel assumed by :func:`evaluate_files` when neither the call nor the files say."""

ImageTuple = tuple[NDArray[np.integer], InstanceTypes, NDArray[np.integer], InstanceTypes]


def radius_for_mpp(mpp: float) -> float:
    """Pairing radius in pixels at ``mpp`` µm per pixel (3 µm, HoVer-Net's 12 px at 40×)."""
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    return PAIRING_RADIUS_UM / mpp


def _num(value: float) -> float | None:
    """A JSON-safe float: NaN becomes None."""
    value = float(value)
    return None if math.isnan(value) else value


def _mean_defined(values: Iterable[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


@dataclass(frozen=True)
class _ImageStats:
    """Everything one image contributes to the data-set scores."""

    n_pred: int
    n_gt: int
    dice_sums: tuple[int, int]
    aji_sums: tuple[int, int]
    aji_plus_sums: tuple[int, int]
    pq: PQResult
    detection: DetectionResult


def _image_stats(
    pred: NDArray[np.integer],
    pred_types: InstanceTypes,
    gt: NDArray[np.integer],
    gt_types: InstanceTypes,
    *,
    radius: float,
    class_ids: Sequence[int] | None,
) -> _ImageStats:
    pq = panoptic_quality(pred, gt)
    fg_p = pred > 0
    fg_g = gt > 0
    return _ImageStats(
        n_pred=pq.tp + pq.fp,
        n_gt=pq.tp + pq.fn,
        dice_sums=(2 * int(np.count_nonzero(fg_p & fg_g)), int(fg_p.sum() + fg_g.sum())),
        aji_sums=aji_sums(pred, gt),
        aji_plus_sums=aji_sums(pred, gt, plus=True),
        pq=pq,
        detection=detection_scores(
            pred, pred_types, gt, gt_types, radius=radius, class_ids=class_ids
        ),
    )


def _detection_dict(det: DetectionResult, names: Mapping[int, str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        "f1": _num(det.f1_d),
        "precision": _num(det.precision),
        "recall": _num(det.recall),
        "tp": det.tp,
        "fp": det.fp,
        "fn": det.fn,
    }
    if det.same_type is not None:
        out["type_accuracy"] = _num(det.type_accuracy)
        out["f1_per_class"] = {names[c]: _num(f) for c, f in det.per_class.items()}
    return out


def _image_dict(stats: _ImageStats, names: Mapping[int, str]) -> dict[str, Any]:
    return {
        "n_pred": stats.n_pred,
        "n_gt": stats.n_gt,
        "dice": _num(_ratio(*stats.dice_sums)),
        "aji": _num(_ratio(*stats.aji_sums)),
        "aji_plus": _num(_ratio(*stats.aji_plus_sums)),
        "dq": _num(stats.pq.dq),
        "sq": _num(stats.pq.sq),
        "pq": _num(stats.pq.pq),
        "pq_counts": {
            "tp": stats.pq.tp,
            "fp": stats.pq.fp,
            "fn": stats.pq.fn,
            "iou_sum": stats.pq.iou_sum,
        },
        "detection": _detection_dict(stats.detection, names),
    }


def _class_table(class_names: Sequence[str] | None) -> dict[int, str]:
    """Class id → name for the scored classes (ids 1..n-1; entry 0 names the background)."""
    if not class_names or len(class_names) < 2:
        return {}
    names = [str(n) for n in class_names]
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be distinct, got {names}")
    return dict(enumerate(names))


def evaluate_pair(
    pred: NDArray[np.integer],
    gt: NDArray[np.integer],
    *,
    radius: float,
    pred_types: InstanceTypes = None,
    gt_types: InstanceTypes = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """All per-image metrics of one predicted instance map.

    Parameters
    ----------
    pred, gt : (H, W) integer ndarray
        Instance maps, 0 background; ids need not be contiguous.
    radius : float
        Centroid pairing radius in pixels (see :func:`radius_for_mpp`).
    pred_types, gt_types : mapping, (max_id + 1,) or (H, W) integer ndarray, optional
        Instance classes (see :func:`models.metrics.detection_scores`); with ``class_names``
        they add type accuracy and F_c per class.
    class_names : sequence of str, optional
        Name of each class id; entry 0 is the background.

    Returns
    -------
    dict
        ``n_pred``, ``n_gt``, ``dice``, ``aji``, ``aji_plus``, ``dq``, ``sq``, ``pq``,
        ``pq_counts`` and ``detection`` (JSON-ready, None where undefined).
    """
    names = _class_table(class_names)
    if not names:
        pred_types = gt_types = None
    class_ids = [c for c in names if c != 0]
    stats = _image_stats(pred, pred_types, gt, gt_types, radius=radius, class_ids=class_ids)
    return _image_dict(stats, names)


def _pooled_instance(stats: Sequence[_ImageStats]) -> dict[str, Any]:
    pq = PQResult.from_counts(
        sum(s.pq.tp for s in stats),
        sum(s.pq.fp for s in stats),
        sum(s.pq.fn for s in stats),
        sum(s.pq.iou_sum for s in stats),
    )

    def pooled(attr: str) -> float | None:
        pairs = [getattr(s, attr) for s in stats]
        return _num(_ratio(sum(p[0] for p in pairs), sum(p[1] for p in pairs)))

    return {
        "dice": pooled("dice_sums"),
        "aji": pooled("aji_sums"),
        "aji_plus": pooled("aji_plus_sums"),
        "dq": _num(pq.dq),
        "sq": _num(pq.sq),
        "pq": _num(pq.pq),
        "tp": pq.tp,
        "fp": pq.fp,
        "fn": pq.fn,
    }


def _class_results(
    acc: MulticlassPQ, detection: DetectionResult, names: Mapping[int, str]
) -> dict[str, Any]:
    res = acc.result()
    classes: dict[str, Any] = {}
    for i, c in enumerate(res.class_ids):
        pq = res.per_class[c]
        classes[names[c]] = {
            "id": c,
            "f1": _num(detection.per_class.get(c, math.nan)),
            "pq": _num(pq.pq),
            "dq": _num(pq.dq),
            "sq": _num(pq.sq),
            "tp": pq.tp,
            "fp": pq.fp,
            "fn": pq.fn,
            "pq_image_mean": _num(res.per_class_image_mean[c]),
            "r2": _num(res.r2[c]),
            "n_gt": int(res.gt_counts[:, i].sum()),
            "n_pred": int(res.pred_counts[:, i].sum()),
        }
    return {
        "classes": classes,
        "mpq_plus": _num(res.mpq_plus),
        "mpq_image_mean": _num(res.mpq_image_mean),
        "r2_mean": _num(_mean_defined(res.r2.values())),
    }


def evaluate_dataset(
    pairs: Iterable[ImageTuple],
    *,
    radius: float,
    class_names: Sequence[str] | None = None,
    image_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Evaluate a data set image by image and aggregate (see the module docstring).

    Parameters
    ----------
    pairs : iterable of (pred_inst, pred_types, gt_inst, gt_types)
        One tuple per image: (H, W) integer instance maps and their classes (a mapping, a
        lookup table by id, an (H, W) type map, or None when untyped).
    radius : float
        Centroid pairing radius in pixels (see :func:`radius_for_mpp`).
    class_names : sequence of str, optional
        Name of each class id, entry 0 the background; given, every image must carry types
        and the class-level results are filled in.
    image_names : sequence of str, optional
        Names for the ``per_image`` entries.

    Returns
    -------
    dict
        ``n_images``, ``radius_px``, ``instance`` (``per_image_mean``, ``pooled``,
        ``n_undefined``), ``detection``, ``classes``, ``mpq_plus``, ``mpq_image_mean``,
        ``r2_mean`` and ``per_image``; JSON-ready, None where undefined.
    """
    names = _class_table(class_names)
    class_ids = [c for c in names if c != 0]
    acc = MulticlassPQ(class_ids) if class_ids else None
    stats: list[_ImageStats] = []
    per_image: list[dict[str, Any]] = []
    for i, (pred, pred_types, gt, gt_types) in enumerate(pairs):
        label = image_names[i] if image_names is not None else str(i)
        if acc is not None and (pred_types is None or gt_types is None):
            raise ValueError(f"image {label}: class_names given but the image has no types")
        if acc is None:
            pred_types = gt_types = None
        try:
            s = _image_stats(pred, pred_types, gt, gt_types, radius=radius, class_ids=class_ids)
            if acc is not None:
                acc.update(pred, pred_types, gt, gt_types)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"image {label}: {exc}") from exc
        stats.append(s)
        per_image.append({"name": label, **_image_dict(s, names)})
    if not stats:
        raise ValueError("evaluate_dataset needs at least one image")
    keys = ("dice", "aji", "aji_plus", "dq", "sq", "pq")
    detection = DetectionResult.pooled(s.detection for s in stats)
    result: dict[str, Any] = {
        "n_images": len(stats),
        "radius_px": float(radius),
        "instance": {
            "per_image_mean": {k: _num(_mean_defined(_nan(p[k]) for p in per_image)) for k in keys},
            "pooled": _pooled_instance(stats),
            "n_undefined": sum(1 for p in per_image if p["pq"] is None),
        },
        "detection": _detection_dict(detection, names),
        "classes": {},
        "mpq_plus": None,
        "mpq_image_mean": None,
        "r2_mean": None,
    }
    if acc is not None:
        result.update(_class_results(acc, detection, names))
    result["per_image"] = per_image
    logger.info(
        "evaluated %d images: PQ %.4f (per-image mean)",
        len(stats),
        _nan(result["instance"]["per_image_mean"]["pq"]),
    )
    return result


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


# --------------------------------------------------------------------------- files


def _resolve_radius(
    radius: float | None, mpp: float | None, pred: LabelFile, gt: LabelFile
) -> tuple[float, float | None, str]:
    """(radius in px, mpp used, where the radius came from)."""
    if pred.mpp is not None and gt.mpp is not None and not math.isclose(
        pred.mpp, gt.mpp, rel_tol=0.01
    ):
        raise ValueError(f"pred mpp {pred.mpp} differs from gt mpp {gt.mpp}")
    if radius is not None:
        if not (math.isfinite(radius) and radius > 0):
            raise ValueError(f"radius must be a positive number of pixels, got {radius}")
        return float(radius), mpp, "radius"
    for value, source in ((mpp, "mpp"), (gt.mpp, "gt file"), (pred.mpp, "pred file")):
        if value is not None:
            return radius_for_mpp(value), value, source
    logger.warning("no resolution given or stored; assuming %s µm/px (40×)", DEFAULT_MPP)
    return radius_for_mpp(DEFAULT_MPP), DEFAULT_MPP, "default"


def evaluate_files(
    pred_path: str | Path,
    gt_path: str | Path,
    *,
    radius: float | None = None,
    mpp: float | None = None,
) -> dict[str, Any]:
    """Evaluate a prediction file against a ground-truth file (``hoverserve evaluate``).

    Parameters
    ----------
    pred_path, gt_path : str or Path
        ``.npz`` with ``inst`` (H, W) or (N, H, W) integer instance ids and optionally
        ``type_map`` (same shape), ``mpp``, ``names`` (N,) and ``class_names`` (entry 0 the
        background); or a single-channel ``.png``/``.tif`` label image (untyped).
    radius : float, optional
        Centroid pairing radius in pixels; overrides ``mpp``.
    mpp : float, optional
        µm per pixel, giving a radius of 3 µm; default the files' ``mpp``, else 0.25.

    Returns
    -------
    dict
        :func:`evaluate_dataset`'s result plus ``pred_path``, ``gt_path``, ``mpp`` and
        ``radius_source``. Classes are scored when both files have a ``type_map``.

    Raises
    ------
    ValueError
        A file is missing, unreadable, or its arrays do not match the other file's.
    """
    pred = load_label_file(pred_path)
    gt = load_label_file(gt_path)
    if pred.inst.shape != gt.inst.shape:
        raise ValueError(
            f"pred {pred_path} holds labels of shape {pred.inst.shape}, "
            f"gt {gt_path} of shape {gt.inst.shape}"
        )
    radius_px, mpp_used, source = _resolve_radius(radius, mpp, pred, gt)
    class_names = class_names_for(pred, gt)
    n = gt.inst.shape[0]

    def images() -> Iterable[ImageTuple]:
        for i in range(n):
            pred_t = pred.type_map[i] if class_names and pred.type_map is not None else None
            gt_t = gt.type_map[i] if class_names and gt.type_map is not None else None
            yield pred.inst[i], pred_t, gt.inst[i], gt_t

    result = evaluate_dataset(
        images(),
        radius=radius_px,
        class_names=class_names,
        image_names=gt.names or pred.names,
    )
    return {
        "pred_path": str(pred_path),
        "gt_path": str(gt_path),
        "mpp": mpp_used,
        "radius_source": source,
        **result,
    }
