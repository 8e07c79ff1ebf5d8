"""Per-nucleus measurements of a label image, and the checks of the maps they are made from.

:func:`measure_nuclei` is the per-instance half of HoVer-Net post-processing
(:func:`worker.postprocess.hover_instances` calls it on its labels; the boundary family on its
own): per-pixel sums and moments by bincounts over the whole map, and every outline traced in one
batch; only the hull, the perimeter and the record itself are made per nucleus.
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.contours import pixel_edge_rings
from worker.nuclei import Nucleus

__all__ = ["MAX_TYPES", "as_float32", "check_map", "check_types", "measure", "measure_nuclei",
           "pixel_boxes"]

MAX_TYPES = 256
"""Most type channels (or indices) accepted: bounds the (nuclei × types) vote table."""


# --------------------------------------------------------------------------- input checks


def check_map(name: str, array: object, ndim: int) -> NDArray:
    """``array`` as a non-empty, finite, numeric ndarray of ``ndim`` dimensions, else ValueError
    naming it ``name``."""
    arr = np.asarray(array)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric, got dtype {arr.dtype} (shape {arr.shape})")
    if min(arr.shape, default=0) == 0:
        raise ValueError(f"{name} must not be empty, got shape {arr.shape}")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values (shape {arr.shape})")
    return arr


def as_float32(arr: NDArray) -> NDArray[np.float32]:
    """A C-contiguous float32 view or copy of a map."""
    # The official code casts every map to float32 first; float32 input is used as is.
    return np.ascontiguousarray(arr, dtype=np.float32)


def check_types(types: object, shape: tuple[int, int]) -> NDArray | None:
    """The validated (H, W) type indices or (C, H, W) type probabilities, or None (untyped)."""
    if types is None:
        return None
    arr = np.asarray(types)
    if arr.ndim == 2:
        if arr.shape != shape:
            raise ValueError(f"types (H, W) must match np_prob {shape}, got shape {arr.shape}")
        if arr.dtype.kind not in "biu":
            raise ValueError(
                f"types as an (H, W) map must be integer class indices, got dtype {arr.dtype} "
                f"(shape {arr.shape}); pass (C, H, W) probabilities instead"
            )
        low, high = int(arr.min()), int(arr.max())
        if low < 0 or high >= MAX_TYPES:
            raise ValueError(
                f"types (H, W) must be >= 0 and < {MAX_TYPES}, got values {low}..{high}"
            )
        return arr
    if arr.ndim == 3:
        if arr.shape[1:] != shape or not 1 <= arr.shape[0] <= MAX_TYPES:
            raise ValueError(
                f"types (C, H, W) must have H, W = {shape} and 1 <= C <= {MAX_TYPES}, "
                f"got shape {arr.shape}"
            )
        check_map("types", arr, 3)
        return arr
    raise ValueError(f"types must be None, (H, W) or (C, H, W), got shape {arr.shape}")


# --------------------------------------------------------------------------- measurements


def _pixel_type(types: NDArray, flat_index: NDArray[np.intp]) -> NDArray[np.intp]:
    """Type index of the given raveled pixels, from an (H, W) map or (C, H, W) probabilities."""
    if types.ndim == 2:
        return types.ravel()[flat_index].astype(np.intp)
    probs = types.reshape(types.shape[0], -1)[:, flat_index]
    return np.argmax(probs, axis=0)


def _type_votes(
    inst: NDArray[np.intp], pixel_type: NDArray[np.intp], n: int
) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Official vote per id 0..n: majority type; a background majority yields to the most
    frequent other type. Ties go to the lower index, as the official stable sort does."""
    n_types = int(pixel_type.max()) + 1 if pixel_type.size else 1
    counts = np.bincount(inst * n_types + pixel_type, minlength=(n + 1) * n_types)
    counts = counts.reshape(n + 1, n_types)
    rows = np.arange(n + 1)
    best = np.argmax(counts, axis=1)
    if n_types > 1:
        other = 1 + np.argmax(counts[:, 1:], axis=1)
        best = np.where((best == 0) & (counts[rows, other] > 0), other, best)
    return best, counts[rows, best] / np.maximum(counts.sum(axis=1), 1)


