"""The per-nucleus outline tracer and measurement as they were before issue 15's batched tracer.

Frozen copies of ``worker/contours.py`` ``pixel_edge_ring`` and ``worker/instances.py``
``measure`` (one ``cv2.findContours`` per nucleus crop): the reference the batched code must
reproduce vertex for vertex and field for field.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from worker.contours import PINCH_CUT
from worker.nuclei import Nucleus

__all__ = ["reference_eccentricity", "reference_measure", "reference_ring"]

_KERNEL = np.ones((3, 3), np.uint8)


def _largest_border(closure: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Outer border (x, y) of the largest piece of ``closure``, in tracing order, where the
    direction changes."""
    contours, _ = cv2.findContours(closure, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        raise ValueError("the mask has no foreground pixel")
    if len(contours) > 1:
        sizes = [cv2.contourArea(c) + len(c) for c in contours]
        best = contours[int(np.argmax(sizes))]
    else:
        best = contours[0]
    return np.asarray(best, np.int64).reshape(-1, 2)


def _corner_cells(cells: NDArray[np.int64]) -> NDArray[np.int64]:
    """The corner cells of a traced border, in order, with the concave corners the trace stepped
    past diagonally put back in place of the step's two edge cells."""
    following = np.concatenate([cells[1:], cells[:1]])
    # Diagonal steps only join a vertical and a horizontal edge cell (never two in a row): of
    # the two cells both touch, (x, next y) and (next x, y), the corner has odd coordinates.
    diagonal = (following != cells).all(axis=1)
    odd = (cells & 1) == 1
    out = cells.copy()
    swap = diagonal & odd[:, 0]
    out[swap, 1] = following[swap, 1]
    swap = diagonal & ~odd[:, 0]
    out[swap, 0] = following[swap, 0]
    return out[diagonal | odd.all(axis=1)]


def _turning(ring: NDArray[np.int64]) -> NDArray[np.int64]:
    """``ring`` without repeated and collinear vertices (all steps are axis-parallel)."""
    step = np.concatenate([ring[1:], ring[:1]]) - ring
    moves = step.any(axis=1)
    if not moves.all():
        ring = ring[moves]
        step = np.concatenate([ring[1:], ring[:1]]) - ring
    previous = np.concatenate([step[-1:], step[:-1]])
    return ring[(step != previous).any(axis=1)]


def _cut_pinches(ring: NDArray[np.int64], scale: float) -> NDArray[np.float64]:
    """``ring`` in the centre frame, each passage through a vertex visited twice replaced by a
    two-vertex chamfer (``scale``: centre-frame px per ring unit)."""
    key = ring[:, 0] * (int(ring[:, 1].max()) + 1) + ring[:, 1]
    order = np.sort(key)
    out = ring.astype(np.float64) * scale - 1.0
    same = order[1:] == order[:-1]
    if not same.any():
        return out
    repeated = np.isin(key, order[1:][same])
    points: list[NDArray[np.float64]] = []
    n = len(ring)
    for i in range(n):
        if not repeated[i]:
            points.append(out[i][None])
            continue
        incoming = np.sign(out[i] - out[i - 1])
        outgoing = np.sign(out[(i + 1) % n] - out[i])
        points.append(np.stack([out[i] - PINCH_CUT * incoming, out[i] + PINCH_CUT * outgoing]))
    return np.concatenate(points)


def reference_ring(mask: NDArray) -> NDArray[np.float32]:
    """Outline of the largest 8-connected piece of ``mask`` along its pixels' edges.

    Parameters
    ----------
    mask : (H, W) ndarray
        Non-zero = inside; at least one pixel inside.

    Returns
    -------
    (N, 2) float32 ndarray
        Ring vertices (x, y), not closed, in the frame where pixel ``(r, c)`` is centred on
        ``(c, r)`` (so its corners are at half-integers), only where the outline turns; the polygon
        is valid and its area is the piece's pixel count (holes filled; plus ``PINCH_CUT**2`` per
        corner where the piece touches itself).
    """
    pixels = np.asarray(mask)
    if pixels.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {pixels.shape}")
    h, w = pixels.shape
    # One cell of margin around the doubled grid keeps the traced border off the image edge.
    grid = np.zeros((2 * h + 3, 2 * w + 3), np.uint8)
    grid[2 : 2 * h + 2 : 2, 2 : 2 * w + 2 : 2] = pixels != 0
    closure = np.asarray(cv2.dilate(grid, _KERNEL), np.uint8)
    ring = _turning(_corner_cells(_largest_border(closure)))
    # Corner cell 2k + 1 is the corner between pixels k - 1 and k, at k - 0.5 in the centre frame.
    return _cut_pinches(ring, 0.5).astype(np.float32)



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
    polygon = reference_ring(mask)
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


def reference_measure(
    labels: NDArray[np.integer],
    n: int,
    np_prob: NDArray[np.float32] | None,
    types: NDArray | None,
    *,
    within: NDArray[np.intp] | None = None,
) -> list[Nucleus]:
    """One record per id 1..n present in ``labels``: bincounts for the per-pixel sums, then one
    bounding-box crop per nucleus for its shape. ``within`` (a speed hint of today's
    ``measure``, which ``hover_instances`` passes) is accepted and ignored: the frozen
    computation stays as it was."""
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


def reference_eccentricity(mu20: float, mu11: float, mu02: float, area: float) -> float:
    """The per-nucleus eccentricity formula of ``_shape`` above, on its own."""
    a, b, c = mu20 / area, mu11 / area, mu02 / area
    root = math.sqrt(max(((a - c) / 2.0) ** 2 + b * b, 0.0))
    major, minor = (a + c) / 2.0 + root, (a + c) / 2.0 - root
    return math.sqrt(max(1.0 - minor / major, 0.0)) if major > 0 else 0.0
