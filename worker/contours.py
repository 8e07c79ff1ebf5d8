"""Nucleus outlines traced on pixel edges.

OpenCV's contours run through the *centres* of a mask's boundary pixels, so the polygon they make
leaves out half of every boundary pixel (12 % of a typical nucleus' area) and retraces 1-pixel-wide
arms. :func:`pixel_edge_ring` instead returns the boundary of the union of the mask's pixel
squares: its area is the pixel count (holes aside: only the outer boundary is kept), and only the
corners where the boundary turns are kept, so straight runs cost two vertices whatever their
length.

How: in a grid of twice the resolution, cell ``(2r + 1, 2c + 1)`` stands for pixel ``(r, c)``, the
cells between them for pixel edges and the even/even cells for pixel corners. The closure of the
mask (pixels with their edges and corners) is one 3×3 dilation there, and OpenCV traces its outer
border through exactly the boundary edges and corners, except that it steps diagonally past a
concave corner: that corner is put back. Keeping the corner cells gives the ring.

Two pixels of one piece that touch only at a corner make the ring pass through that corner twice
(a polygon QuPath refuses); each passage is cut by a chamfer of :data:`PINCH_CUT` px, which joins
the two pixels by a thin neck and adds ``PINCH_CUT**2`` px² per pinch.

:func:`pixel_edge_rings` traces every nucleus of a label image at once: the
same grids, one per nucleus, side by side in a few large images, one dilation and one
``cv2.findContours`` each, and the corner and turning steps over all rings together; each ring
is vertex for vertex what :func:`pixel_edge_ring` gives for that nucleus' crop.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray

__all__ = ["ATLAS_CELLS", "PINCH_CUT", "Rings", "pixel_edge_ring", "pixel_edge_rings", "ring_area"]

PINCH_CUT = 0.0625
"""Chamfer length (px) at a corner where the outline touches itself; exact in binary floating
point and still apart after rounding to 0.01 px at half the resolution."""

_KERNEL = np.ones((3, 3), np.uint8)


ATLAS_CELLS = 1 << 25
"""Most doubled-grid cells traced in one image (bytes of uint8, twice with the dilation): bounds
the tracer's memory whatever the number of nuclei."""


@dataclass(frozen=True, slots=True)
class Rings:
    """Many rings, concatenated: ring ``k`` is ``vertices[offsets[k]:offsets[k + 1]]``.

    Attributes
    ----------
    vertices : (M, 2) float32 ndarray
        (x, y) of every ring's vertices, each in the frame of its own box.
    offsets : (K + 1,) intp ndarray
        Where each ring starts, then the total vertex count.
    """

    vertices: NDArray[np.float32]
    offsets: NDArray[np.intp]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, k: int) -> NDArray[np.float32]:
        return self.vertices[self.offsets[k] : self.offsets[k + 1]]


def _neighbours(lengths: NDArray[np.intp]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """Index of the next and of the previous vertex of each vertex, around its own ring."""
    ends = np.cumsum(lengths)
    begins = ends - lengths
    following = np.arange(1, int(ends[-1]) + 1)
    following[ends - 1] = begins
    preceding = np.arange(-1, int(ends[-1]) - 1)
    preceding[begins] = ends - 1
    return following, preceding


def _kept(keep: NDArray[np.bool_], lengths: NDArray[np.intp]) -> NDArray[np.intp]:
    """Ring lengths after keeping the vertices where ``keep`` is true."""
    begins = np.cumsum(lengths) - lengths
    return np.add.reduceat(keep.astype(np.intp), begins)


def _take(values: NDArray, begins: NDArray[np.intp], lengths: NDArray[np.intp]) -> NDArray:
    """``values[begins[i]:begins[i] + lengths[i]]`` for every ``i``, concatenated."""
    ends = np.cumsum(lengths)
    return values[np.arange(int(ends[-1])) - np.repeat(ends - lengths - begins, lengths)]


Columns = tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.intp]]
"""Concatenated rings as x, y (cells) and the length of each ring."""


