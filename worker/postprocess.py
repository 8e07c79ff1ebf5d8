"""HoVer-Net post-processing: probability and HV maps → labelled, measured nuclei.

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
8. per instance (:mod:`worker.instances`): bbox, centroid (image moments), outline, and the type
   vote (majority of the per-pixel type; a background majority yields to the most frequent other
   type).

The label image is identical to the official one up to renumbering (official ids are the marker
ids, with gaps; here they are 1..n in the same order). The speed comes from doing exactly the
same arithmetic with cheaper means: boolean masks instead of int32 ones, hole filling by one
flood fill instead of iterated dilation, the per-map normalisation, thresholds and lookups done
on the foreground's pixels alone (the only ones read; :mod:`worker.hv_edges`), the watershed per
connected component of the foreground (:mod:`worker.component_watershed`, which says why that
is exactly the whole-map result), and per-instance measurements from bincounts over the labelled pixels
with every outline traced in one batch (:func:`worker.contours.pixel_edge_rings`), no crop per
nucleus.

Constants scale with resolution. With ``s = 0.25 / mpp`` (so ``s = 1`` at 40×, ``0.5`` at 20×):

* Sobel kernel = nearest odd integer to ``20·s + 1`` (halves round up), clipped to [3, 31]
  (OpenCV's limit);
* ``min_size`` = ``ceil(10·s²)``, at least 1, for both foreground components and markers;
* opening ellipse = nearest odd integer to ``5·s`` (halves round up), at least 3;
* the 3×3 Gaussian is not scaled (as in TIAToolbox).

At ``mpp = 0.25`` these are the official 21, 10 and 5; at 0.5 µm/px they are 11, 3 and 3.

:func:`segment_maps` is what the pipeline and ``model evaluate`` call: the card's
:class:`~models.families.HoverOptions` may ask for the maps to be upsampled (bilinear, by an
integer factor) before :func:`hover_instances`. A model working at 0.5 µm/px then traces outlines
on a 0.25 µm/px grid: the watershed boundaries fall between coarse pixels instead of on them,
which measured +0.018 PQ on held-out CoNSeP for the 20× default model (docs/model-card.md).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from dataclasses import dataclass, field

import cv2
import numpy as np
from numpy.typing import NDArray

from models.families import MAX_UPSAMPLE, HoverOptions
from worker.instances import as_float32, check_map, check_types, measure, measure_nuclei
from worker.nuclei import Nucleus
from worker.watershed import instance_labels

__all__ = [
    "MAX_UPSAMPLE",
    "HoverInstances",
    "HoverOptions",
    "PostprocessConstants",
    "apply_class_options",
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


def apply_class_options(result: HoverInstances, options: HoverOptions) -> HoverInstances:
    """Calibrate each typed nucleus's class probability and leave the unsure ones unclassified."""
    if not options.class_prob_calibration and options.min_class_prob == 0:
        return result
    nuclei = []
    for nucleus in result.nuclei:
        if nucleus.type == 0:
            nuclei.append(nucleus)
            continue
        prob = options.class_probability(nucleus.type_prob)
        if prob < options.min_class_prob:
            nuclei.append(dataclasses.replace(nucleus, type=0, type_prob=prob))
        else:
            nuclei.append(dataclasses.replace(nucleus, type_prob=prob))
    return HoverInstances(result.labels, nuclei)


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

    def linear(a: NDArray, out: NDArray[np.float32] | None = None) -> NDArray:
        return cv2.resize(as_float32(a), size, dst=out, interpolation=cv2.INTER_LINEAR)

    def planes(stack: NDArray) -> NDArray[np.float32]:
        # Each plane resized straight into its slot: no per-plane copies to stack afterwards.
        fine = np.empty((len(stack), size[1], size[0]), np.float32)
        for c, plane in enumerate(stack):
            linear(plane, fine[c])
        return fine

    fine_types: NDArray | None = None
    if types is not None:
        t = np.asarray(types)
        if t.ndim == 3:
            fine_types = planes(t)
        else:
            fine_types = cv2.resize(t.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return linear(np_prob), planes(np.asarray(hv)), fine_types


def segment_maps(
    np_prob: NDArray[np.floating],
    hv: NDArray[np.floating],
    types: NDArray | None,
    *,
    mpp: float,
    options: HoverOptions,
) -> HoverInstances:
    """Nuclei of a model's maps (made at ``mpp`` µm/px) as its card asks: the maps upsampled by
    ``options.upsample``, then :func:`hover_instances` with constants for the finer grid.

    The labels and nuclei are in the pixels of the upsampled grid."""
    factor = options.upsample
    np_prob, hv, types = upsample_maps(np_prob, hv, types, factor)
    result = hover_instances(np_prob, hv, types, mpp=mpp / factor, np_threshold=options.np_threshold,
                             marker_threshold=options.marker_threshold,
                             edge_range=options.edge_range)
    return apply_class_options(result, options) if types is not None else result


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
    edge_range: tuple[float, float] | None = None,
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
    edge_range : (float, float), optional
        Fixed edge-map normalisation (:class:`HoverOptions` ``edge_range``); None, the official
        per-map min-max.

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
    * contour: the outline of its pixel squares (:func:`worker.contours.pixel_edge_ring`; its
      area is the pixel count), vertices where it turns. A nucleus in several pieces (rare)
      keeps the largest piece's outline (the official code keeps the last-found piece);
    * perimeter: length of that closed contour;
    * solidity: area over the area of the convex hull of its pixel squares (1 for a rectangle);
    * eccentricity: of the ellipse with the same second moments (skimage's definition);
    * type / type_prob: the official vote and the fraction of pixels voting for the winner.
    """
    np_arr = check_map("np_prob", np_prob, 2)
    hv_arr = check_map("hv", hv, 3)
    if hv_arr.shape != (2, *np_arr.shape):
        raise ValueError(
            f"hv must have shape (2, H, W) = {(2, *np_arr.shape)}, got shape {hv_arr.shape}"
        )
    type_arr = check_types(types, np_arr.shape)
    constants = _options(mpp, min_size, sobel_ksize, np_threshold, marker_threshold)
    if edge_range is not None:
        HoverOptions(edge_range=edge_range)  # checks the range like a card's

    np32 = as_float32(np_arr)
    labels, n, foreground = instance_labels(
        np32, as_float32(hv_arr), np_threshold=np_threshold, marker_threshold=marker_threshold,
        sobel_ksize=constants.sobel_ksize, min_size=constants.min_size, opening=constants.opening,
        edge_range=edge_range,
    )
    nuclei = measure(labels, n, np32, type_arr, within=foreground) if n else []
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