def pixel_boxes(rows: NDArray[np.intp], cols: NDArray[np.intp], owner: NDArray[np.intp],
                k: int) -> NDArray[np.int64]:
    """(k, 4) boxes row_start, col_start, row_stop, col_stop of the pixels (``rows``, ``cols``)
    of each ``owner`` 0..k-1, every owner having a pixel: what ``ndimage.find_objects`` finds,
    without a pass over the whole map."""
    box = np.empty((4, k), np.int64)
    box[:2] = np.iinfo(np.int64).max
    box[2:] = -1
    np.minimum.at(box[0], owner, rows)
    np.minimum.at(box[1], owner, cols)
    np.maximum.at(box[2], owner, rows)
    np.maximum.at(box[3], owner, cols)
    box[2:] += 1
    return np.ascontiguousarray(box.T)


def _moments(
    x: NDArray[np.int64], y: NDArray[np.int64], owner: NDArray[np.intp], area: NDArray[np.float64],
) -> tuple[NDArray, ...]:
    """m10, m01 and the central moments mu20, mu11, mu02 of each nucleus (pixel ``x``, ``y`` in
    its box's frame) as ``cv2.moments(crop, binaryImage=True)`` gives them: exact integer sums,
    then OpenCV's formulas."""
    k = len(area)
    xf, yf = x.astype(np.float64), y.astype(np.float64)
    m10, m01 = np.bincount(owner, xf, k), np.bincount(owner, yf, k)
    m20, m11, m02 = (np.bincount(owner, xf * xf, k), np.bincount(owner, xf * yf, k),
                     np.bincount(owner, yf * yf, k))
    inv = 1.0 / area
    cx, cy = m10 * inv, m01 * inv
    return m10, m01, m20 - m10 * cx, m11 - m10 * cy, m02 - m01 * cy


def _eccentricity(
    mu20: NDArray[np.float64], mu11: NDArray[np.float64], mu02: NDArray[np.float64],
    area: NDArray[np.float64],
) -> NDArray[np.float64]:
    """Of the ellipse with the pixels' second moments (skimage's inertia tensor eigenvalues)."""
    a, b, c = mu20 / area, mu11 / area, mu02 / area
    # The per-nucleus code squared with Python's ``**`` (libm's pow), which is not always the
    # correctly rounded product numpy's squaring gives: one ulp apart in 4 of 9,477 nuclei.
    squared = np.array([half**2 for half in ((a - c) / 2.0).tolist()], np.float64)
    root = np.sqrt(np.maximum(squared + b * b, 0.0))
    major, minor = (a + c) / 2.0 + root, (a + c) / 2.0 - root
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(np.maximum(1.0 - minor / major, 0.0))
    return np.where(major > 0, ratio, 0.0)