def _corner_cells(x: NDArray[np.int64], y: NDArray[np.int64], lengths: NDArray[np.intp]) -> Columns:
    """The corner cells of traced borders, in order, with the concave corners each trace stepped
    past diagonally put back in place of the step's two edge cells."""
    following = _neighbours(lengths)[0]
    next_x, next_y = x[following], y[following]
    # Diagonal steps only join a vertical and a horizontal edge cell (never two in a row): of
    # the two cells both touch, (x, next y) and (next x, y), the corner has odd coordinates.
    diagonal = (next_x != x) & (next_y != y)
    odd_x, odd_y = (x & 1) == 1, (y & 1) == 1
    keep = diagonal | (odd_x & odd_y)
    corner_x = np.where(diagonal & ~odd_x, next_x, x)
    corner_y = np.where(diagonal & odd_x, next_y, y)
    return corner_x[keep], corner_y[keep], _kept(keep, lengths)


def _turning(x: NDArray[np.int64], y: NDArray[np.int64], lengths: NDArray[np.intp]) -> Columns:
    """The rings without repeated and collinear vertices (all steps are axis-parallel)."""
    following = _neighbours(lengths)[0]
    moves = (x[following] != x) | (y[following] != y)
    if not moves.all():
        x, y, lengths = x[moves], y[moves], _kept(moves, lengths)
    following, preceding = _neighbours(lengths)
    step_x, step_y = x[following] - x, y[following] - y
    keep = (step_x != step_x[preceding]) | (step_y != step_y[preceding])
    return x[keep], y[keep], _kept(keep, lengths)


def _pinched(x: NDArray[np.int64], y: NDArray[np.int64], lengths: NDArray[np.intp]
             ) -> NDArray[np.intp]:
    """Indices of the rings that pass through one vertex twice."""
    ring = np.repeat(np.arange(len(lengths)), lengths)
    key = (ring * (int(x.max()) + 1) + x) * (int(y.max()) + 1) + y
    order = np.sort(key)
    twice = order[1:][order[1:] == order[:-1]]
    if not twice.size:
        return np.zeros(0, np.intp)
    return np.unique(ring[np.isin(key, twice)])


def _centre_frame(x: NDArray[np.int64], y: NDArray[np.int64], lengths: NDArray[np.intp]) -> Rings:
    """Corner-cell rings in the centre frame, pinches cut."""
    rings = np.stack([x, y], axis=1)
    # Corner cell 2k + 1 is the corner between pixels k - 1 and k, at k - 0.5 in the centre frame.
    out = rings.astype(np.float64) * 0.5 - 1.0
    pinched = _pinched(x, y, lengths)
    if pinched.size:
        ends = np.cumsum(lengths)
        begins = ends - lengths
        lengths = lengths.copy()
        parts, done = [], 0
        for k in pinched.tolist():
            cut = _cut_pinches(rings[begins[k] : ends[k]], 0.5)
            parts += [out[done : begins[k]], cut]
            lengths[k], done = len(cut), int(ends[k])
        out = np.concatenate([*parts, out[done:]])
    offsets = np.zeros(len(lengths) + 1, np.intp)
    np.cumsum(lengths, out=offsets[1:])
    return Rings(out.astype(np.float32), offsets)


def _cut_pinches(ring: NDArray[np.int64], scale: float) -> NDArray[np.float64]:
    """``ring`` in the centre frame, each passage through a vertex visited twice replaced by a
    two-vertex chamfer (``scale``: centre-frame px per ring unit)."""
    key = ring[:, 0] * (int(ring[:, 1].max()) + 1) + ring[:, 1]
    order = np.sort(key)
    out = ring.astype(np.float64) * scale - 1.0
    same = order[1:] == order[:-1]
    if not same.any():
        return out
    repeated = np.isin(key, order[1:][same])
    points: list[NDArray[np.float64]] = []
    n = len(ring)
    for i in range(n):
        if not repeated[i]:
            points.append(out[i][None])
            continue
        incoming = np.sign(out[i] - out[i - 1])
        outgoing = np.sign(out[(i + 1) % n] - out[i])
        points.append(np.stack([out[i] - PINCH_CUT * incoming, out[i] + PINCH_CUT * outgoing]))
    return np.concatenate(points)


