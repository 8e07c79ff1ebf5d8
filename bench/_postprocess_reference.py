"""BASELINE — a frozen copy of ``worker/postprocess.py`` as of commit 72386b4 (before issue 15 part 2).

Kept only so ``bench/postprocess.py --baseline`` and the equality tests can time and compare
today's code against the code it replaced, in one run. Do not edit or import it from the product.

Original module docstring: HoVer-Net post-processing: probability and HV maps → labelled, measured nuclei.

:func:`hover_instances` reproduces the official HoVer-Net algorithm (``__proc_np_hv`` and
``process`` in vqdang/hover_net ``models/hovernet/post_proc.py``) step for step:

1. foreground = ``np_prob >= np_threshold``; 4-connected components smaller than ``min_size``
   pixels are dropped;
2. each HV channel is min-max normalised to [0, 1] over the whole map (``cv2.normalize``);
3. ``cv2.Sobel`` (64-bit output) of h along x and of v along y; each becomes
   ``1 - minmax(sobel)``;
4. ``overall = max(sobel_h, sobel_v)`` inside the foreground, 0 outside;
5. ``energy = -GaussianBlur((1 - overall) * foreground, 3×3)`` in float64;
6. markers = foreground where ``overall < marker_threshold``, holes filled, opened with an
   elliptical kernel, 4-connected components, those under ``min_size`` dropped;
7. ``skimage.segmentation.watershed(energy, markers, mask=foreground)``;
8. per instance: bbox, centroid (image moments), outer contour, and the type vote (majority of
   the per-pixel type; a background majority yields to the most frequent other type).

The label image is identical to the official one up to renumbering (official ids are the marker
ids, with gaps; here they are 1..n in the same order). The speed comes from doing exactly the
same arithmetic with cheaper means: boolean masks instead of int32 ones, hole filling by one
flood fill instead of iterated dilation, the watershed on the foreground's bounding box, and
per-instance measurements from bincounts plus one small crop per nucleus.

Constants scale with resolution. With ``s = 0.25 / mpp`` (so ``s = 1`` at 40×, ``0.5`` at 20×):

* Sobel kernel = nearest odd integer to ``20·s + 1`` (halves round up), clipped to [3, 31]
  (OpenCV's limit);
* ``min_size`` = ``ceil(10·s²)``, at least 1, for both foreground components and markers;
* opening ellipse = nearest odd integer to ``5·s`` (halves round up), at least 3;
* the 3×3 Gaussian is not scaled (as in TIAToolbox).

At ``mpp = 0.25`` these are the official 21, 10 and 5; at 0.5 µm/px they are 11, 3 and 3.

:func:`segment_maps` is what the pipeline and ``model evaluate`` call: the card's
:class:`PostprocessOptions` may ask for the maps to be upsampled (bilinear, by an integer factor)
before :func:`hover_instances`. A model working at 0.5 µm/px then traces outlines on a 0.25 µm/px
grid: the watershed boundaries fall between coarse pixels instead of on them, which measured +0.018
PQ on held-out CoNSeP for the 20× default model (docs/model-card.md).
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import cv2
import numpy as np
from numpy.typing import NDArray
from scipy import ndimage
from skimage.segmentation import watershed

from worker.nuclei import Nucleus

__all__ = [
    "MAX_UPSAMPLE",
    "HoverInstances",
    "PostprocessConstants",
    "PostprocessOptions",
    "hover_instances",
    "measure_nuclei",
    "scaled_constants",
    "segment_maps",
    "upsample_maps",
]

logger = logging.getLogger(__name__)

REFERENCE_MPP = 0.25
"""µm/px at which the official constants apply (40×)."""

_SOBEL_KSIZE = 21
_MIN_SIZE = 10
_OPENING = 5
_MAX_SOBEL_KSIZE = 31  # the largest aperture cv2.Sobel accepts
_MAX_TYPES = 256  # bounds the (nuclei × types) vote table
MAX_UPSAMPLE = 4
"""Largest ``upsample`` factor: 16x the map pixels already; more buys nothing at any model resolution."""


@dataclass(frozen=True, slots=True)
class PostprocessConstants:
    """Size constants of the algorithm at one resolution, in pixels."""

    sobel_ksize: int
    min_size: int
    opening: int


@dataclass(frozen=True, slots=True)
class HoverInstances:
    """Result of :func:`hover_instances`.

    Attributes
    ----------
    labels : (H, W) int32 ndarray
        0 background, nucleus ``i`` is ``i`` (1..n, consecutive).
    nuclei : list of Nucleus
        ``nuclei[i - 1].label == i``.
    """

    labels: NDArray[np.int32]
    nuclei: list[Nucleus] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.nuclei)

    def __repr__(self) -> str:
        return f"HoverInstances(shape={self.labels.shape}, n={len(self.nuclei)})"


@dataclass(frozen=True, slots=True)
class PostprocessOptions:
    """The post-processing a model asks for (its card's ``postprocess``), checked once.

    Attributes
    ----------
    np_threshold : float
        Foreground threshold on the nucleus probability.
    marker_threshold : float
        Edge strength from which pixels are excluded from the markers (official 0.4).
    upsample : int
        Factor (1..4) by which the maps are upsampled, bilinearly, before segmentation; 1 keeps
        the model's grid.
    """

    np_threshold: float = 0.5
    marker_threshold: float = 0.4
    upsample: int = 1

    KEYS: ClassVar[tuple[str, ...]] = ("np_threshold", "marker_threshold", "upsample")

    def __post_init__(self) -> None:
        for name in ("np_threshold", "marker_threshold"):
            value = getattr(self, name)
            if isinstance(value, bool) or not _finite_number(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if (isinstance(self.upsample, bool) or not isinstance(self.upsample, int | np.integer)
                or not 1 <= self.upsample <= MAX_UPSAMPLE):
            raise ValueError(f"upsample must be an integer in 1..{MAX_UPSAMPLE}, got {self.upsample!r}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PostprocessOptions:
        """Options from a card's ``postprocess`` (other keys ignored; missing ones default)."""
        return cls(**{k: values[k] for k in cls.KEYS if k in values})


def upsample_maps(
    np_prob: NDArray[np.floating], hv: NDArray[np.floating], types: NDArray | None, factor: int
) -> tuple[NDArray, NDArray, NDArray | None]:
    """The maps on a grid ``factor`` times finer: bilinear for probabilities and distances, nearest
    for a per-pixel type index. Pixel centres keep their place (``cv2.resize``'s half-pixel
    alignment), so fine pixel ``u`` sits at coarse position ``(u + 0.5) / factor - 0.5``."""
    if factor == 1:
        return np_prob, hv, types
    h, w = np.shape(np_prob)
    size = (w * factor, h * factor)

    def linear(a: NDArray) -> NDArray:
        return cv2.resize(_as_float32(a), size, interpolation=cv2.INTER_LINEAR)

    fine_types: NDArray | None = None
    if types is not None:
        t = np.asarray(types)
        if t.ndim == 3:
            fine_types = np.stack([linear(c) for c in t])
        else:
            fine_types = cv2.resize(t.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return linear(np_prob), np.stack([linear(c) for c in hv]), fine_types


def segment_maps(
    np_prob: NDArray[np.floating],
    hv: NDArray[np.floating],
    types: NDArray | None,
    *,
    mpp: float,
    options: PostprocessOptions,
) -> HoverInstances:
    """Nuclei of a model's maps (made at ``mpp`` µm/px) as its card asks: the maps upsampled by
    ``options.upsample``, then :func:`hover_instances` with constants for the finer grid.

    The labels and nuclei are in the pixels of the upsampled grid."""
    factor = options.upsample
    np_prob, hv, types = upsample_maps(np_prob, hv, types, factor)
    return hover_instances(np_prob, hv, types, mpp=mpp / factor, np_threshold=options.np_threshold,
                           marker_threshold=options.marker_threshold)


def _finite_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(value)


def _nearest_odd(value: float) -> int:
    return 2 * math.floor((value - 1.0) / 2.0 + 0.5) + 1


def scaled_constants(mpp: float = REFERENCE_MPP) -> PostprocessConstants:
    """Sobel aperture, minimum object size and opening size for maps at ``mpp`` µm/px.

    Parameters
    ----------
    mpp : float
        Resolution of the maps, µm per pixel (> 0).

    Returns
    -------
    PostprocessConstants
        Exactly (21, 10, 5) at 0.25 µm/px; see the module docstring for the scaling rule.
    """
    if not (isinstance(mpp, numbers.Real) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive finite number, got {mpp!r}")
    s = REFERENCE_MPP / float(mpp)
    ksize = min(max(_nearest_odd(20.0 * s + 1.0), 3), _MAX_SOBEL_KSIZE)
    # The tiny epsilon keeps exact products (10 · 1.0²) from rounding up through float noise.
    min_size = max(1, math.ceil(_MIN_SIZE * s * s - 1e-9))
    opening = max(3, _nearest_odd(_OPENING * s))
    return PostprocessConstants(sobel_ksize=ksize, min_size=min_size, opening=opening)


# --------------------------------------------------------------------------- input checks


def _check_map(name: str, array: object, ndim: int) -> NDArray:
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


def _as_float32(arr: NDArray) -> NDArray[np.float32]:
    # The official code casts every map to float32 first; float32 input is used as is.
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_types(types: object, shape: tuple[int, int]) -> NDArray | None:
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
        if low < 0 or high >= _MAX_TYPES:
            raise ValueError(
                f"types (H, W) must be >= 0 and < {_MAX_TYPES}, got values {low}..{high}"
            )
        return arr
    if arr.ndim == 3:
        if arr.shape[1:] != shape or not 1 <= arr.shape[0] <= _MAX_TYPES:
            raise ValueError(
                f"types (C, H, W) must have H, W = {shape} and 1 <= C <= {_MAX_TYPES}, "
                f"got shape {arr.shape}"
            )
        _check_map("types", arr, 3)
        return arr
    raise ValueError(f"types must be None, (H, W) or (C, H, W), got shape {arr.shape}")


# --------------------------------------------------------------------------- the algorithm


def _minmax32(image: NDArray) -> NDArray[np.float32]:
    """cv2's NORM_MINMAX to [0, 1] as float32 (a constant map becomes all zeros)."""
    out = np.empty(image.shape, np.float32)
    cv2.normalize(image, out, alpha=0, beta=1, norm_type=cv2.NORM_MINMAX, dtype=cv2.CV_32F)
    return out


def _drop_small(labels: NDArray[np.int32], min_size: int) -> NDArray[np.int32]:
    """Zero labelled components with fewer than ``min_size`` pixels, in place."""
    if min_size > 1:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        if small.any():
            labels[small[labels]] = 0
    return labels


def _foreground(np_prob: NDArray[np.float32], threshold: float, min_size: int) -> NDArray[np.bool_]:
    # The official comparison is float32 map against a Python float, i.e. in float32.
    fg = np_prob >= np.float32(threshold)
    if min_size > 1:
        labels, _ = ndimage.label(fg)
        fg = _drop_small(labels, min_size) > 0
    return fg


def _overall(hv: NDArray[np.float32], fg: NDArray[np.bool_], ksize: int) -> NDArray[np.float32]:
    """``max(1 - minmax(sobel_h), 1 - minmax(sobel_v))`` on the foreground, 0 elsewhere."""
    sobel_h = cv2.Sobel(_minmax32(hv[0]), cv2.CV_64F, 1, 0, ksize=ksize)
    overall = _minmax32(sobel_h)
    del sobel_h
    sobel_v = cv2.Sobel(_minmax32(hv[1]), cv2.CV_64F, 0, 1, ksize=ksize)
    edges_v = _minmax32(sobel_v)
    del sobel_v
    # max(1 - a, 1 - b) == 1 - min(a, b), exactly, in float32.
    np.minimum(overall, edges_v, out=overall)
    np.subtract(np.float32(1.0), overall, out=overall)
    overall[~fg] = 0.0
    return overall


def _energy(overall: NDArray[np.float32], fg: NDArray[np.bool_]) -> NDArray[np.float64]:
    # Official: (1.0 - overall) * blb with overall promoted to float64 by the int32 mask, then a
    # 3×3 Gaussian (sigma from the size) on float64. Same values, same dtype here.
    raw = np.zeros(overall.shape, np.float64)
    np.subtract(1.0, overall, out=raw, where=fg, dtype=np.float64)
    dist = np.empty_like(raw)
    cv2.GaussianBlur(raw, (3, 3), 0, dst=dist)
    np.negative(dist, out=dist)
    return dist


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
) -> NDArray[np.int32]:
    # The official threshold compares float64 (promoted) values against a Python float.
    seeds = fg & (overall < np.float64(threshold))
    filled = _fill_holes(seeds.view(np.uint8))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (opening, opening))
    opened = np.asarray(cv2.morphologyEx(filled, cv2.MORPH_OPEN, kernel), np.uint8)
    labels, _ = ndimage.label(opened)
    return _drop_small(labels.astype(np.int32, copy=False), min_size)


def _bounding_slices(fg: NDArray[np.bool_]) -> tuple[slice, slice] | None:
    rows = np.flatnonzero(fg.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(fg[rows[0] : rows[-1] + 1].any(axis=0))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _watershed(
    energy: NDArray[np.float64], markers: NDArray[np.int32], fg: NDArray[np.bool_]
) -> tuple[NDArray[np.int32], int]:
    """Marker watershed restricted to ``fg``, run on the foreground's bounding box; ids 1..n.

    Cropping keeps the raster order of every masked pixel and every 4-neighbourship between
    them, so skimage's priority flood visits them in the same order: the result is identical to
    the whole-map call.
    """
    out = np.zeros(fg.shape, np.int32)
    box = _bounding_slices(fg)
    if box is None or not markers[box].any():
        return out, 0
    flooded = watershed(energy[box], markers=markers[box], mask=fg[box])
    out[box], n = _consecutive(flooded)
    return out, n


def _consecutive(labels: NDArray[np.int32]) -> tuple[NDArray[np.int32], int]:
    """Renumber to 1..n keeping the order of the ids (official ids are marker ids, with gaps)."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    n = int(present.sum())
    lut = np.zeros(present.size, np.int32)
    lut[present] = np.arange(1, n + 1, dtype=np.int32)
    return lut[labels], n


def _instance_labels(
    np_prob: NDArray[np.float32],
    hv: NDArray[np.float32],
    *,
    np_threshold: float,
    marker_threshold: float,
    constants: PostprocessConstants,
) -> tuple[NDArray[np.int32], int]:
    """Official ``__proc_np_hv`` on validated float32 maps: consecutive labels and their count."""
    fg = _foreground(np_prob, np_threshold, constants.min_size)
    if not fg.any():
        return np.zeros(fg.shape, np.int32), 0
    overall = _overall(hv, fg, constants.sobel_ksize)
    energy = _energy(overall, fg)
    markers = _markers(overall, fg, marker_threshold, constants.opening, constants.min_size)
    del overall
    return _watershed(energy, markers, fg)


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


_PIXEL_CORNERS = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]], np.float32)


def _pixel_corner_hull(contour: NDArray[np.int32]) -> NDArray[np.float32]:
    """Convex hull of the pixel squares whose centres are ``contour`` (x, y)."""
    corners = contour.astype(np.float32)[:, None, :] + _PIXEL_CORNERS
    return np.asarray(cv2.convexHull(corners.reshape(-1, 2)), np.float32).reshape(-1, 2)


def _outer_contour(mask: NDArray[np.uint8]) -> NDArray[np.int32]:
    """Outer boundary of the largest 8-connected piece (the official code takes the last found)."""
    contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) > 1:
        sizes = [cv2.contourArea(c) + len(c) for c in contours]
        return np.asarray(contours[int(np.argmax(sizes))], np.int32).reshape(-1, 2)
    return np.asarray(contours[0], np.int32).reshape(-1, 2)


def _shape(
    mask: NDArray[np.uint8], origin: tuple[int, int]
) -> tuple[tuple[float, float], NDArray[np.float32], float, float, float]:
    """Centroid, contour, perimeter, solidity and eccentricity of one nucleus crop."""
    m = cv2.moments(mask, binaryImage=True)
    area = m["m00"]
    x0, y0 = origin
    centroid = (m["m10"] / area + x0, m["m01"] / area + y0)
    contour = _outer_contour(mask)
    hull = np.asarray(cv2.convexHull(contour), np.int32).reshape(-1, 2)
    # Convex hull of the pixel *squares*: the centres' hull grown by the unit square adds the
    # hull's x and y extents plus 1 to its area (exact, and 1 for a single pixel).
    extent_x, extent_y = np.ptp(hull, axis=0)
    solidity = min(1.0, area / (cv2.contourArea(hull) + extent_x + extent_y + 1.0))
    # One- or two-pixel-wide shapes have a degenerate centre-line contour (under 3 vertices or
    # zero area); the hull of their pixel squares is a proper polygon.
    degenerate = len(contour) < 3 or cv2.contourArea(contour) == 0
    polygon = _pixel_corner_hull(hull) if degenerate else contour.astype(np.float32)
    polygon[:, 0] += x0
    polygon[:, 1] += y0
    perimeter = cv2.arcLength(polygon, closed=True)
    # Eigenvalues of the covariance of the pixel coordinates (skimage's inertia tensor).
    a, b, c = m["mu20"] / area, m["mu11"] / area, m["mu02"] / area
    root = math.sqrt(max(((a - c) / 2.0) ** 2 + b * b, 0.0))
    major, minor = (a + c) / 2.0 + root, (a + c) / 2.0 - root
    eccentricity = math.sqrt(max(1.0 - minor / major, 0.0)) if major > 0 else 0.0
    return centroid, polygon, float(perimeter), float(solidity), eccentricity


def _measure(
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
    """Measure every nucleus of a label image (the per-instance half of :func:`hover_instances`).

    Parameters
    ----------
    labels : (H, W) integer ndarray
        0 background, ids >= 1; ids need not be consecutive (absent ids are skipped).
    np_prob : (H, W) float ndarray, optional
        Nucleus probability; its mean per nucleus becomes ``Nucleus.np_prob`` (1.0 if None).
    types : None, (H, W) int ndarray or (C, H, W) float ndarray, optional
        As for :func:`hover_instances`.

    Returns
    -------
    list of Nucleus
        In increasing label order, ``label`` being the id in ``labels``.
    """
    lab = _check_map("labels", labels, 2)
    if lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer, got dtype {lab.dtype} (shape {lab.shape})")
    n = int(lab.max())
    if lab.min() < 0 or n > max(4 * lab.size, 2**16):
        raise ValueError(
            f"labels must be ids in 0..{max(4 * lab.size, 2**16)}, got {lab.min()}..{n}"
        )
    prob = None
    if np_prob is not None:
        prob_arr = _check_map("np_prob", np_prob, 2)
        if prob_arr.shape != lab.shape:
            raise ValueError(f"np_prob must match labels {lab.shape}, got shape {prob_arr.shape}")
        prob = _as_float32(prob_arr)
    type_arr = _check_types(types, lab.shape)
    return _measure(lab, n, prob, type_arr) if n else []


# --------------------------------------------------------------------------- public entry


def hover_instances(
    np_prob: NDArray[np.floating],
    hv: NDArray[np.floating],
    types: NDArray | None = None,
    *,
    mpp: float = REFERENCE_MPP,
    np_threshold: float = 0.5,
    marker_threshold: float = 0.4,
    min_size: int | None = None,
    sobel_ksize: int | None = None,
) -> HoverInstances:
    """Segment and measure nuclei from HoVer-Net outputs (official post-processing).

    Parameters
    ----------
    np_prob : (H, W) float ndarray
        Nucleus probability, 0..1.
    hv : (2, H, W) float ndarray
        Horizontal (x) then vertical (y) distance maps, about -1..1.
    types : None, (H, W) int ndarray or (C, H, W) float ndarray, optional
        Per-pixel type index, or type probabilities (channel 0 background; argmax per pixel).
        None for a segmentation-only model.
    mpp : float
        µm per pixel of the maps; the size constants are scaled from their 0.25 µm/px values
        (see :func:`scaled_constants`).
    np_threshold : float
        Foreground threshold on ``np_prob``.
    marker_threshold : float
        Pixels whose edge strength ``overall`` reaches this are excluded from the markers.
    min_size : int, optional
        Smallest foreground component and marker kept, pixels; default from ``mpp``.
    sobel_ksize : int, optional
        Odd Sobel aperture (3..31); default from ``mpp``.

    Returns
    -------
    HoverInstances
        ``labels`` (H, W) int32 with ids 1..n and ``nuclei`` in label order. Untyped nuclei have
        type 0 and type_prob 1.0.

    Raises
    ------
    ValueError
        On a wrong shape, a non-numeric dtype, NaN/inf values or a bad option.

    Notes
    -----
    Per nucleus, in the maps' pixel coordinates:

    * centroid: mean (x, y) of its pixels (``cv2.moments``, as the official code);
    * bbox: (x_min, y_min, x_max, y_max), half-open; area: pixel count;
    * contour: OpenCV's outer contour through boundary pixel centres (``CHAIN_APPROX_SIMPLE``),
      as the official code. A nucleus one or two pixels wide, whose contour has under 3 vertices
      or no area, gets the convex hull of its pixel squares instead. Thin 1-px parts make
      OpenCV contours retrace themselves: exporters must still make polygons valid. A nucleus in
      several pieces (rare) keeps the largest piece's contour (the official code keeps the
      last-found piece);
    * perimeter: length of that closed contour;
    * solidity: area over the area of the convex hull of its pixel squares (1 for a rectangle);
    * eccentricity: of the ellipse with the same second moments (skimage's definition);
    * type / type_prob: the official vote and the fraction of pixels voting for the winner.
    """
    np_arr = _check_map("np_prob", np_prob, 2)
    hv_arr = _check_map("hv", hv, 3)
    if hv_arr.shape != (2, *np_arr.shape):
        raise ValueError(
            f"hv must have shape (2, H, W) = {(2, *np_arr.shape)}, got shape {hv_arr.shape}"
        )
    type_arr = _check_types(types, np_arr.shape)
    constants = _options(mpp, min_size, sobel_ksize, np_threshold, marker_threshold)

    np32 = _as_float32(np_arr)
    labels, n = _instance_labels(
        np32, _as_float32(hv_arr), np_threshold=np_threshold,
        marker_threshold=marker_threshold, constants=constants,
    )
    nuclei = _measure(labels, n, np32, type_arr) if n else []
    logger.debug("hover_instances: %d nuclei in a %s map (%s)", n, labels.shape, constants)
    return HoverInstances(labels=labels, nuclei=nuclei)


def _options(
    mpp: float,
    min_size: int | None,
    sobel_ksize: int | None,
    np_threshold: float,
    marker_threshold: float,
) -> PostprocessConstants:
    constants = scaled_constants(mpp)
    for name, value in (("np_threshold", np_threshold), ("marker_threshold", marker_threshold)):
        if not _finite_number(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if min_size is not None:
        if not isinstance(min_size, int | np.integer) or min_size < 0:
            raise ValueError(f"min_size must be a non-negative integer, got {min_size!r}")
        constants = PostprocessConstants(constants.sobel_ksize, int(min_size), constants.opening)
    if sobel_ksize is not None:
        if (not isinstance(sobel_ksize, int | np.integer) or sobel_ksize % 2 == 0
                or not 3 <= sobel_ksize <= _MAX_SOBEL_KSIZE):
            raise ValueError(f"sobel_ksize must be an odd integer in 3..31, got {sobel_ksize!r}")
        constants = PostprocessConstants(int(sobel_ksize), constants.min_size, constants.opening)
    return constants
