"""Panoptic Mask R-CNN post-processing (model family ``instance``): detections → measured nuclei.

The network gives, for one image, ``K`` detections: ``boxes`` (K, 4) ``x0, y0, x1, y1`` in
continuous input pixel coordinates (pixel ``(u, v)`` covers ``[u, u+1) × [v, v+1)``), ``scores``
(K,) in 0..1, ``classes`` (K,) 1..C and ``masks`` (K, 1, M, M) probabilities whose grid spans the
box exactly: bin ``(i, j)`` covers ``[x0 + j·w/M, x0 + (j+1)·w/M) × [y0 + i·h/M, y0 + (i+1)·h/M)``
with ``w = x1 - x0``, ``h = y1 - y0`` (torchvision's RoIAlign mask targets).

:func:`paste_detections` turns them into dense maps:

1. **pasting** — the boxes are shifted by ``-offset`` first. A pixel ``(u, v)`` belongs to a
   detection's mask when its centre ``(u + 0.5, v + 0.5)`` lies inside the box (``x0 <= u + 0.5
   < x1``, the same for ``v``) and the mask, sampled bilinearly at that centre, is
   ``> mask_threshold``. Sampling is half-pixel aligned: the mask coordinate of the centre is
   ``(u + 0.5 - x0) / w · M - 0.5`` (``(v + 0.5 - y0) / h · M - 0.5`` for rows), clamped to the
   grid's edges ``[0, M - 1]``. Only the pixels of the box's extent are computed (never a resize
   of a whole map); a box partly outside the output is clipped to it; a box with ``w <= 0``,
   ``h <= 0`` or a non-finite coordinate is skipped.
2. **overlaps, by score** — detections with ``score >= score_threshold`` are taken in
   descending score (ties: the lower index first). Each claims the pixels of its mask not owned
   by a detection kept before it. When the unclaimed share of its (visible) mask is below
   ``min_unclaimed`` it is a duplicate and is dropped; otherwise only the largest 4-connected
   piece of what it claims is kept (ties: the piece first in raster order), and the detection
   is dropped when that piece has fewer than ``min_size`` pixels. Kept detections get ids
   1..n in this claim order.

:func:`instance_nuclei` turns the (stitched) dense maps into the hover family's
:class:`~worker.postprocess.HoverInstances`, measured by :func:`worker.postprocess.measure_nuclei`,
so seams, writers and counts treat this family like the others: ``np_prob`` is the mean
detection score over the nucleus (its score), and when typed ``type`` is its class and
``type_prob`` its score; untyped nuclei get type 0 and type_prob 1.0.

The default ``min_size`` scales with resolution like the hover family's: ``ceil(10·s²)`` pixels
with ``s = 0.25 / mpp`` (:func:`instance_sizes`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from models.families import PROBABILITY_SLACK
from worker.postprocess import REFERENCE_MPP, HoverInstances, measure_nuclei, scaled_constants

__all__ = ["MAP_NAMES", "DetectionMaps", "InstanceSizes", "instance_nuclei", "instance_sizes",
           "paste_detections"]

logger = logging.getLogger(__name__)

_MAX_CLASS = 255  # classes are stored per pixel as uint8
_FOUR = ndimage.generate_binary_structure(2, 1)
MAP_NAMES = ("instances", "classes", "scores")
"""Names of the dense maps :func:`instance_nuclei` reads (the fields of :class:`DetectionMaps`)."""


@dataclass(frozen=True, slots=True)
class DetectionMaps:
    """Dense maps of pasted detections (:func:`paste_detections`).

    Attributes
    ----------
    instances : (H, W) int32 ndarray
        0 background, detection ids 1..n in claim order.
    classes : (H, W) uint8 ndarray
        The owning detection's class, 0 on background.
    scores : (H, W) float32 ndarray
        The owning detection's score, 0 on background.
    """

    instances: NDArray[np.int32]
    classes: NDArray[np.uint8]
    scores: NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class InstanceSizes:
    """Size constants of the instance family at one resolution, in pixels."""

    min_size: int


def instance_sizes(mpp: float = REFERENCE_MPP) -> InstanceSizes:
    """Default sizes for maps at ``mpp`` µm/px: ``min_size = ceil(10·s²)``, ``s = 0.25 / mpp``.

    Parameters
    ----------
    mpp : float
        Resolution of the maps, µm per pixel (> 0).

    Returns
    -------
    InstanceSizes
        ``min_size`` 10 at 0.25 µm/px, 3 at 0.5 µm/px, at least 1.
    """
    if isinstance(mpp, bool):  # a Real to Python, never a resolution
        raise ValueError(f"mpp must be a positive finite number, got {mpp!r}")
    # The hover family's rule, which also checks the resolution.
    return InstanceSizes(min_size=scaled_constants(mpp).min_size)


# --------------------------------------------------------------------------- input checks


def _check_fraction(name: str, value: object, *, closed: bool) -> float:
    number = (float(value) if not isinstance(value, bool) and isinstance(value, numbers.Real)
              else math.nan)
    ok = math.isfinite(number) and (0.0 <= number <= 1.0 if closed else 0.0 < number < 1.0)
    if not ok:
        bounds = "between 0 and 1 inclusive" if closed else "strictly between 0 and 1"
        raise ValueError(f"{name} must be a number {bounds}, got {value!r}")
    return number


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_offset(offset: object) -> tuple[float, float]:
    pair = tuple(offset) if isinstance(offset, tuple | list | np.ndarray) else ()
    if len(pair) != 2 or not all(not isinstance(v, bool) and isinstance(v, numbers.Real)
                                 and math.isfinite(v) for v in pair):
        raise ValueError(f"offset must be an (x, y) pair of finite numbers, got {offset!r}")
    return float(pair[0]), float(pair[1])


def _numeric(name: str, value: object, kinds: str) -> NDArray:
    arr = np.asarray(value)
    if arr.dtype.kind not in kinds:
        raise ValueError(f"{name} must be {'integer' if kinds == 'iu' else 'numeric'}, "
                         f"got dtype {arr.dtype} (shape {arr.shape})")
    return arr


def _check_detections(
    boxes: object, scores: object, classes: object, masks: object
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64], NDArray[np.float32]]:
    box = _numeric("boxes", boxes, "iuf")
    score = _numeric("scores", scores, "iuf")
    cls = _numeric("classes", classes, "iu")
    mask = _numeric("masks", masks, "iuf")
    if box.ndim != 2 or box.shape[1] != 4:
        raise ValueError(f"boxes must be (K, 4), got shape {box.shape}")
    k = box.shape[0]
    if score.shape != (k,):
        raise ValueError(f"scores must be (K,) = ({k},) like boxes, got shape {score.shape}")
    if cls.shape != (k,):
        raise ValueError(f"classes must be (K,) = ({k},) like boxes, got shape {cls.shape}")
    if mask.ndim != 4 or mask.shape[0] != k or mask.shape[1] != 1 or min(mask.shape[2:]) < 2:
        raise ValueError(f"masks must be (K, 1, M, M) with K = {k} and M >= 2, got shape {mask.shape}")
    if not np.isfinite(score).all() or (
            k and (score.min() < -PROBABILITY_SLACK or score.max() > 1 + PROBABILITY_SLACK)):
        raise ValueError("scores must be finite numbers in 0..1 (NaN, infinite or out-of-range found)")
    if k and (int(cls.min()) < 1 or int(cls.max()) > _MAX_CLASS):
        raise ValueError(f"classes must be in 1..{_MAX_CLASS}, got values {cls.min()}..{cls.max()}")
    if mask.dtype.kind == "f" and not np.isfinite(mask).all():
        raise ValueError(f"masks contain NaN or infinite values (shape {mask.shape})")
    return (box.astype(np.float64), np.clip(score.astype(np.float64), 0.0, 1.0), cls.astype(np.int64),
            np.asarray(mask[:, 0], np.float32))


# --------------------------------------------------------------------------- pasting


def _axis(start: float, stop: float, bins: int, size: int) -> tuple[int, NDArray[np.intp],
                                                                   NDArray[np.float64]]:
    """Pixels of one axis whose centres lie in ``[start, stop)`` clipped to ``0..size-1``: the
    first pixel, and per pixel the lower grid bin and the weight of the upper one."""
    first = max(0, math.floor(start - 0.5))
    last = min(size, math.ceil(stop + 0.5))
    centre = np.arange(first, max(first, last), dtype=np.float64) + 0.5
    inside = (centre >= start) & (centre < stop)
    centre = centre[inside]
    first += int(np.argmax(inside)) if inside.any() else 0
    coord = np.clip((centre - start) / (stop - start) * bins - 0.5, 0.0, bins - 1.0)
    low = np.minimum(np.floor(coord).astype(np.intp), bins - 2)
    return first, low, coord - low


def _paste(box: NDArray[np.float64], mask: NDArray[np.float32], threshold: float, height: int,
           width: int) -> tuple[int, int, NDArray[np.bool_]] | None:
    """The detection's mask over its clipped box extent: (row, col, boolean patch), or None when
    no pixel centre of the output lies in the box."""
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        return None
    col, cx, fx = _axis(x0, x1, mask.shape[1], width)
    row, ry, fy = _axis(y0, y1, mask.shape[0], height)
    if not len(cx) or not len(ry):
        return None
    grid = mask.astype(np.float64)
    # Separable bilinear sampling: rows first, then columns; the cost is the box's extent.
    rows = grid[ry] * (1.0 - fy)[:, None] + grid[ry + 1] * fy[:, None]
    values = rows[:, cx] * (1.0 - fx) + rows[:, cx + 1] * fx
    return row, col, values > threshold


def _largest_piece(claim: NDArray[np.bool_]) -> NDArray[np.bool_]:
    """The largest 4-connected piece of ``claim`` (ties: the first in raster order)."""
    pieces, n = ndimage.label(claim, structure=_FOUR)
    if n <= 1:
        return claim
    # ndimage numbers pieces in raster order of their first pixel: argmax keeps the first tie.
    sizes = np.bincount(pieces.ravel(), minlength=n + 1)[1:]
    return pieces == 1 + int(np.argmax(sizes))


def paste_detections(
    boxes: NDArray[np.floating],
    scores: NDArray[np.floating],
    classes: NDArray[np.integer],
    masks: NDArray[np.floating],
    *,
    height: int,
    width: int,
    offset: tuple[float, float] = (0.0, 0.0),
    score_threshold: float = 0.5,
    mask_threshold: float = 0.5,
    min_unclaimed: float = 0.5,
    min_size: int = 1,
) -> DetectionMaps:
    """Paste one image's detections into dense maps, resolving overlaps by score.

    Parameters
    ----------
    boxes : (K, 4) float ndarray
        ``x0, y0, x1, y1`` in the network input's continuous pixel coordinates.
    scores : (K,) float ndarray
        Detection scores in 0..1.
    classes : (K,) integer ndarray
        The card's nucleus class of each detection, 1..255 (1 for an untyped model).
    masks : (K, 1, M, M) float ndarray
        Mask probabilities spanning each box (M >= 2).
    height, width : int
        Shape of the output maps.
    offset : (float, float)
        ``(x, y)`` subtracted from the boxes first: where the maps start in the input.
    score_threshold : float
        Detections scoring below it are ignored; in (0, 1).
    mask_threshold : float
        A pixel is in a mask when the sampled probability is above it; in (0, 1).
    min_unclaimed : float
        Smallest share of a detection's mask still unclaimed for it to be kept; in [0, 1].
    min_size : int
        Smallest kept piece, pixels (:func:`instance_sizes` gives the default for a resolution).

    Returns
    -------
    DetectionMaps
        ``instances`` ids 1..n in claim order, with each one's class and score.

    Raises
    ------
    ValueError
        When shapes disagree, scores are NaN or outside 0..1, classes outside 1..255, masks
        non-finite, or an option is out of range.
    """
    box, score, cls, mask = _check_detections(boxes, scores, classes, masks)
    height = _check_positive_int("height", height)
    width = _check_positive_int("width", width)
    ox, oy = _check_offset(offset)
    score_threshold = _check_fraction("score_threshold", score_threshold, closed=False)
    mask_threshold = _check_fraction("mask_threshold", mask_threshold, closed=False)
    min_unclaimed = _check_fraction("min_unclaimed", min_unclaimed, closed=True)
    min_size = _check_positive_int("min_size", min_size)

    instances = np.zeros((height, width), np.int32)
    class_map = np.zeros((height, width), np.uint8)
    score_map = np.zeros((height, width), np.float32)
    shifted = box - np.array([ox, oy, ox, oy])
    candidates = np.flatnonzero(score >= score_threshold)
    # A stable sort of the negated scores: equal scores keep the lower index first.
    order = candidates[np.argsort(-score[candidates], kind="stable")]
    n = 0
    for k in order.tolist():
        pasted = _paste(shifted[k], mask[k], mask_threshold, height, width)
        if pasted is None:
            continue
        row, col, patch = pasted
        # A nucleus has no holes: a ring-shaped mask would leave room for another nucleus that
        # its outline (an outer ring only) then covers.
        patch = ndimage.binary_fill_holes(patch)
        area = int(patch.sum())
        if not area:
            continue
        window = (slice(row, row + patch.shape[0]), slice(col, col + patch.shape[1]))
        claim = patch & (instances[window] == 0)
        if int(claim.sum()) / area < min_unclaimed:
            continue  # a duplicate of detections already kept
        keep = _largest_piece(claim)
        if int(keep.sum()) < min_size:
            continue
        if (ndimage.binary_fill_holes(keep) & ~keep).any():
            continue  # it would enclose a nucleus already kept, which its outline would cover
        n += 1
        instances[window][keep] = n
        class_map[window][keep] = cls[k]
        score_map[window][keep] = score[k]
    logger.debug("pasted %d of %d detections (%d above the score threshold)", n, len(score),
                 len(candidates))
    return DetectionMaps(instances=instances, classes=class_map, scores=score_map)


# --------------------------------------------------------------------------- measuring


def _check_dense(maps: Mapping[str, NDArray] | DetectionMaps) -> tuple[NDArray, NDArray, NDArray]:
    if isinstance(maps, DetectionMaps):
        named: Mapping[str, object] = {name: getattr(maps, name) for name in MAP_NAMES}
    elif isinstance(maps, Mapping):
        missing = [name for name in MAP_NAMES if name not in maps]
        if missing:
            raise ValueError(f"instance maps must include {list(MAP_NAMES)}; missing {missing}")
        named = maps
    else:
        raise TypeError(f"maps must be a mapping or DetectionMaps, got {type(maps).__name__}")
    inst = _numeric("instances", named["instances"], "iu")
    cls = _numeric("classes", named["classes"], "iu")
    score = _numeric("scores", named["scores"], "iuf")
    if inst.ndim != 2 or min(inst.shape, default=0) == 0:
        raise ValueError(f"instances must be a non-empty (H, W) map, got shape {inst.shape}")
    for name, arr in (("classes", cls), ("scores", score)):
        if arr.shape != inst.shape:
            raise ValueError(f"{name} must match instances {inst.shape}, got shape {arr.shape}")
    if int(inst.min()) < 0:
        raise ValueError(f"instances must be ids >= 0, got minimum {inst.min()}")
    if int(cls.min()) < 0 or int(cls.max()) > _MAX_CLASS:
        raise ValueError(f"classes must be in 0..{_MAX_CLASS}, got values {cls.min()}..{cls.max()}")
    if not np.isfinite(score).all() or score.min() < 0 or score.max() > 1:
        raise ValueError("scores must be finite numbers in 0..1 (NaN, infinite or out-of-range found)")
    return inst, cls, score


def _relabel(inst: NDArray) -> NDArray[np.int32]:
    """Ids renumbered 1..n in raster order of each id's first pixel (0 stays background)."""
    ids, first, inverse = np.unique(inst.ravel(), return_index=True, return_inverse=True)
    rank = np.zeros(len(ids), np.int64)
    present = ids != 0
    order = np.argsort(first[present], kind="stable")
    rank[np.flatnonzero(present)[order]] = np.arange(1, int(present.sum()) + 1)
    return rank[inverse].reshape(inst.shape).astype(np.int32)