def _batches(slot_h: NDArray[np.int64], slot_w: NDArray[np.int64]) -> list[NDArray[np.intp]]:
    """The grids split into groups of about :data:`ATLAS_CELLS` cells, tallest first."""
    order = np.argsort(-slot_h, kind="stable")
    area = slot_h[order] * slot_w[order]
    batch = (np.cumsum(area) - area) // ATLAS_CELLS
    return np.split(order, np.flatnonzero(np.diff(batch)) + 1)


@dataclass(frozen=True, slots=True)
class _Shelves:
    """Where each grid of a batch lies in the batch's image: on shelves, the tallest first."""

    x: NDArray[np.int64]
    y: NDArray[np.int64]
    shelf: NDArray[np.int64]
    shelf_y: NDArray[np.int64]
    height: int
    width: int

    @classmethod
    def pack(cls, h: NDArray[np.int64], w: NDArray[np.int64]) -> _Shelves:
        """Grids (sorted by decreasing height) side by side; a grid starts on the shelf its start
        falls in, shelves as wide as the square of the grids' total area (or the widest grid)."""
        side = max(int(w.max()), math.isqrt(int((h * w).sum())))
        start = np.cumsum(w) - w
        shelf = start // side
        first = np.searchsorted(shelf, np.arange(int(shelf[-1]) + 1))
        shelf_h = h[first]
        shelf_y = np.cumsum(shelf_h) - shelf_h
        x = start - start[first][shelf]
        return cls(x, shelf_y[shelf], shelf, shelf_y, int(shelf_h.sum()), int((x + w).max()))

    def owner(self, x: NDArray[np.int64], y: NDArray[np.int64]) -> NDArray[np.intp]:
        """The grid holding each point (x, y) of the image."""
        key = (np.searchsorted(self.shelf_y, y, "right") - 1) * (self.width + 1) + x
        return np.searchsorted(self.shelf * (self.width + 1) + self.x, key, "right") - 1


def _largest(contours: Sequence[NDArray], which: NDArray[np.intp], grids: int) -> NDArray[np.intp]:
    """Per grid, the index of its largest traced border (area + length; on a tie the first
    found, as the per-crop trace's argmax)."""
    chosen = np.full(grids, -1, np.intp)
    several = np.bincount(which, minlength=grids)[which] > 1
    chosen[which[~several]] = np.flatnonzero(~several)
    best: dict[int, float] = {}
    for c in np.flatnonzero(several).tolist():
        size = cv2.contourArea(contours[c]) + len(contours[c])
        if size > best.get(int(which[c]), -1.0):
            best[int(which[c])], chosen[which[c]] = size, c
    return chosen


