"""TSFD-Net post-processing (model family ``boundary``): semantic + boundary maps → measured nuclei.

:func:`boundary_instances` follows TSFD-Net's ``decode_predictions`` / ``seprate_instances``
(Ilyas et al. 2022, sec. 3.6):

1. foreground = nucleus probability ``sum(sem_prob[1:]) >= fg_threshold`` (``1 - sem_prob[0]``
   for a softmax, and 0 where a tile never ran: its maps stay all zero); noise removal drops
   8-connected pieces and fills holes smaller than ``min_size`` pixels;
2. each pixel's class is the argmax over the nucleus classes (channels 1..C-1); every semantic
   nucleus (8-connected foreground piece) takes the majority class of its pixels (ties to the lower
   index);
3. boundary = ``boundary_prob >= boundary_threshold`` inside the foreground, thinned to one pixel
   (``skimage.morphology.thin``, the official ``bwmorph_thin``);
4. instances = foreground minus boundary, 4-connected (an 8-connected one-pixel line separates
   4-connected regions); pieces under ``seed_size`` pixels are thinning debris, not nuclei;
5. the 3×3 dilation back: every foreground pixel without an instance that touches one (8-neighbour)
   joins it — the lowest label when it touches several; the dilation stays inside the foreground;
6. a semantic nucleus that the boundaries covered entirely is kept whole; instances under
   ``min_size`` pixels are dropped; labels are renumbered 1..n in raster order of their seeds.

The result is the hover family's :class:`~worker.postprocess.HoverInstances`, measured by
:func:`worker.postprocess.measure_nuclei`, so merge, writers and counts treat both alike.
``type_prob`` is the fraction of the nucleus' pixels whose own argmax is its class.

Sizes scale with resolution (``s = 0.25 / mpp``): ``min_size = ceil(22·s²)`` (the official 22 at
40×) and ``seed_size = max(2, ceil(min_size / 4))``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from worker.postprocess import HoverInstances, measure_nuclei

__all__ = ["boundary_instances", "boundary_sizes"]

REFERENCE_MPP = 0.25
_MIN_SIZE = 22  # official remove_small_obj_n_holes(min_area=22) on 40× PanNuke patches
_EIGHT = np.ones((3, 3), dtype=bool)
_FOUR = ndimage.generate_binary_structure(2, 1)


def _check_threshold(name: str, value: object) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
            or not 0.0 < float(value) < 1.0):
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
    return float(value)


def boundary_sizes(mpp: float = REFERENCE_MPP) -> tuple[int, int]:
    """``(min_size, seed_size)`` in pixels for maps at ``mpp`` µm/px (22 and 6 at 0.25 µm/px)."""
    if isinstance(mpp, bool) or not isinstance(mpp, numbers.Real) or not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp must be a positive finite number, got {mpp!r}")
    s = REFERENCE_MPP / float(mpp)
    min_size = max(1, math.ceil(_MIN_SIZE * s * s - 1e-9))
    return min_size, max(2, math.ceil(min_size / 4))


def _check_maps(sem_prob: object, boundary_prob: object) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    sem = np.asarray(sem_prob)
    bnd = np.asarray(boundary_prob)
    if sem.ndim != 3 or sem.shape[0] < 2 or min(sem.shape[1:]) == 0:
        raise ValueError(f"sem_prob must be (C, H, W) with C >= 2, got shape {sem.shape}")
    if bnd.shape != sem.shape[1:]:
        raise ValueError(f"boundary_prob must be (H, W) = {sem.shape[1:]}, got shape {bnd.shape}")
    for name, arr in (("sem_prob", sem), ("boundary_prob", bnd)):
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"{name} must be numeric, got dtype {arr.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"{name} contains NaN or infinite values (shape {arr.shape})")
    return np.asarray(sem, np.float32), np.asarray(bnd, np.float32)


def _denoise(fg: NDArray[np.bool_], min_size: int) -> NDArray[np.bool_]:
    """Drop 8-connected pieces and fill 4-connected holes smaller than ``min_size`` pixels."""
    labels, n = ndimage.label(fg, structure=_EIGHT)
    if n:
        small = np.bincount(labels.ravel(), minlength=n + 1) < min_size
        small[0] = False
        fg = fg & ~small[labels]
    holes, n = ndimage.label(~fg, structure=_FOUR)
    if n:
        area = np.bincount(holes.ravel(), minlength=n + 1)
        # background touching the map edge is not a hole
        edge = np.unique(np.concatenate([holes[0], holes[-1], holes[:, 0], holes[:, -1]]))
        fill = area < min_size
        fill[0] = False
        fill[edge] = False
        fg = fg | fill[holes]
    return fg


def _majority_classes(
    components: NDArray[np.int32], n: int, pixel_class: NDArray[np.intp], n_classes: int
) -> NDArray[np.intp]:
    """Majority class (1..C-1, ties to the lower) of every component id 0..n."""
    counts = np.bincount(components.ravel() * n_classes + pixel_class.ravel(),
                         minlength=(n + 1) * n_classes).reshape(n + 1, n_classes)
    return np.argmax(counts, axis=1)


def _thin(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    from skimage.morphology import thin

    return np.asarray(thin(mask), dtype=bool) if mask.any() else mask


def _dilate_back(seeds: NDArray[np.int32], fg: NDArray[np.bool_]) -> NDArray[np.int32]:
    """Unlabelled foreground pixels next to a seed (3×3) take the lowest neighbouring label."""
    big = np.iinfo(np.int32).max
    lowest = ndimage.grey_erosion(np.where(seeds > 0, seeds, big), footprint=_EIGHT, mode="constant",
                                  cval=big)
    grow = fg & (seeds == 0) & (lowest != big)
    return np.where(grow, lowest, seeds).astype(np.int32)


def _instances(
    fg: NDArray[np.bool_], boundary: NDArray[np.bool_], components: NDArray[np.int32], n_comp: int,
    min_size: int, seed_size: int,
) -> NDArray[np.int32]:
    seeds, n = ndimage.label(fg & ~boundary, structure=_FOUR)
    if n:
        debris = np.bincount(seeds.ravel(), minlength=n + 1) < seed_size
        debris[0] = False
        seeds[debris[seeds]] = 0
    labels = _dilate_back(seeds.astype(np.int32), fg)
    # semantic nuclei with no instance at all (boundary everywhere) are kept whole
    covered = np.zeros(n_comp + 1, dtype=bool)
    covered[components[labels > 0]] = True
    covered[0] = True
    orphan = ~covered[components]
    labels = np.where(orphan, components + n + 1, labels).astype(np.int32)
    area = np.bincount(labels.ravel())
    keep = area >= min_size
    keep[0] = False
    ids = np.flatnonzero(keep)
    # renumber 1..n: seeds first in raster order (their ids), then orphans by component
    lut = np.zeros(len(area), dtype=np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    return lut[labels]


def boundary_instances(
    sem_prob: NDArray[np.floating],
    boundary_prob: NDArray[np.floating],
    *,
    mpp: float = REFERENCE_MPP,
    fg_threshold: float = 0.5,
    boundary_threshold: float = 0.5,
    typed: bool = True,
    min_size: int | None = None,
) -> HoverInstances:
    """Segment and measure nuclei from a TSFD-Net's semantic and boundary maps.

    Parameters
    ----------
    sem_prob : (C, H, W) float ndarray
        Softmax over background (channel 0) and the C - 1 nucleus classes.
    boundary_prob : (H, W) float ndarray
        Sigmoid boundary probability.
    mpp : float
        µm per pixel of the maps; sizes scale from their 0.25 µm/px values (:func:`boundary_sizes`).
    fg_threshold : float
        Threshold on the nucleus probability ``sum(sem_prob[1:])``.
    boundary_threshold : float
        Threshold on ``boundary_prob``.
    typed : bool
        Whether the channels are classes (the card lists them); False gives every nucleus type 0
        and type_prob 1.0, as the hover family does for untyped models.
    min_size : int, optional
        Smallest semantic piece, hole and nucleus kept, pixels; default from ``mpp``.

    Returns
    -------
    HoverInstances
        ``labels`` (H, W) int32 with ids 1..n and ``nuclei`` in label order.

    Raises
    ------
    ValueError
        On a wrong shape, a non-numeric dtype, NaN/inf values or a bad option.
    """
    sem, bnd = _check_maps(sem_prob, boundary_prob)
    fg_threshold = _check_threshold("fg_threshold", fg_threshold)
    boundary_threshold = _check_threshold("boundary_threshold", boundary_threshold)
    default_min, seed_size = boundary_sizes(mpp)
    if min_size is not None:
        if isinstance(min_size, bool) or not isinstance(min_size, int | np.integer) or min_size < 1:
            raise ValueError(f"min_size must be a positive integer, got {min_size!r}")
        seed_size = max(2, math.ceil(int(min_size) / 4))
    size = default_min if min_size is None else int(min_size)

    nucleus_prob = sem[1:].sum(axis=0)
    fg = _denoise(nucleus_prob >= fg_threshold, size)
    n_classes = sem.shape[0]
    pixel_class = (1 + np.argmax(sem[1:], axis=0)).astype(np.intp) * fg
    components, n_comp = ndimage.label(fg, structure=_EIGHT)
    components = components.astype(np.int32)
    boundary = _thin(fg & (bnd >= boundary_threshold))
    labels = _instances(fg, boundary, components, n_comp, size, seed_size)
    if not typed:
        nuclei = measure_nuclei(labels, np_prob=nucleus_prob)
        return HoverInstances(labels=labels, nuclei=nuclei)
    majority = _majority_classes(components, n_comp, pixel_class, n_classes)
    nuclei = measure_nuclei(labels, np_prob=nucleus_prob, types=majority[components] * fg)
    agree = np.bincount(labels.ravel(), weights=(pixel_class == majority[components]).ravel(),
                        minlength=len(nuclei) + 1)
    area = np.maximum(np.bincount(labels.ravel(), minlength=len(nuclei) + 1), 1)
    nuclei = [dataclasses.replace(nu, type_prob=float(agree[nu.label] / area[nu.label])) for nu in nuclei]
    return HoverInstances(labels=labels, nuclei=nuclei)
