"""Region plan: where on the slide the network runs, at the model's resolution.

Coordinates here are *model pixels*: the slide's level-0 grid scaled to the model's µm/px.
Network outputs are computed on a global tile grid anchored at the model-grid origin, so two
overlapping regions see bit-identical maps where they overlap; only post-processing differs.

A region has a *core* (cores partition the analysed area exactly: every pixel belongs to one core)
and a *halo* around it: the maps cover ``core ⊕ halo`` so that every nucleus whose centroid lies in
the core is whole inside the maps. The pixels read from the slide extend a further ``margin`` (the
network's valid-convolution border) beyond the maps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from worker.options import DEFAULT_REGION_SIZE

__all__ = ["Box", "Region", "plan_regions", "tile_boxes"]



@dataclass(frozen=True, slots=True)
class Box:
    """Half-open pixel box ``[row0, row1) × [col0, col1)``."""

    row0: int
    col0: int
    row1: int
    col1: int

    def __post_init__(self) -> None:
        if self.row1 < self.row0 or self.col1 < self.col0:
            raise ValueError(f"box has negative extent: {self}")

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0

    @property
    def area(self) -> int:
        return self.height * self.width

    def grow(self, by: int) -> Box:
        return Box(self.row0 - by, self.col0 - by, self.row1 + by, self.col1 + by)

    def intersect(self, other: Box) -> Box | None:
        r0, c0 = max(self.row0, other.row0), max(self.col0, other.col0)
        r1, c1 = min(self.row1, other.row1), min(self.col1, other.col1)
        if r1 <= r0 or c1 <= c0:
            return None
        return Box(r0, c0, r1, c1)

    def contains_points(self, rows, cols):
        """Boolean mask of which (row, col) points (floats allowed) lie in the half-open box."""
        return (rows >= self.row0) & (rows < self.row1) & (cols >= self.col0) & (cols < self.col1)

    def scaled(self, factor: float) -> Box:
        """The box in a grid ``factor`` times finer (outward rounding)."""
        return Box(
            math.floor(self.row0 * factor), math.floor(self.col0 * factor),
            math.ceil(self.row1 * factor), math.ceil(self.col1 * factor),
        )


@dataclass(frozen=True, slots=True)
class Region:
    """One unit of work: ``core`` (owned nuclei), ``maps`` (core ⊕ halo, tile-aligned)."""

    index: int
    core: Box
    maps: Box

    def __repr__(self) -> str:
        c = self.core
        return f"Region(#{self.index}, core rows {c.row0}:{c.row1} cols {c.col0}:{c.col1})"


def _align_down(value: int, step: int) -> int:
    return (value // step) * step


def _align_up(value: int, step: int) -> int:
    return -((-value) // step) * step


def plan_regions(
    area: Box,
    *,
    tile: int,
    region_size: int = DEFAULT_REGION_SIZE,
    halo: int,
    keep: Callable[[Box], bool] | None = None,
) -> list[Region]:
    """Split ``area`` (model pixels) into regions whose cores partition it.

    Parameters
    ----------
    area : Box
        The analysed area (the slide, or the ROI), model pixels.
    tile : int
        The model's output patch side; cores and map boxes are aligned to this global grid.
    region_size : int
        Requested core side; rounded to a multiple of ``tile`` (at least one tile).
    halo : int
        Minimum map margin around the core, model pixels (rounded up to whole tiles).
    keep : callable, optional
        Predicate on a core box; regions whose core fails it (no tissue) are not planned.
    """
    if tile <= 0:
        raise ValueError(f"tile must be positive, got {tile}")
    if region_size <= 0:
        raise ValueError(f"region_size must be positive, got {region_size}")
    if halo < 0:
        raise ValueError(f"halo must be >= 0, got {halo}")
    step = max(tile, round(region_size / tile) * tile)
    halo_aligned = _align_up(halo, tile)
    regions: list[Region] = []
    row = _align_down(area.row0, step)
    while row < area.row1:
        col = _align_down(area.col0, step)
        while col < area.col1:
            cell = Box(row, col, row + step, col + step)
            core = cell.intersect(area)
            if core is not None and (keep is None or keep(core)):
                maps = Box(
                    _align_down(core.row0, tile) - halo_aligned,
                    _align_down(core.col0, tile) - halo_aligned,
                    _align_up(core.row1, tile) + halo_aligned,
                    _align_up(core.col1, tile) + halo_aligned,
                )
                regions.append(Region(len(regions), core, maps))
            col += step
        row += step
    return regions


def tile_boxes(maps: Box, *, tile: int) -> list[Box]:
    """The output tiles (global grid, side ``tile``) covering a tile-aligned ``maps`` box."""
    if maps.row0 % tile or maps.col0 % tile or maps.row1 % tile or maps.col1 % tile:
        raise ValueError(f"maps box {maps} is not aligned to tile {tile}")
    return [
        Box(r, c, r + tile, c + tile)
        for r in range(maps.row0, maps.row1, tile)
        for c in range(maps.col0, maps.col1, tile)
    ]
