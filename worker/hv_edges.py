"""HV edge strength: the ``overall`` map of steps 2–4 of :mod:`worker.postprocess` (Sobel of each
HV channel, normalised per map as the official code does or on a fixed scale), split from
:mod:`worker.watershed`, which uses it.

Only the foreground's pixels of ``overall`` are ever read (the energy and the markers read it
through the foreground mask), so the per-map normalisation converts those alone: the map's
extremes are still taken over every pixel, and cv2.normalize given the chosen responses plus
those two extremes computes the same scale and shift and converts each value as it would in the
whole map (``tests/worker/test_hv_edges.py`` checks it bit for bit, ties and tiny maps included).
"""

from __future__ import annotations

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["edge_response", "edge_strength", "hv_unit", "sobel_gain"]


def _minmax32(image: NDArray) -> NDArray[np.float32]:
    """cv2's NORM_MINMAX to [0, 1] as float32 (a constant map becomes all zeros)."""
    out = np.empty(image.shape, np.float32)
    cv2.normalize(image, out, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    return out


def _fg_minmax32(image: NDArray, index: NDArray[np.intp]) -> NDArray[np.float32]:
    """``_minmax32(image).ravel()[index]`` without converting the other pixels: cv2.normalize of
    the chosen values with the map's extremes appended (padded to at least 64 values, so that
    OpenCV converts them on its vector path like the whole map's) finds the same extremes, hence
    the same scale and shift, and converts element by element."""
    # numpy's reductions find the same two values as OpenCV's, several times faster.
    lo, hi = float(image.min()), float(image.max())
    values = np.full(max(index.size + 2, 64), lo, np.float64)
    values[:index.size] = image.ravel()[index]
    values[-1] = hi
    return _minmax32(values)[:index.size]


def edge_strength(hv: NDArray[np.float32], fg: NDArray[np.bool_], ksize: int,
                  edge_range: tuple[float, float] | None = None,
                  index: NDArray[np.intp] | None = None) -> NDArray[np.float32]:
    """``max(1 - norm(sobel_h), 1 - norm(sobel_v))`` on the foreground (raveled ``index``),
    0 elsewhere (the only values ever read are the foreground's).

    ``edge_range`` None is the official normalisation: min-max over every pixel of this map,
    so the result depends on what else the map holds (a region's extent moves it). A range
    ``(lo, hi)`` instead maps the HV channels from their fixed [-1, 1] to [0, 1] and the Sobel
    responses, as fractions of the kernel's largest possible response, from ``[lo, hi]`` to
    [0, 1] (clipped): every pixel then depends on its neighbourhood alone."""
    if index is None:
        index = np.flatnonzero(fg)
    if edge_range is None:
        overall = _fg_minmax32(cv2.Sobel(_minmax32(hv[0]), cv2.CV_64F, 1, 0, ksize=ksize), index)
        edges_v = _fg_minmax32(cv2.Sobel(_minmax32(hv[1]), cv2.CV_64F, 0, 1, ksize=ksize), index)
    else:
        overall = _fixed_edges(hv[0], 1, 0, ksize, edge_range).ravel()[index]
        edges_v = _fixed_edges(hv[1], 0, 1, ksize, edge_range).ravel()[index]
    # max(1 - a, 1 - b) == 1 - min(a, b), exactly, in float32 (times 1 on the foreground).
    np.minimum(overall, edges_v, out=overall)
    out = np.zeros(fg.shape, np.float32)
    out.ravel()[index] = np.subtract(np.float32(1.0), overall)
    return out


def sobel_gain(ksize: int) -> float:
    """The largest response OpenCV's Sobel first derivative of aperture ``ksize`` can give on
    an image within [0, 1]: the sum of its kernel's positive taps."""
    deriv, smooth = cv2.getDerivKernels(1, 0, ksize)
    return float(np.clip(deriv, 0, None).sum() * smooth.sum())


def hv_unit(channel: NDArray[np.floating]) -> NDArray[np.float32]:
    """An HV channel mapped from its fixed range [-1, 1] to [0, 1] (clipped)."""
    out = np.asarray(channel, np.float32) + np.float32(1.0)
    np.multiply(out, np.float32(0.5), out=out)
    return np.clip(out, 0.0, 1.0, out=out)


def edge_response(channel: NDArray[np.floating], dx: int, dy: int, ksize: int) -> NDArray[np.float64]:
    """Sobel of one HV channel on the fixed scale, as a fraction of the kernel's gain."""
    response = np.asarray(cv2.Sobel(hv_unit(channel), cv2.CV_64F, dx, dy, ksize=ksize), np.float64)
    return np.divide(response, sobel_gain(ksize), out=response)


def _fixed_edges(channel: NDArray[np.float32], dx: int, dy: int, ksize: int,
                 edge_range: tuple[float, float]) -> NDArray[np.float32]:
    lo, hi = edge_range
    response = edge_response(channel, dx, dy, ksize)
    response -= lo
    response /= hi - lo
    return np.clip(response, 0.0, 1.0).astype(np.float32)