def measure(
    labels: NDArray[np.integer],
    n: int,
    np_prob: NDArray[np.float32] | None,
    types: NDArray | None,
    *,
    within: NDArray[np.intp] | None = None,
) -> list[Nucleus]:
    """One record per id 1..n present in ``labels``: bincounts for the per-pixel sums and
    moments, every outline traced in one batch (:func:`worker.contours.pixel_edge_rings`).

    ``within``, ascending raveled pixels among which every nonzero label lies (the foreground),
    saves a pass over the whole map."""
    flat_index = np.flatnonzero(labels) if within is None else within[labels.ravel()[within] != 0]
    inst = labels.ravel()[flat_index].astype(np.intp)
    area = np.bincount(inst, minlength=n + 1)
    mean_prob = np.ones(n + 1)
    if np_prob is not None:
        prob_sum = np.bincount(inst, np_prob.ravel()[flat_index], minlength=n + 1)
        mean_prob = prob_sum / np.maximum(area, 1)
    if types is None:
        kind, kind_prob = np.zeros(n + 1, np.intp), np.ones(n + 1)
    else:
        kind, kind_prob = _type_votes(inst, _pixel_type(types, flat_index), n)
    present = np.flatnonzero(area[1:n + 1]) + 1
    if not len(present):
        return []
    slot = np.zeros(n + 1, np.intp)
    slot[present] = np.arange(len(present))
    owner = slot[inst]
    rows, cols = np.divmod(flat_index, labels.shape[1])
    boxes = pixel_boxes(rows, cols, owner, len(present))
    # Every pixel in its nucleus' box frame: the crop the per-nucleus code measured.
    y = rows - boxes[owner, 0]
    x = cols - boxes[owner, 1]
    pixels = area[present].astype(np.float64)
    m10, m01, mu20, mu11, mu02 = _moments(x, y, owner, pixels)
    rings = pixel_edge_rings(y, x, owner, boxes[:, 2:] - boxes[:, :2])
    offsets = rings.offsets.tolist()
    # Into the map's frame as the per-crop code did: float32 vertex plus the box corner.
    shift = np.repeat(boxes[:, [1, 0]], np.diff(rings.offsets), axis=0).astype(np.float32)
    placed = rings.vertices + shift
    columns = zip(
        present.tolist(), boxes.tolist(), pixels.tolist(), area[present].tolist(),
        (m10 / pixels + boxes[:, 1]).tolist(), (m01 / pixels + boxes[:, 0]).tolist(),
        kind[present].tolist(), kind_prob[present].tolist(), mean_prob[present].tolist(),
        _eccentricity(mu20, mu11, mu02, pixels).tolist(), strict=True,
    )
    nuclei = []
    for k, (label, (y0, x0, y1, x1), size, count, cx, cy, kind_k, prob_k, mean_k, ecc) in (
            enumerate(columns)):
        begin, end = offsets[k], offsets[k + 1]
        # The outline's hull is the hull of the pixel squares: solidity compares like with like.
        hull_area = cv2.contourArea(cv2.convexHull(rings.vertices[begin:end]))
        contour = placed[begin:end].copy()
        nuclei.append(Nucleus(
            label=label, centroid=(cx, cy), bbox=(x0, y0, x1, y1), area=count, contour=contour,
            type=kind_k, type_prob=prob_k, np_prob=mean_k,
            perimeter=float(cv2.arcLength(contour, closed=True)),
            solidity=min(1.0, size / max(hull_area, 1.0)), eccentricity=ecc,
        ))
    return nuclei


def measure_nuclei(
    labels: NDArray[np.integer],
    *,
    np_prob: NDArray[np.floating] | None = None,
    types: NDArray | None = None,
) -> list[Nucleus]:
    """Measure every nucleus of a label image (the per-instance half of
    :func:`worker.postprocess.hover_instances`).

    Parameters
    ----------
    labels : (H, W) integer ndarray
        0 background, ids >= 1; ids need not be consecutive (absent ids are skipped).
    np_prob : (H, W) float ndarray, optional
        Nucleus probability; its mean per nucleus becomes ``Nucleus.np_prob`` (1.0 if None).
    types : None, (H, W) int ndarray or (C, H, W) float ndarray, optional
        As for :func:`worker.postprocess.hover_instances`.

    Returns
    -------
    list of Nucleus
        In increasing label order, ``label`` being the id in ``labels``.
    """
    lab = check_map("labels", labels, 2)
    if lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer, got dtype {lab.dtype} (shape {lab.shape})")
    n = int(lab.max())
    if lab.min() < 0 or n > max(4 * lab.size, 2**16):
        raise ValueError(
            f"labels must be ids in 0..{max(4 * lab.size, 2**16)}, got {lab.min()}..{n}"
        )
    prob = None
    if np_prob is not None:
        prob_arr = check_map("np_prob", np_prob, 2)
        if prob_arr.shape != lab.shape:
            raise ValueError(f"np_prob must match labels {lab.shape}, got shape {prob_arr.shape}")
        prob = as_float32(prob_arr)
    type_arr = check_types(types, lab.shape)
    return measure(lab, n, prob, type_arr) if n else []