def _borders(
    members: NDArray[np.intp],
    slot_h: NDArray[np.int64],
    slot_w: NDArray[np.int64],
    cells: tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.intp]],
) -> tuple[NDArray[np.int64], NDArray[np.intp]]:
    """Outer border of the largest piece of each member's closure, traced in one image, in the
    member's own grid: the concatenated (x, y) cells and the length of each."""
    place = _Shelves.pack(slot_h[members], slot_w[members])
    gy, gx, owner = cells
    slot = np.full(len(slot_h), -1, np.intp)
    slot[members] = np.arange(len(members))
    mine = slot[owner]
    if len(members) < len(slot_h):
        inside = mine >= 0
        gy, gx, mine = gy[inside], gx[inside], mine[inside]
    grid = np.zeros((place.height, place.width), np.uint8)
    grid.ravel()[(place.y * place.width + place.x)[mine] + gy * place.width + gx] = 1
    # Grids never touch (each has a cell of empty margin), so every border traced here is one of
    # the borders tracing that grid alone finds, met in the same order and traced the same way.
    contours, _ = cv2.findContours(cv2.dilate(grid, _KERNEL), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    del grid
    lengths = np.fromiter(map(len, contours), np.intp, len(contours))
    points = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    begins = np.cumsum(lengths) - lengths
    chosen = _largest(contours, place.owner(points[begins, 0], points[begins, 1]), len(members))
    picked = _take(points, begins[chosen], lengths[chosen])
    picked -= np.repeat(np.stack([place.x, place.y], axis=1), lengths[chosen], axis=0)
    return picked, lengths[chosen]


def pixel_edge_rings(
    rows: NDArray[np.integer],
    cols: NDArray[np.integer],
    owner: NDArray[np.integer],
    shapes: NDArray[np.integer],
) -> Rings:
    """Outlines of many masks at once, each as :func:`pixel_edge_ring` gives it.

    Parameters
    ----------
    rows, cols : (P,) integer ndarray
        Position of each pixel inside some mask, in the frame of that mask's box.
    owner : (P,) integer ndarray
        The mask 0..K-1 each pixel belongs to.
    shapes : (K, 2) integer ndarray
        (height, width) of each mask's box; every mask has at least one pixel.

    Returns
    -------
    Rings
        Ring ``k`` is ``pixel_edge_ring`` of mask ``k`` drawn in its box, in the box's frame.
        Memory is bounded by :data:`ATLAS_CELLS` plus a few arrays of the pixel count.
    """
    size = np.asarray(shapes, np.int64).reshape(-1, 2)
    if not len(size):
        return Rings(np.zeros((0, 2), np.float32), np.zeros(1, np.intp))
    # Pixel (r, c) of a box is cell (2r + 2, 2c + 2) of its grid: one cell of margin around it.
    cells = (2 * np.asarray(rows, np.int64) + 2, 2 * np.asarray(cols, np.int64) + 2,
             np.asarray(owner, np.intp))
    slot_h, slot_w = 2 * size[:, 0] + 3, 2 * size[:, 1] + 3
    found = [(members, *_borders(members, slot_h, slot_w, cells))
             for members in _batches(slot_h, slot_w)]
    if len(found) == 1:
        members, traced, lengths = found[0]
    else:
        members = np.concatenate([f[0] for f in found])
        traced = np.concatenate([f[1] for f in found])
        lengths = np.concatenate([f[2] for f in found])
    order = np.argsort(members)
    traced = _take(traced, (np.cumsum(lengths) - lengths)[order], lengths[order])
    x, y = np.ascontiguousarray(traced[:, 0]), np.ascontiguousarray(traced[:, 1])
    return _centre_frame(*_turning(*_corner_cells(x, y, lengths[order])))


def pixel_edge_ring(mask: NDArray) -> NDArray[np.float32]:
    """Outline of the largest 8-connected piece of ``mask`` along its pixels' edges.

    Parameters
    ----------
    mask : (H, W) ndarray
        Non-zero = inside; at least one pixel inside.

    Returns
    -------
    (N, 2) float32 ndarray
        Ring vertices (x, y), not closed, in the frame where pixel ``(r, c)`` is centred on
        ``(c, r)`` (so its corners are at half-integers), only where the outline turns; the polygon
        is valid and its area is the piece's pixel count (holes filled; plus ``PINCH_CUT**2`` per
        corner where the piece touches itself).
    """
    pixels = np.asarray(mask)
    if pixels.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {pixels.shape}")
    flat_index = np.flatnonzero(pixels)
    if not flat_index.size:
        raise ValueError("the mask has no foreground pixel")
    rows, cols = np.divmod(flat_index, pixels.shape[1])
    return pixel_edge_rings(rows, cols, np.zeros(flat_index.size, np.intp),
                            np.array([pixels.shape]))[0]


def ring_area(ring: NDArray) -> float:
    """Unsigned shoelace area of a ring (x, y), closed or not."""
    xy = np.asarray(ring, np.float64)
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)