def instance_nuclei(
    maps: Mapping[str, NDArray] | DetectionMaps,
    *,
    mpp: float,
    typed: bool,
) -> HoverInstances:
    """Measure the nuclei of (stitched) detection maps.

    Parameters
    ----------
    maps : mapping or DetectionMaps
        ``"instances"`` (H, W) integer ids (0 background, gaps allowed), ``"classes"`` (H, W)
        class per pixel and ``"scores"`` (H, W) detection score per pixel. Not modified.
    mpp : float
        µm per pixel of the maps (checked; sizes were applied when pasting).
    typed : bool
        Whether the classes are the card's nucleus classes; False gives every nucleus type 0
        and type_prob 1.0, as the other families do for untyped models.

    Returns
    -------
    HoverInstances
        ``labels`` (H, W) int32 with ids 1..n in raster order of each nucleus' first pixel, and
        ``nuclei`` in label order with ``np_prob`` = the detection score and, when typed,
        ``type`` = its class (the majority of its pixels) and ``type_prob`` = its score.

    Raises
    ------
    ValueError
        On missing maps, disagreeing shapes, negative ids, classes outside 0..255, scores
        outside 0..1 or a bad ``mpp``.
    """
    instance_sizes(mpp)  # the same check of mpp as the other families
    inst, cls, score = _check_dense(maps)
    labels = _relabel(inst)
    prob = np.asarray(score, np.float32)
    if not typed:
        return HoverInstances(labels=labels, nuclei=measure_nuclei(labels, np_prob=prob))
    nuclei = measure_nuclei(labels, np_prob=prob, types=np.where(labels > 0, cls, 0).astype(np.uint8))
    nuclei = [dataclasses.replace(nu, type_prob=nu.np_prob) for nu in nuclei]
    return HoverInstances(labels=labels, nuclei=nuclei)
