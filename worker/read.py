"""Reading slide pixels at the model's resolution.

The *model grid* is the slide resampled to the model's µm/px. Model pixel ``X`` covers the
continuous level-0 interval ``[X·k, (X+1)·k)`` with ``k`` level-0 pixels per model pixel, so a
pixel centre maps as ``u + 0.5 = (X + 0.5)·s`` into the chosen pyramid level (``s`` level pixels
per model pixel). Every read uses this one global mapping, whatever box is asked for, so the same
model pixel always gets the same value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.plan import Box

if TYPE_CHECKING:
    from worker.slide import Slide

__all__ = ["ModelGrid", "model_grid", "read_model_box"]

SAME_RESOLUTION_TOLERANCE = 0.02
"""Relative µm/px difference under which a level is used as is, without resampling (e.g. a
0.499 µm/px slide for a 0.5 µm/px model)."""


@dataclass(frozen=True, slots=True)
class ModelGrid:
    """How model pixels map onto the slide.

    Attributes
    ----------
    level : int
        Pyramid level pixels are read from.
    scale : float
        Level pixels per model pixel (1.0 when no resampling is needed).
    level0_per_model : float
        Level-0 pixels per model pixel.
    mpp : float
        Effective µm per model pixel.
    shape : (int, int)
        (height, width) of the whole slide on the model grid.
    """

    level: int
    scale: float
    level0_per_model: float
    mpp: float
    shape: tuple[int, int]

    def to_level0(self, box: Box) -> Box:
        return box.scaled(self.level0_per_model)

    def from_level0(self, box: Box) -> Box:
        return box.scaled(1.0 / self.level0_per_model)


def model_grid(slide: Slide, model_mpp: float) -> ModelGrid:
    """Choose the pyramid level and scale that bring ``slide`` to ``model_mpp`` µm/px.

    The level is the coarsest one that is still at least as fine as the model (never upsample a
    coarse level when a finer one exists).
    """
    if model_mpp <= 0:
        raise ValueError(f"model_mpp must be positive, got {model_mpp}")
    wanted = model_mpp / slide.mpp  # level-0 pixels per model pixel
    level = slide.best_level(wanted * (1 + SAME_RESOLUTION_TOLERANCE))
    downsample = float(slide.level_downsamples[level])
    scale = wanted / downsample
    if abs(scale - 1.0) < SAME_RESOLUTION_TOLERANCE:
        scale = 1.0
    level0_per_model = scale * downsample
    level_h, level_w = slide.level_shapes[level]
    shape = (math.ceil(level_h / scale), math.ceil(level_w / scale))
    return ModelGrid(level, scale, level0_per_model, slide.mpp * level0_per_model, shape)


def read_model_box(slide: Slide, grid: ModelGrid, box: Box) -> NDArray[np.uint8]:
    """Pixels of ``box`` (model grid) as an (H, W, 3) uint8 RGB array; outside the slide is white."""
    if grid.scale == 1.0:
        return slide.read(grid.level, row=box.row0, col=box.col0, height=box.height, width=box.width)
    s = grid.scale
    # Source window: the level pixels whose interpolation support reaches the box, plus a margin
    # for the anti-alias blur when downsampling.
    pad = 2 + (math.ceil(s) if s > 1 else 0)
    r0 = math.floor((box.row0 + 0.5) * s - 0.5) - pad
    c0 = math.floor((box.col0 + 0.5) * s - 0.5) - pad
    r1 = math.ceil((box.row1 - 0.5) * s - 0.5) + pad + 1
    c1 = math.ceil((box.col1 - 0.5) * s - 0.5) + pad + 1
    src = slide.read(grid.level, row=r0, col=c0, height=r1 - r0, width=c1 - c0)
    if s > 1.05:
        sigma = 0.5 * math.sqrt(s * s - 1.0)
        src = np.asarray(cv2.GaussianBlur(src, (0, 0), sigmaX=sigma, sigmaY=sigma,
                                          borderType=cv2.BORDER_REPLICATE), dtype=np.uint8)
    # dst (c, r) -> src (u, v): u = (col0 + c + 0.5)·s − 0.5 − c0, same for rows.
    matrix = np.array(
        [[s, 0.0, (box.col0 + 0.5) * s - 0.5 - c0], [0.0, s, (box.row0 + 0.5) * s - 0.5 - r0]],
        dtype=np.float64,
    )
    warped = cv2.warpAffine(
        src, matrix, (box.width, box.height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT, borderValue=(255, 255, 255),
    )
    return np.asarray(warped, dtype=np.uint8)  # no copy: typing only
