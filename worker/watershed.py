"""The label half of HoVer-Net post-processing: maps → marker-controlled watershed labels.

:func:`instance_labels` is steps 1–7 of the algorithm described in :mod:`worker.postprocess`
(foreground, HV edge strength, energy, markers, watershed), with the same arithmetic as the
official code. The edge strength is :mod:`worker.hv_edges`; the watershed runs per connected
component of the foreground (:mod:`worker.component_watershed`, which says why that is exactly
the whole-map result). Where the foreground's raveled pixels are known, passes over the whole
map are replaced by passes over them (the foreground is a small share of a map).
"""

from __future__ import annotations

import logging

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.component_watershed import Components, component_watershed, label_components
from worker.hv_edges import edge_response, edge_strength, hv_unit, sobel_gain

__all__ = ["edge_response", "foreground_components", "hv_unit", "instance_labels", "sobel_gain"]

logger = logging.getLogger(__name__)


def foreground_components(
    np_prob: NDArray[np.float32], threshold: float, min_size: int,
) -> tuple[NDArray[np.bool_], NDArray[np.intp], Components]:
    """Foreground ``np_prob >= threshold`` without 4-connected components under ``min_size``
    pixels, its raveled pixels (ascending) and those components."""
    # The official comparison is float32 map against a Python float, i.e. in float32.
    fg = np_prob >= np.float32(threshold)
    index = np.flatnonzero(fg)
    components = label_components(fg, index, min_size)
    if not components.kept[1:].all():
        # The dropped pixels are found among the thresholded ones, not by a lookup over the map.
        keep = components.kept[components.ids.ravel()[index]]
        fg.ravel()[index[~keep]] = False
        index = index[keep]
    return fg, index, components


def _energy(overall: NDArray[np.float32], fg: NDArray[np.bool_],
            index: NDArray[np.intp] | None = None) -> NDArray[np.float64]:
    # Official: (1.0 - overall) * blb with overall promoted to float64 by the int32 mask, then a
    # 3×3 Gaussian (sigma from the size) on float64. Same values, same dtype here; blurred in
    # place (OpenCV buffers the source rows it needs: the same values, one map fewer to fault in).
    raw = np.zeros(overall.shape, np.float64)
    if index is None:
        np.subtract(1.0, overall, out=raw, where=fg, dtype=np.float64)
    else:
        raw.ravel()[index] = np.subtract(1.0, overall.ravel()[index], dtype=np.float64)
    cv2.GaussianBlur(raw, (3, 3), 0, dst=raw)
    np.negative(raw, out=raw)
    return raw


def _fill_holes(binary: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """scipy's ``binary_fill_holes`` (4-connected background) by one flood fill from outside."""
    padded = np.pad(binary, 1)
    cv2.floodFill(padded, None, (0, 0), 2, flags=4)
    return (padded[1:-1, 1:-1] != 2).view(np.uint8)


def _markers(
    overall: NDArray[np.float32],
    fg: NDArray[np.bool_],
    threshold: float,
    opening: int,
    min_size: int,
    index: NDArray[np.intp] | None = None,
) -> NDArray[np.int32]:
    """Official markers: ids in raster order of their first pixel (``ndimage.label``), those
    under ``min_size`` pixels (counted before masking) dropped. ``index``: the foreground's
    raveled pixels, if known (the threshold is then compared there alone)."""
    # The official threshold compares float64 (promoted) values against a Python float.
    if index is None:
        seeds = fg & (overall < np.float64(threshold))
    else:
        seeds = np.zeros(fg.shape, np.bool_)
        seeds.ravel()[index] = overall.ravel()[index] < np.float64(threshold)
    filled = _fill_holes(seeds.view(np.uint8))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (opening, opening))
    opened = np.asarray(cv2.morphologyEx(filled, cv2.MORPH_OPEN, kernel), np.uint8)
    # The official code labels (ndimage.label: 4-connected, ids in raster order of each piece's
    # first pixel), then drops the pieces under min_size. OpenCV's SAUF labelling numbers pieces
    # in that same order (a piece's first provisional label is its smallest, and roots are
    # numbered by it), so one labelling, one count and one lookup table do both.
    count, raw = cv2.connectedComponentsWithAlgorithm(opened, 4, cv2.CV_32S, cv2.CCL_SAUF)
    labels = np.asarray(raw, np.int32)
    if min_size > 1 and count > 1:
        keep = np.bincount(labels[opened.view(np.bool_)], minlength=count) >= min_size
        keep[0] = False
        if not keep[1:].all():
            lut = np.zeros(count, np.int32)
            lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
            labels = lut[labels]
    return labels


def instance_labels(
    np_prob: NDArray[np.float32],
    hv: NDArray[np.float32],
    *,
    np_threshold: float,
    marker_threshold: float,
    sobel_ksize: int,
    min_size: int,
    opening: int,
    edge_range: tuple[float, float] | None = None,
) -> tuple[NDArray[np.int32], int, NDArray[np.intp]]:
    """Official ``__proc_np_hv`` on validated float32 maps: labels 1..n (in the order of the
    official marker ids), n and the foreground's pixels.

    Parameters
    ----------
    np_prob : (H, W) float32 ndarray
        Nucleus probability.
    hv : (2, H, W) float32 ndarray
        Horizontal then vertical distance maps.
    np_threshold, marker_threshold : float
        Foreground threshold and the edge strength excluded from markers.
    sobel_ksize, min_size, opening : int
        The size constants (see ``worker.postprocess.scaled_constants``).
    edge_range : (float, float), optional
        A fixed normalisation of the edge maps (see :func:`edge_strength`); None is the official
        per-map min-max.

    Returns
    -------
    labels : (H, W) int32 ndarray
        0 background, nuclei 1..n.
    n : int
        Number of nuclei.
    foreground : (k,) intp ndarray
        The foreground's raveled pixels, ascending (every nonzero label is among them).
    """
    fg, index, components = foreground_components(np_prob, np_threshold, min_size)
    if not components.kept.any():
        return np.zeros(fg.shape, np.int32), 0, index
    overall = edge_strength(hv, fg, sobel_ksize, edge_range, index)
    energy = _energy(overall, fg, index)
    markers = _markers(overall, fg, marker_threshold, opening, min_size, index)
    del overall
    labels, paths = component_watershed(energy, markers, fg, components, consecutive=True,
                                        fg_index=index)
    logger.debug("watershed paths: %s", dict(paths))
    return labels, int(labels.max()), index
