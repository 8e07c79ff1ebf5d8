"""Known answers for the post-processing tests: a plain re-statement of official HoVer-Net.

Two things live here, both used only by tests:

* :func:`reference_instances` — the official HoVer-Net post-processing written out step by step
  the way the official code does it (whole-image passes, a per-instance loop for contours,
  centroids and the type vote). It is deliberately slow and obvious; ``worker.postprocess`` must
  give the same label image and the same per-nucleus values.
* :func:`target_maps` — HoVer-Net's training targets for an instance map (per-instance x/y offsets
  from the centre of mass, negatives and positives each scaled to -1..0 and 0..1), i.e. the maps a
  perfect network would predict.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.segmentation import watershed


def _drop_small(labels: NDArray[np.int32], min_size: int) -> NDArray[np.int32]:
    """Zero every labelled component with fewer than ``min_size`` pixels (official semantics)."""
    sizes = np.bincount(labels.ravel())
    out = labels.copy()
    out[(sizes < min_size)[labels]] = 0
    return out


def _minmax32(image: NDArray) -> NDArray[np.float32]:
    return np.asarray(cv2.normalize(image, None, alpha=0, beta=1,  # type: ignore[call-overload]
                                    norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F))


def reference_labels(
    np_prob: NDArray,
    hv: NDArray,
    *,
    np_threshold: float = 0.5,
    marker_threshold: float = 0.4,
    min_size: int = 10,
    ksize: int = 21,
    opening: int = 5,
) -> NDArray[np.int32]:
    """Official ``__proc_np_hv``: label image with the marker ids (not consecutive)."""
    blb_raw = np.asarray(np_prob, np.float32)
    h_raw = np.asarray(hv[0], np.float32)
    v_raw = np.asarray(hv[1], np.float32)

    blb = np.array(blb_raw >= np_threshold, dtype=np.int32)
    blb = ndimage.label(blb)[0]
    blb = _drop_small(blb, min_size)
    blb[blb > 0] = 1

    h_dir = _minmax32(h_raw)
    v_dir = _minmax32(v_raw)
    sobel_h = 1 - _minmax32(cv2.Sobel(h_dir, cv2.CV_64F, 1, 0, ksize=ksize))
    sobel_v = 1 - _minmax32(cv2.Sobel(v_dir, cv2.CV_64F, 0, 1, ksize=ksize))

    overall = np.maximum(sobel_h, sobel_v)
    overall = overall - (1 - blb)
    overall[overall < 0] = 0

    dist = (1.0 - overall) * blb
    dist = -np.asarray(cv2.GaussianBlur(dist, (3, 3), 0), np.float64)

    overall = np.array(overall >= marker_threshold, dtype=np.int32)
    marker = blb - overall
    marker[marker < 0] = 0
    marker = ndimage.binary_fill_holes(marker).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (opening, opening))
    marker = np.asarray(cv2.morphologyEx(marker, cv2.MORPH_OPEN, kernel))
    marker = ndimage.label(marker)[0]
    marker = _drop_small(marker, min_size)

    return watershed(dist, markers=marker, mask=blb).astype(np.int32)


@dataclass(frozen=True)
class RefNucleus:
    """What the official per-instance loop records for one instance."""

    label: int
    bbox: tuple[int, int, int, int]  # x_min, y_min, x_max, y_max (half-open)
    centroid: tuple[float, float]
    contour: NDArray[np.int32]  # (N, 2) x, y; None-like (len < 3) instances are still listed
    type: int
    type_prob: float


def reference_instances(
    np_prob: NDArray,
    hv: NDArray,
    type_map: NDArray | None = None,
    **options: float,
) -> tuple[NDArray[np.int32], list[RefNucleus]]:
    """Official ``process``: label image plus one record per instance id, in id order."""
    labels = reference_labels(np_prob, hv, **options)  # type: ignore[arg-type]
    records = []
    for inst_id in np.unique(labels)[1:]:
        inst = labels == inst_id
        rows = np.flatnonzero(inst.any(axis=1))
        cols = np.flatnonzero(inst.any(axis=0))
        rmin, rmax, cmin, cmax = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
        crop = inst[rmin:rmax, cmin:cmax].astype(np.uint8)
        moments = cv2.moments(crop)
        contours = cv2.findContours(crop, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[0]
        contour = contours[0].reshape(-1, 2).astype(np.int32) + (cmin, rmin)
        centroid = (moments["m10"] / moments["m00"] + cmin, moments["m01"] / moments["m00"] + rmin)
        inst_type, type_prob = 0, 1.0
        if type_map is not None:
            votes = np.asarray(type_map)[rmin:rmax, cmin:cmax][crop > 0].astype(np.int32)
            values, counts = np.unique(votes, return_counts=True)
            ranked = sorted(zip(values, counts, strict=True), key=lambda vc: vc[1], reverse=True)
            inst_type = int(ranked[0][0])
            if inst_type == 0 and len(ranked) > 1:
                inst_type = int(ranked[1][0])
            type_prob = float(dict(ranked)[inst_type] / (crop.sum() + 1.0e-6))
        records.append(RefNucleus(
            label=int(inst_id), bbox=(int(cmin), int(rmin), int(cmax), int(rmax)),
            centroid=(float(centroid[0]), float(centroid[1])), contour=contour,
            type=inst_type, type_prob=type_prob,
        ))
    return labels, records


def target_maps(inst: NDArray) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """HoVer-Net training targets of an instance map: ``(np_prob (H, W), hv (2, H, W))``.

    For each instance, x and y offsets from its centre of mass (rounded to a pixel, as the
    official target generator does); negative offsets are divided by the largest negative
    magnitude and positive ones by the largest positive value, so each lies in -1..1.
    """
    inst = np.asarray(inst, dtype=np.intp)
    n = int(inst.max()) + 1
    flat = inst.ravel()
    rows, cols = np.indices(inst.shape)
    counts = np.maximum(np.bincount(flat, minlength=n), 1).astype(np.float64)
    com_y = np.floor(np.bincount(flat, rows.ravel(), n) / counts + 0.5)
    com_x = np.floor(np.bincount(flat, cols.ravel(), n) / counts + 0.5)
    fg = inst > 0
    hv = np.zeros((2, *inst.shape), np.float32)
    for axis, offset in ((0, cols - com_x[inst]), (1, rows - com_y[inst])):
        neg = np.zeros(n)
        pos = np.zeros(n)
        np.minimum.at(neg, flat, offset.ravel())
        np.maximum.at(pos, flat, offset.ravel())
        neg = np.where(neg < 0, -neg, 1.0)
        pos = np.where(pos > 0, pos, 1.0)
        scaled = np.where(offset < 0, offset / neg[inst], offset / pos[inst])
        hv[axis] = np.where(fg, scaled, 0.0)
    return fg.astype(np.float32), hv
