"""Bounded low-resolution views of a slide for planning: the overview the overlay is drawn on,
and the image tissue is detected on.

Planning never decodes a slide-sized number of pixels. A slide with a pyramid level small enough
(within :data:`~worker.slide.base.PLANNING_PIXEL_BUDGET`) is seen whole, as before. A slide
without one (a single-level 100k × 100k TIFF, say) is seen through its ROI alone: tissue is
detected on the ROI, and the overview is a blank slide-sized canvas with the ROI painted in. A
slide that fits neither way is refused with :class:`~worker.errors.SlideTooLarge`, before any
pixel is decoded (:func:`check_planning_budget` is arithmetic only, cheap enough for an API).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.errors import SlideTooLarge
from worker.slide.base import PLANNING_PIXEL_BUDGET, Slide

__all__ = [
    "OVERVIEW_SIDE",
    "Overview",
    "check_planning_budget",
    "planning_overviews",
    "roi_box",
]

logger = logging.getLogger(__name__)

OVERVIEW_SIDE = 2048
"""Longest side of the planning overview and of the image tissue is detected on, pixels."""

Box0 = tuple[int, int, int, int]
"""A level-0 box as (row, col, height, width)."""


@dataclass(frozen=True)
class Overview:
    """A low-resolution RGB image of part of a slide.

    Attributes
    ----------
    image : (h, w, 3) uint8 ndarray
        RGB; white where there is no slide (or, on a canvas, nothing was read).
    downsample : float
        ``d``, level-0 pixels per image pixel.
    origin : (int, int)
        Level-0 (row, col) of the image's top-left corner: pixel (r, c) covers level-0 rows
        [row + r·d, row + (r+1)·d) and columns [col + c·d, col + (c+1)·d).
    """

    image: NDArray[np.uint8]
    downsample: float
    origin: tuple[int, int] = (0, 0)


def roi_box(roi: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> Box0 | None:
    """The part of a level-0 ROI ``(x, y, w, h)`` inside a slide of ``shape`` (height, width).

    Returns ``None`` without an ROI.

    Raises
    ------
    ValueError
        If the ROI is malformed or lies outside the slide.
    """
    if roi is None:
        return None
    x, y, w, h = (int(v) for v in roi)
    if w < 1 or h < 1 or x < 0 or y < 0:
        raise ValueError(f"roi must be x,y,w,h with x,y >= 0 and w,h > 0, got {tuple(roi)}")
    height, width = shape
    row1, col1 = min(y + h, height), min(x + w, width)
    if row1 <= y or col1 <= x:
        raise ValueError(f"roi {tuple(roi)} lies outside the slide (width {width}, height {height})")
    return y, x, row1 - y, col1 - x


def _source(
    slide: Slide, roi: tuple[int, int, int, int] | None, max_side: int, budget: int
) -> Box0 | None:
    """The level-0 box planning reads: ``None`` for the whole slide, else the ROI's box."""
    whole = slide.thumbnail_cost(max_side=max_side)
    if whole <= budget:
        return None
    height, width = slide.shape
    box = roi_box(roi, slide.shape)
    if box is None:
        raise SlideTooLarge(
            f"{slide.path.name} is {width:,}×{height:,} px with no pyramid level small enough to "
            f"plan from: an overview would decode {whole:,} px, over the planning budget of "
            f"{budget:,} px. Give a region of interest (roi), or convert the slide to a "
            "pyramidal TIFF (e.g. vips tiffsave --tile --pyramid)"
        )
    cost = slide.thumbnail_cost(max_side=max_side, box=box)
    if cost > budget:
        side = math.isqrt(budget)
        raise SlideTooLarge(
            f"{slide.path.name} is {width:,}×{height:,} px with no pyramid level small enough to "
            f"plan from, and its {box[3]:,}×{box[2]:,} px roi would decode {cost:,} px, over the "
            f"planning budget of {budget:,} px. Give a smaller roi (about {side:,}×{side:,} px "
            "at most), or convert the slide to a pyramidal TIFF (e.g. vips tiffsave --tile "
            "--pyramid)"
        )
    logger.info("%s: no level within the planning budget (%d px for the whole slide); "
                "planning from the roi only", slide.path.name, whole)
    return box


