"""``overlay.png``: the slide thumbnail with every nucleus drawn in its class colour.

Nuclei at least 3 thumbnail pixels across are outlined; smaller ones become 3×3 dots at their
centroid (an outline that small is just noise). Drawing is one ``cv2.polylines`` call per class and
one vectorised assignment per class for the dots, so 200k nuclei draw in well under a second.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import cv2
import fsspec
import numpy as np
from numpy.typing import NDArray

from models.card import ClassInfo
from worker.nuclei import NucleusTable
from worker.writers._common import ClassTable, join, prepare_root

__all__ = ["DOT_BELOW_PX", "OVERLAY_NAME", "draw_overlay", "write_overlay"]

logger = logging.getLogger(__name__)

OVERLAY_NAME = "overlay.png"

DOT_BELOW_PX = 3.0
"""Nuclei whose bounding box is smaller than this in thumbnail pixels are drawn as dots."""

_LEGEND_ROW = 16  # px per legend line
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _check_thumbnail(thumbnail: NDArray, downsample: float) -> NDArray[np.uint8]:
    image = np.asarray(thumbnail)
    if image.dtype != np.uint8:
        raise TypeError(f"thumbnail must be uint8 RGB, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be (H, W, 3) RGB, got shape {image.shape}")
    if not (np.isfinite(downsample) and downsample > 0):
        raise ValueError(
            f"downsample must be positive (level-0 px per thumbnail px), got {downsample!r}")
    return np.ascontiguousarray(image[..., :3])


def _draw_dots(image: NDArray[np.uint8], x: NDArray, y: NDArray,
               colour: tuple[int, int, int]) -> None:
    h, w = image.shape[:2]
    col = np.floor(x).astype(np.intp)
    row = np.floor(y).astype(np.intp)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = row + dr, col + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            image[r[inside], c[inside]] = colour


def _draw_legend(image: NDArray[np.uint8], classes: Sequence[ClassInfo]) -> None:
    """Colour swatches and names in the top-left corner, when the thumbnail has room for them."""
    width = 24 + max(cv2.getTextSize(c.name, _FONT, 0.4, 1)[0][0] for c in classes) + 6
    height = _LEGEND_ROW * len(classes) + 6
    if image.shape[1] < 2 * width or image.shape[0] < 2 * height:
        return
    cv2.rectangle(image, (0, 0), (width, height), (255, 255, 255), -1)
    cv2.rectangle(image, (0, 0), (width, height), (0, 0, 0), 1)
    for i, cls in enumerate(classes):
        top = 4 + i * _LEGEND_ROW
        cv2.rectangle(image, (5, top), (17, top + 11), tuple(int(v) for v in cls.colour), -1)
        cv2.putText(image, cls.name, (22, top + 10), _FONT, 0.4, (0, 0, 0), 1, cv2.LINE_AA)


def draw_overlay(
    thumbnail: NDArray[np.uint8],
    table: NucleusTable,
    *,
    downsample: float,
    classes: Sequence[ClassInfo],
    legend: bool = True,
) -> NDArray[np.uint8]:
    """Draw the nuclei on a copy of the thumbnail.

    Parameters
    ----------
    thumbnail : (H, W, 3) uint8 ndarray
        RGB thumbnail of the slide (an alpha channel is ignored).
    table : NucleusTable
        Nuclei in level-0 pixels.
    downsample : float
        Level-0 pixels per thumbnail pixel.
    classes : sequence of ClassInfo
        The model card's classes (empty = untyped: every nucleus unclassified, in the
        :data:`~worker.writers.UNCLASSIFIED` grey).
    legend : bool
        Draw class swatches, ``unclassified`` last, in the top-left corner (skipped when the
        thumbnail is too small).

    Returns
    -------
    (H, W, 3) uint8 ndarray
        RGB overlay.
    """
    image = _check_thumbnail(thumbnail, downsample).copy()
    class_table = ClassTable.from_classes(classes)
    index = class_table.type_index(table.type)
    size = np.maximum(table.bbox[:, 2] - table.bbox[:, 0], table.bbox[:, 3] - table.bbox[:, 1])
    small = size / downsample < DOT_BELOW_PX
    # A non-finite vertex (never expected) becomes -1: off the image, and no cast warning.
    points = np.round(np.nan_to_num(table.vertices / downsample, nan=-1.0, posinf=-1.0,
                                    neginf=-1.0)).astype(np.int32)
    rings = np.split(points, table.offsets[1:-1]) if len(table) else []
    has_ring = np.diff(table.offsets) > 0
    for t, cls in enumerate(class_table.by_type):
        colour = (int(cls.colour[0]), int(cls.colour[1]), int(cls.colour[2]))
        mine = index == t
        dots = np.flatnonzero(mine & (small | ~has_ring))
        if len(dots):
            _draw_dots(image, table.centroid[dots, 0] / downsample,
                       table.centroid[dots, 1] / downsample, colour)
        outlined = np.flatnonzero(mine & ~small & has_ring)
        if len(outlined):
            cv2.polylines(image, [rings[i] for i in outlined.tolist()], True, colour, 1, cv2.LINE_8)
    if legend:
        _draw_legend(image, list(class_table.legend))
    return image


def write_overlay(
    thumbnail: NDArray[np.uint8],
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    downsample: float,
    classes: Sequence[ClassInfo],
    legend: bool = True,
) -> str:
    """Draw (see :func:`draw_overlay`) and write ``overlay.png`` under ``root``; return its name."""
    image = draw_overlay(thumbnail, table, downsample=downsample, classes=classes, legend=legend)
    prepare_root(fs, root)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} overlay as PNG")
    with fs.open(join(root, OVERLAY_NAME), "wb") as fh:
        fh.write(encoded.tobytes())
    logger.info("overlay: %d nuclei on a %dx%d thumbnail", len(table), image.shape[1],
                image.shape[0])
    return OVERLAY_NAME
