"""The marker watershed of HoVer-Net post-processing, run per connected component of the mask.

:func:`component_watershed` is ``skimage.segmentation.watershed(energy, markers, mask=fg)``,
exactly, but it floods only the 4-connected components of the foreground that hold two or more
markers, several at a time on a small tile each (:data:`TILE`), never the whole map. (The
whole-map call queues every marker pixel at once: 6 s on a 4096² map, against about 1 s here.)
Why that is the whole-map result, exactly:

* the flood never crosses the mask, and components are 4-connected like the flood, so no pixel of
  one component is ever reached from another;
* a component with a single marker is that marker's everywhere (every masked pixel connected to a
  marker gets flooded); one without a marker stays 0;
* scikit-image's flood pops pixels by (value, age): every push gets the next age, so two pushed
  pixels never tie, and the pushes of one component keep their relative order whatever else is
  in the queue. Only the markers themselves are queued with equal age (0); two of them with the
  same energy pop in an order set by the binary heap's layout, which depends on *every* marker of
  the map. Such a tie can only matter between markers that push a neighbour, i.e. marker pixels
  next to a masked non-marker pixel. A component where those pixels' energies are all distinct
  therefore floods identically alone, beside other such components, or in the whole map
  (cropping changes neither the raster order of its pixels nor scikit-image's neighbour order,
  which is by distance, then raveled offset: up, left, right, down);
* for the same reason a marker pixel with no masked non-marker neighbour ("inner") pushes
  nothing when it pops: it keeps its marker and is left out of the call (out of the mask), which
  spares the queue most marker pixels without changing any other pop;
* a component with such a tie (measured: 2 of 1,640 on a 4096² benchmark map, none on 2048²) is
  flooded once per possible order of its tied markers by :func:`_flood` (the same algorithm,
  written out); if every order gives the same labels, that is the whole-map result too. Only
  when the order really matters (or there are too many orders) is the whole-map watershed run,
  once, and its pixels are taken for those components.

Components come from one labelling without statistics: areas and boxes are counted over the
foreground's pixels only (a small share of the map), not by a second pass over every pixel.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass

import cv2
import numpy as np
from numpy.typing import NDArray
from skimage.segmentation import watershed

from worker.instances import pixel_boxes

__all__ = ["Components", "component_watershed", "label_components"]

MAX_TIE_ORDERS = 24
"""Most orders of tied markers tried in one component before the whole-map watershed decides."""

TILE = 256
"""Components are flooded together by tiles of this many pixels square (by their box's corner):
one scikit-image call per tile keeps its per-call overhead small and its queue in cache."""


@dataclass(frozen=True, slots=True)
class Components:
    """4-connected components of a binary mask.

    Attributes
    ----------
    ids : (H, W) int32 ndarray
        Component id per pixel, 0 outside the mask; ids of dropped components stay but are
        not ``kept``.
    area : (n,) int64 ndarray
        Pixels per id (row 0, the background, counts nothing).
    kept : (n,) bool ndarray
        Components that are part of the mask.
    """

    ids: NDArray[np.int32]
    area: NDArray[np.int64]
    kept: NDArray[np.bool_]


def label_components(mask: NDArray[np.bool_], pixels: NDArray[np.intp],
                     min_size: int = 1) -> Components:
    """4-connected components of ``mask`` (whose raveled pixels, ascending, are ``pixels``);
    those under ``min_size`` pixels are not kept."""
    # Any labelling algorithm gives the same components; Bolelli's (Spaghetti) is the fastest.
    count, raw = cv2.connectedComponentsWithAlgorithm(mask.view(np.uint8), 4, cv2.CV_32S,
                                                      cv2.CCL_BOLELLI)
    ids: NDArray[np.int32] = np.asarray(raw, np.int32)
    area = np.bincount(ids.ravel()[pixels], minlength=count).astype(np.int64)
    area[0] = 0
    kept = area >= max(min_size, 1)
    kept[0] = False
    return Components(ids=ids, area=area, kept=kept)


def _marker_pairs(markers: NDArray[np.int32], comp: NDArray[np.int32],
                  index: NDArray[np.intp]) -> NDArray[np.int64]:
    """Sorted unique (component, marker) pairs of the marker pixels among the foreground's
    raveled pixels ``index``."""
    flat = index[markers.ravel()[index] != 0]
    label = markers.ravel()[flat]
    where = comp.ravel()[flat]
    # A marker lies in one component unless it crosses background (through a filled hole):
    # for the others, any of its pixels names the component.
    rep = np.zeros(int(markers.max()) + 1, np.int32)
    rep[label] = where
    odd = rep[label] != where
    ids = np.flatnonzero(np.bincount(label))
    # Each pair as one int64 key (component major): a 1-D unique sorts like the pairs would.
    span = np.int64(rep.size)
    keys = rep[ids].astype(np.int64) * span + ids
    if odd.any():
        spanning = np.isin(label, np.unique(label[odd]))
        keys = np.concatenate([keys, where[spanning].astype(np.int64) * span + label[spanning]])
    keys = np.unique(keys)
    return np.stack(np.divmod(keys, span), axis=1)


def _touching_seeds(markers: NDArray[np.int32], fg: NDArray[np.bool_],
                    seeds: NDArray[np.intp]) -> NDArray[np.bool_]:
    """Per marker pixel of ``seeds`` (raveled, in the foreground): whether a 4-neighbour is in
    the foreground and no marker pixel (none outside the map)."""
    h, w = fg.shape
    flat_fg, flat_markers = fg.ravel(), markers.ravel()
    rows, cols = np.divmod(seeds, w)
    touching = np.zeros(seeds.size, np.bool_)
    for step, inside in ((-w, rows > 0), (w, rows < h - 1), (-1, cols > 0), (1, cols < w - 1)):
        q = np.where(inside, seeds + step, seeds)
        touching |= inside & flat_fg[q] & (flat_markers[q] <= 0)
    return touching


def _boundary_ties(energy: NDArray[np.float64], comp: NDArray[np.int32],
                   active: NDArray[np.intp]) -> dict[int, list[NDArray[np.intp]]]:
    """Per component: groups (raveled map indices, >= 2 each) of the marker pixels ``active``
    (those next to a masked non-marker pixel) that share one energy value. These are the only
    queue entries whose order scikit-image leaves to its heap layout and that can change the
    flood."""
    where = comp.ravel()[active]
    values = energy.ravel()[active]
    order = np.lexsort((values, where))
    active, where, values = active[order], where[order], values[order]
    same = (where[1:] == where[:-1]) & (values[1:] == values[:-1])
    ties: dict[int, list[NDArray[np.intp]]] = {}
    if not same.any():
        return ties
    starts = np.flatnonzero(np.r_[True, ~same])
    for a, b in zip(starts.tolist(), [*starts[1:].tolist(), len(active)], strict=True):
        if b - a > 1:
            ties.setdefault(int(where[a]), []).append(active[a:b])
    return ties


def _flood(energy: NDArray[np.float64], markers: NDArray[np.int32], mask: NDArray[np.bool_],
           first: dict[int, int]) -> NDArray[np.int32]:
    """scikit-image's marker watershed (4-connected, no compactness, no lines), written out.

    Queue entries are (value, age, rank, pixel); markers enter with age 0, every push takes the
    next age and labels its pixel at once; a pixel's value is its energy or the value of the
    pixel that pushed it, whichever is higher. ``first`` ranks tied marker pixels (raveled
    index → rank, lower pops first); other markers rank 0.
    """
    h, w = energy.shape
    width = w + 2
    image = np.pad(energy, 1).ravel().tolist()
    seeds = np.where(mask, markers, 0)
    label = np.pad(seeds, 1).ravel().tolist()
    # Masked pixels not yet labelled: the only ones a pop may push.
    free = np.pad(mask & (seeds == 0), 1).ravel().tolist()
    start = np.flatnonzero(seeds)
    padded = ((start // w + 1) * width + start % w + 1).tolist()
    queue = [(image[p], 0, first.get(i, 0), p) for i, p in zip(start.tolist(), padded, strict=True)]
    heapq.heapify(queue)
    pop, push = heapq.heappop, heapq.heappush
    age = 0
    while queue:
        value, _, _, p = pop(queue)
        own = label[p]
        # scikit-image's neighbour order: by distance, then raveled offset (up, left, right, down).
        for q in (p - width, p - 1, p + 1, p + width):
            if free[q]:
                free[q] = False
                label[q] = own
                age += 1
                e = image[q]
                push(queue, (e if e > value else value, age, 0, q))
    return np.asarray(label, np.int32).reshape(h + 2, width)[1:-1, 1:-1]


def _tied_flood(energy: NDArray[np.float64], markers: NDArray[np.int32], mask: NDArray[np.bool_],
                groups: list[NDArray[np.intp]]) -> NDArray[np.int32] | None:
    """The flood if it is the same for every order of the tied markers, else None."""
    orders = 1
    for g in groups:
        for k in range(2, g.size + 1):
            orders *= k
    if orders > MAX_TIE_ORDERS:
        return None
    result: NDArray[np.int32] | None = None
    for perms in itertools.product(*(itertools.permutations(g.tolist()) for g in groups)):
        first = {i: rank + 1 for perm in perms for rank, i in enumerate(perm)}
        flooded = _flood(energy, markers, mask, first)
        if result is None:
            result = flooded
        elif not np.array_equal(result, flooded):
            return None
    return result


def _whole_map(energy: NDArray[np.float64], markers: NDArray[np.int32],
               fg: NDArray[np.bool_]) -> NDArray[np.int32]:
    """scikit-image's watershed on the foreground's bounding box (what cropping cannot change:
    every marker is queued, in the same order)."""
    out = np.zeros(fg.shape, np.int32)
    rows = np.flatnonzero(fg.any(axis=1))
    cols = np.flatnonzero(fg[rows[0]:rows[-1] + 1].any(axis=0))
    box = slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)
    out[box] = watershed(energy[box], markers=markers[box], mask=fg[box])
    return out


def component_watershed(
    energy: NDArray[np.float64],
    markers: NDArray[np.int32],
    fg: NDArray[np.bool_],
    components: Components | None = None,
    *,
    consecutive: bool = False,
    fg_index: NDArray[np.intp] | None = None,
) -> tuple[NDArray[np.int32], Counter[str]]:
    """``skimage.segmentation.watershed(energy, markers, mask=fg)``, exactly, per component.

    Parameters
    ----------
    energy : (H, W) float64 ndarray
        The landscape.
    markers : (H, W) int32 ndarray
        Marker ids (>= 0); pixels outside ``fg`` are ignored, as scikit-image does.
    fg : (H, W) bool ndarray
        The mask.
    components : Components, optional
        4-connected components of ``fg`` (from :func:`label_components`); computed if None.
    consecutive : bool
        Renumber the marker ids found to 1..n in their order (no separate pass over the map).
    fg_index : (k,) intp ndarray, optional
        ``np.flatnonzero(fg)``, if known.

    Returns
    -------
    labels : (H, W) int32 ndarray
        The marker id flooding each pixel (or its rank, with ``consecutive``), 0 outside ``fg``
        and in components without markers.
    paths : collections.Counter
        How many components took each path: ``single`` (one marker), ``cropped`` (watershed on
        a tile of such components), ``orders`` (tied markers, every order floods alike),
        ``whole_map`` (tied markers whose order matters: the whole-map call decides).
    """
    index = np.flatnonzero(fg) if fg_index is None else fg_index
    if components is None:
        components = label_components(fg, index)
    comp = components.ids
    n_comp = len(components.kept)
    paths: Counter[str] = Counter()
    pairs = _marker_pairs(markers, comp, index)
    per_comp = np.bincount(pairs[:, 0], minlength=n_comp)
    lut = np.zeros(n_comp, np.int32)
    single = per_comp == 1
    # pairs are sorted by component: a single one's marker is at its component's position.
    # Every marker pixel inside the mask keeps its id, so the ids found are exactly these.
    rename = np.arange(int(markers.max()) + 1, dtype=np.int32)
    if consecutive:
        found = np.unique(pairs[:, 1])
        rename[:] = 0
        rename[found] = np.arange(1, found.size + 1, dtype=np.int32)
    lut[single] = rename[pairs[np.searchsorted(pairs[:, 0], np.flatnonzero(single)), 1]]
    paths["single"] = int(single.sum())
    labels = np.zeros(comp.shape, np.int32)  # lut is 0 off the foreground: no marker pairs there
    labels.ravel()[index] = lut[comp.ravel()[index]]
    multi = per_comp >= 2
    if not multi.any():
        return labels, paths
    flood = _Flood.of(markers, fg, comp, multi, index)
    ties = _boundary_ties(energy, comp, flood.active)
    plain = multi.copy()
    plain[list(ties)] = False
    paths["cropped"] = int(plain.sum())
    flood.tiles(energy, markers, plain, labels, rename)
    whole: NDArray[np.int32] | None = None
    width = comp.shape[1]
    for k, groups in ties.items():
        y0, x0, y1, x1 = flood.box(k)
        box = slice(y0, y1), slice(x0, x1)
        mask = comp[box] == k
        seeds = np.where(mask, markers[box], 0)
        local = [(g // width - y0) * (x1 - x0) + g % width - x0 for g in groups]
        flooded = _tied_flood(energy[box], seeds, mask, local)
        if flooded is None:
            if whole is None:
                whole = _whole_map(energy, markers, fg)
            flooded = whole[box]
            paths["whole_map"] += 1
        else:
            paths["orders"] += 1
        labels[box][mask] = rename[flooded[mask]]
    return labels, paths


@dataclass(frozen=True, slots=True)
class _Flood:
    """What the floods of the components with two or more markers need: their pixels, boxes
    and marker pixels that push (``active``) or never do (``inner``)."""

    comp: NDArray[np.int32]
    ids: NDArray[np.intp]  # the components, ascending
    boxes: NDArray[np.int64]  # (len(ids), 4) row_start, col_start, row_stop, col_stop
    queued: NDArray[np.bool_]  # (H, W): pixels a call floods or queues
    active: NDArray[np.intp]  # marker pixels next to a masked non-marker pixel
    inner: NDArray[np.intp]  # the other marker pixels

    @classmethod
    def of(cls, markers: NDArray[np.int32], fg: NDArray[np.bool_], comp: NDArray[np.int32],
           multi: NDArray[np.bool_], index: NDArray[np.intp]) -> _Flood:
        pixels = index[multi[comp.ravel()[index]]]
        ids = np.flatnonzero(multi)
        slot = np.zeros(len(multi), np.intp)
        slot[ids] = np.arange(ids.size)
        rows, cols = np.divmod(pixels, comp.shape[1])
        boxes = pixel_boxes(rows, cols, slot[comp.ravel()[pixels]], ids.size)
        seeds = pixels[markers.ravel()[pixels] > 0]
        touching = _touching_seeds(markers, fg, seeds)
        queued = np.zeros(comp.shape, np.bool_)
        queued.ravel()[pixels] = True
        inner = seeds[~touching]
        queued.ravel()[inner] = False
        return cls(comp, ids, boxes, queued, seeds[touching], inner)

    def box(self, k: int) -> tuple[int, int, int, int]:
        y0, x0, y1, x1 = self.boxes[int(np.searchsorted(self.ids, k))].tolist()
        return y0, x0, y1, x1

    def tiles(self, energy: NDArray[np.float64], markers: NDArray[np.int32],
              chosen: NDArray[np.bool_], labels: NDArray[np.int32],
              rename: NDArray[np.int32]) -> None:
        """Watershed of the ``chosen`` components (a subset of ``ids``), tile by tile, into
        ``labels``. Components without tied markers flood alike whatever else is in the call
        (see the module docstring), so one call may hold many of them."""
        pick = chosen[self.ids]
        if not pick.any():
            return
        inner = self.inner[chosen[self.comp.ravel()[self.inner]]]
        labels.ravel()[inner] = rename[markers.ravel()[inner]]
        ids, boxes = self.ids[pick], self.boxes[pick]
        y0, x0, y1, x1 = boxes.T
        tile_of = (y0 // TILE) * (self.comp.shape[1] // TILE + 1) + x0 // TILE
        order = np.argsort(tile_of, kind="stable")
        group = np.zeros(len(chosen), np.int32)
        bounds = np.flatnonzero(np.r_[True, np.diff(tile_of[order]) != 0, True])
        for t, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True), 1):
            members = order[a:b]
            group[ids[members]] = t
            box = (slice(int(y0[members].min()), int(y1[members].max())),
                   slice(int(x0[members].min()), int(x1[members].max())))
            mask = (group[self.comp[box]] == t) & self.queued[box]
            seeds = np.where(mask, markers[box], 0)
            flooded = watershed(energy[box], markers=seeds, mask=mask)
            labels[box][mask] = rename[flooded[mask]]