def check_planning_budget(
    slide: Slide,
    roi: tuple[int, int, int, int] | None = None,
    *,
    max_side: int = OVERVIEW_SIDE,
    budget: int = PLANNING_PIXEL_BUDGET,
) -> None:
    """Refuse a slide that cannot be planned within ``budget`` (decodes nothing).

    Parameters
    ----------
    slide : Slide
        An open slide.
    roi : (x, y, w, h), optional
        The level-0 region of interest the job will analyse.
    max_side : int
        Longest side of the planning overview, pixels.
    budget : int
        Most pixels planning may decode.

    Raises
    ------
    SlideTooLarge
        If neither the whole slide nor the ROI can be seen within the budget.
    ValueError
        If the ROI is malformed or outside the slide.
    """
    _source(slide, roi, max_side, budget)


def planning_overviews(
    slide: Slide,
    roi: tuple[int, int, int, int] | None = None,
    *,
    max_side: int = OVERVIEW_SIDE,
    budget: int = PLANNING_PIXEL_BUDGET,
) -> tuple[Overview, Overview]:
    """Read what planning needs, within ``budget`` decoded pixels.

    Parameters
    ----------
    slide : Slide
        An open slide.
    roi : (x, y, w, h), optional
        The level-0 region of interest the job will analyse.
    max_side : int
        Longest side of each image, pixels.
    budget : int
        Most pixels planning may decode.

    Returns
    -------
    overview : Overview
        The whole slide (origin (0, 0)) at ``max_side``, for the overlay: the slide's thumbnail,
        or, for a slide with no low-enough level, a white canvas with the ROI painted in.
    detail : Overview
        What tissue is detected on: ``overview`` itself when the slide is seen whole, else the
        ROI at up to ``max_side`` pixels.

    Raises
    ------
    SlideTooLarge
        If neither the whole slide nor the ROI can be seen within the budget.
    """
    box = _source(slide, roi, max_side, budget)
    if box is None:
        image, downsample = slide.thumbnail(max_side=max_side, budget=None)
        whole = Overview(image, downsample)
        return whole, whole
    image, downsample = slide.thumbnail(max_side=max_side, box=box, budget=None)
    detail = Overview(image, downsample, origin=(box[0], box[1]))
    return _canvas(slide.shape, box, detail, max_side), detail


def _canvas(shape: tuple[int, int], box: Box0, detail: Overview, max_side: int) -> Overview:
    """A whole-slide overview (same geometry as :meth:`Slide.thumbnail`'s) that is white except
    for ``detail``, resampled onto the pixels its box covers."""
    height, width = shape
    downsample = max(1.0, max(height, width) / max_side)
    out_h = min(max_side, math.ceil(height / downsample - 1e-9))
    out_w = min(max_side, math.ceil(width / downsample - 1e-9))
    canvas = np.full((out_h, out_w, 3), 255, dtype=np.uint8)
    row, col, box_h, box_w = box
    r0, c0 = math.floor(row / downsample), math.floor(col / downsample)
    r1 = max(r0 + 1, min(out_h, math.ceil((row + box_h) / downsample)))
    c1 = max(c0 + 1, min(out_w, math.ceil((col + box_w) / downsample)))
    # The detail image covers at least the box: crop it to the box before resampling.
    d = detail.downsample
    crop = detail.image[: max(1, math.ceil(box_h / d)), : max(1, math.ceil(box_w / d))]
    canvas[r0:r1, c0:c1] = cv2.resize(crop, (c1 - c0, r1 - r0), interpolation=cv2.INTER_AREA)
    return Overview(canvas, downsample)
