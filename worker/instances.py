"""Per-nucleus measurements of a label image, and the checks of the maps they are made from.

:func:`measure_nuclei` is the per-instance half of HoVer-Net post-processing
(:func:`worker.postprocess.hover_instances` calls it on its labels; the boundary family on its
own): per-pixel sums by bincounts over the whole map, then one bounding-box crop per nucleus for
its outline and shape.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from worker.contours import pixel_edge_ring
from worker.nuclei import Nucleus

__all__ = ["MAX_TYPES", "as_float32", "check_map", "check_types", "measure", "measure_nuclei"]

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


def _shape(
    mask: NDArray[np.uint8], origin: tuple[int, int]
) -> tuple[tuple[float, float], NDArray[np.float32], float, float, float]:
    """Centroid, contour, perimeter, solidity and eccentricity of one nucleus crop."""
    m = cv2.moments(mask, binaryImage=True)
    area = m["m00"]
    x0, y0 = origin
    centroid = (m["m10"] / area + x0, m["m01"] / area + y0)
    # Outline of the largest 8-connected piece along its pixels' edges (area = pixel count).
    polygon = pixel_edge_ring(mask)
    # The outline's hull is the hull of the pixel squares: solidity compares like with like.
    hull = cv2.convexHull(polygon)
    solidity = min(1.0, area / max(cv2.contourArea(hull), 1.0))
    polygon[:, 0] += x0
    polygon[:, 1] += y0
    perimeter = cv2.arcLength(polygon, closed=True)
    # Eigenvalues of the covariance of the pixel coordinates (skimage's inertia tensor).
    a, b, c = m["mu20"] / area, m["mu11"] / area, m["mu02"] / area
    root = math.sqrt(max(((a - c) / 2.0) ** 2 + b * b, 0.0))
    major, minor = (a + c) / 2.0 + root, (a + c) / 2.0 - root
    eccentricity = math.sqrt(max(1.0 - minor / major, 0.0)) if major > 0 else 0.0
    return centroid, polygon, float(perimeter), float(solidity), eccentricity


def measure(
    labels: NDArray[np.integer],
    n: int,
    np_prob: NDArray[np.float32] | None,
    types: NDArray | None,
) -> list[Nucleus]:
    """One record per id 1..n present in ``labels``: bincounts for the per-pixel sums, then one
    bounding-box crop per nucleus for its shape."""
    flat_index = np.flatnonzero(labels)
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
    nuclei = []
    for i, box in enumerate(ndimage.find_objects(labels, max_label=n)):
        if box is None:
            continue
        label = i + 1
        rows, cols = box
        mask = (labels[rows, cols] == label).view(np.uint8)
        centroid, contour, perimeter, solidity, eccentricity = _shape(mask, (cols.start, rows.start))
        nuclei.append(Nucleus(
            label=label,
            centroid=centroid,
            bbox=(cols.start, rows.start, cols.stop, rows.stop),
            area=int(area[label]),
            contour=contour,
            type=int(kind[label]),
            type_prob=float(kind_prob[label]),
            np_prob=float(mean_prob[label]),
            perimeter=perimeter,
            solidity=solidity,
            eccentricity=eccentricity,
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
