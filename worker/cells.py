"""Cells from nuclei: constrained expansion of the nucleus label map and pixel-edge outlines.

Each nucleus grows by up to a fixed distance (QuPath's default cell expansion, 5 µm) into the
pixels nearer to it than to any other nucleus (``skimage.segmentation.expand_labels``), so cells
never overlap and always contain their nucleus. Outlines run along pixel edges, so a cell polygon's
area is its pixel count (:func:`worker.contours.pixel_edge_ring`, the nuclei's tracer).
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import NDArray

from worker.options import DEFAULT_EXPANSION_UM

__all__ = ["DEFAULT_EXPANSION_UM", "expand_nuclei", "trace_outlines"]



def expand_nuclei(labels: NDArray[np.integer], distance_px: float) -> NDArray[np.int32]:
    """Cell label map: every nucleus grown by up to ``distance_px`` pixels, never into another.

    Parameters
    ----------
    labels : (H, W) int ndarray
        Nucleus labels, 0 background.
    distance_px : float
        Largest growth, pixels of ``labels`` (Euclidean; 0 returns the nuclei).
    """
    from skimage.segmentation import expand_labels

    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 2-D integer image, got {lab.dtype} {lab.shape}")
    if not math.isfinite(distance_px) or distance_px < 0:
        raise ValueError(f"distance_px must be a finite number >= 0, got {distance_px!r}")
    if distance_px == 0 or not lab.any():
        return lab.astype(np.int32, copy=True)
    return np.asarray(expand_labels(lab, distance=distance_px), np.int32)


def trace_outlines(
    labels: NDArray[np.integer], wanted: NDArray[np.integer]
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Pixel-edge outline of each wanted label, as ragged (x, y) rings in pixel-index coordinates
    (pixel ``(r, c)`` spans ``c ± 0.5``, ``r ± 0.5``).

    Traced by :func:`worker.contours.pixel_edge_ring` (as the nuclei): a label in several pieces
    keeps its largest 8-connected piece, holes are filled, only turning vertices are kept. A wanted
    label absent from ``labels`` gets an empty ring.

    Returns
    -------
    vertices : (M, 2) float64 ndarray
        Rings one after the other, not closed.
    offsets : (N + 1,) int64 ndarray
        Ring ``i`` is ``vertices[offsets[i]:offsets[i + 1]]``.
    """
    from scipy import ndimage

    from worker.contours import pixel_edge_rings

    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 2-D integer image, got {lab.dtype} {lab.shape}")
    want = np.asarray(wanted, np.int64).reshape(-1)
    top = int(max(lab.max(initial=0), want.max(initial=0)))
    boxes = ndimage.find_objects(lab, max_label=top) if top > 0 else []
    present = np.array([0 < w <= len(boxes) and boxes[w - 1] is not None for w in want.tolist()],
                       bool)
    # Every present label traced once, all in one pass (the same tracer as the nuclei: pixel
    # edges, largest piece, pinches cut); a label wanted twice shares its ring.
    traced = np.unique(want[present])
    corner = np.array([[boxes[t - 1][0].start, boxes[t - 1][1].start] for t in traced.tolist()],
                      np.int64).reshape(-1, 2)
    shapes = np.array([[boxes[t - 1][0].stop - boxes[t - 1][0].start,
                        boxes[t - 1][1].stop - boxes[t - 1][1].start] for t in traced.tolist()],
                      np.int64).reshape(-1, 2)
    slot = np.full(top + 1, -1, np.intp)
    slot[traced] = np.arange(len(traced))
    rs, cs = np.nonzero(slot[lab] >= 0) if len(traced) else (np.zeros(0, np.intp),) * 2
    owner = slot[lab[rs, cs]]
    rings = pixel_edge_rings(rs - corner[owner, 0], cs - corner[owner, 1], owner, shapes)
    parts: list[NDArray[np.float64]] = []
    for label, here in zip(want.tolist(), present.tolist(), strict=True):
        if not here:
            parts.append(np.zeros((0, 2), np.float64))
            continue
        k = int(slot[label])
        parts.append(rings[k].astype(np.float64) + (corner[k, 1], corner[k, 0]))
    lengths = np.array([len(r) for r in parts], np.int64)
    vertices = np.concatenate(parts) if parts else np.zeros((0, 2), np.float64)
    return vertices, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
