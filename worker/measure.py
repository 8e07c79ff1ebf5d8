"""QuPath-style measurements of nuclei (and cells): names, units and definitions as QuPath's own
cell detection (``WatershedCellDetection``) writes them, so classifiers, measurement maps and
scripts made for QuPath's cells work on ours.

Shapes come from the very polygons written (level-0 pixels scaled by the slide's µm/px); intensities
from the region's pixels and label map, on the analysis grid. Everything is columnar: one value per
object, NaN where a value is undefined (writers skip NaN).

Definitions (QuPath's ``ShapeStatsIJ`` and ``RunningStatistics``):

* Area: polygon area, µm²; Perimeter: polygon length, µm;
* Circularity: ``min(1, 4π·area / perimeter²)``;
* Max caliper: largest distance between two points of the polygon (max Feret diameter), µm;
* Min caliper: smallest width between two parallel lines enclosing it (min Feret), µm;
* Eccentricity: ``sqrt(1 − (minor/major)²)`` of the ellipse with the polygon's second moments;
* ``<stain> OD mean/sum/std dev/max/min``: over the object's pixels of the stain's deconvolved
  optical density (std dev with ``n − 1``, NaN for one pixel).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import cv2
import numpy as np
from numpy.typing import NDArray

from worker.nuclei import NucleusTable
from worker.stain import StainVectors, deconvolve

__all__ = [
    "AREA_RATIO",
    "CLASS_PROBABILITY",
    "DETECTION_PROBABILITY",
    "MICRO",
    "intensity_measurements",
    "measure_region",
    "nucleus_measurement_names",
    "polygon_shapes",
    "shape_measurements",
]

MICRO = "\u00b5m"
"""QuPath's micrometre symbol (``GeneralTools.micrometerSymbol()``: MICRO SIGN, then m)."""

DETECTION_PROBABILITY = "Detection probability"
CLASS_PROBABILITY = "Class probability"
AREA_RATIO = "Nucleus/Cell area ratio"

STAINS = ("Hematoxylin", "Eosin")
"""QuPath's stain names (``ColorDeconvolutionStains.HEMATOXYLIN``/``EOSIN``)."""

SHAPE_NAMES = (
    ("area", f"Area {MICRO}^2"),
    ("perimeter", f"Perimeter {MICRO}"),
    ("circularity", "Circularity"),
    ("max_caliper", f"Max caliper {MICRO}"),
    ("min_caliper", f"Min caliper {MICRO}"),
    ("eccentricity", "Eccentricity"),
)
"""Shape keys of :func:`polygon_shapes` and the names QuPath gives them (after a prefix)."""

NUCLEUS_STATS = {"Hematoxylin": ("mean", "sum", "std dev", "max", "min"), "Eosin": ("mean",)}
"""Per-stain statistics written for nuclei (QuPath's order; its "range" is max − min)."""

COMPARTMENT_STATS = {"Hematoxylin": ("mean", "std dev", "max", "min"), "Eosin": ("mean",)}
"""Per-stain statistics for cell and cytoplasm (QuPath writes no sum there)."""


def _ring_index(offsets: NDArray[np.int64]) -> tuple[NDArray[np.intp], NDArray[np.intp]]:
    """For each vertex, the index of the next vertex of its ring; and the ring lengths."""
    n_vertices = int(offsets[-1])
    nxt = np.arange(1, n_vertices + 1, dtype=np.intp)
    lengths = np.diff(offsets).astype(np.intp)
    nonempty = lengths > 0
    nxt[offsets[1:][nonempty] - 1] = offsets[:-1][nonempty]
    return nxt, lengths


def _segment_sums(values: NDArray[np.float64], offsets: NDArray[np.int64],
                  lengths: NDArray[np.intp]) -> NDArray[np.float64]:
    """Sum of ``values`` per ring (0 for an empty ring)."""
    out = np.zeros(len(lengths), np.float64)
    nonempty = lengths > 0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(values, offsets[:-1][nonempty])
    return out


def polygon_shapes(
    vertices: NDArray[np.floating], offsets: NDArray[np.integer], scale: float = 1.0
) -> dict[str, NDArray[np.float32]]:
    """Shape of each ring ``vertices[offsets[i]:offsets[i+1]]`` (not closed), in ``scale`` units
    per vertex unit.

    Parameters
    ----------
    vertices : (M, 2) float ndarray
        x, y vertices.
    offsets : (N + 1,) int ndarray
        Ring boundaries, ``offsets[0] == 0`` and ``offsets[-1] == M``.
    scale : float
        Length units per vertex unit (µm per level-0 pixel).

    Returns
    -------
    dict
        ``area``, ``perimeter``, ``circularity``, ``max_caliper``, ``min_caliper``,
        ``eccentricity`` (see the module notes), float32 arrays of length N. Rings of under three
        vertices or no area get NaN for the measures that need an area.
    """
    verts = np.asarray(vertices, np.float64).reshape(-1, 2)
    offs = np.asarray(offsets, np.int64)
    if len(offs) == 0 or offs[0] != 0 or offs[-1] != len(verts) or np.any(np.diff(offs) < 0):
        raise ValueError("offsets must rise from 0 to len(vertices)")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    n = len(offs) - 1
    nxt, lengths = _ring_index(offs)
    # Centre each ring on its first vertex: level-0 coordinates reach 1e5, and the moment sums
    # below would otherwise lose most of their float64 digits to cancellation.
    first = np.repeat(np.minimum(offs[:-1], max(len(verts) - 1, 0)), lengths)
    local = (verts - verts[first]) * scale if len(verts) else verts
    x, y = local[:, 0], local[:, 1]
    x1, y1 = x[nxt], y[nxt]
    cross = x * y1 - x1 * y
    signed = 0.5 * _segment_sums(cross, offs, lengths)
    area = np.abs(signed)
    perimeter = _segment_sums(np.hypot(x1 - x, y1 - y), offs, lengths)
    valid = (lengths >= 3) & (area > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cx = _segment_sums((x + x1) * cross, offs, lengths) / (6.0 * signed)
        cy = _segment_sums((y + y1) * cross, offs, lengths) / (6.0 * signed)
        sxx = _segment_sums((x * x + x * x1 + x1 * x1) * cross, offs, lengths) / (12.0 * signed)
        syy = _segment_sums((y * y + y * y1 + y1 * y1) * cross, offs, lengths) / (12.0 * signed)
        sxy = _segment_sums((x * y1 + 2 * x * y + 2 * x1 * y1 + x1 * y) * cross, offs,
                            lengths) / (24.0 * signed)
        mu20, mu02, mu11 = sxx - cx * cx, syy - cy * cy, sxy - cx * cy
        half_trace = (mu20 + mu02) / 2.0
        root = np.sqrt(np.maximum(((mu20 - mu02) / 2.0) ** 2 + mu11 ** 2, 0.0))
        major, minor = half_trace + root, np.maximum(half_trace - root, 0.0)
        eccentricity = np.sqrt(np.clip(1.0 - minor / major, 0.0, 1.0))
        circularity = np.minimum(4.0 * math.pi * area / (perimeter * perimeter), 1.0)
    max_caliper, min_caliper = _calipers(local, offs, valid)
    nan = np.float64(np.nan)
    return {
        "area": area.astype(np.float32),
        "perimeter": perimeter.astype(np.float32),
        "circularity": np.where(valid, circularity, nan).astype(np.float32),
        "max_caliper": max_caliper.astype(np.float32),
        "min_caliper": np.where(valid, min_caliper, nan).astype(np.float32),
        "eccentricity": np.where(valid, eccentricity, nan).astype(np.float32),
    } if n else {key: np.zeros(0, np.float32) for key, _ in SHAPE_NAMES}


def _calipers(local: NDArray[np.float64], offsets: NDArray[np.int64],
              valid: NDArray[np.bool_]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Max Feret diameter and min caliper width per ring, from its convex hull."""
    n = len(offsets) - 1
    longest = np.full(n, np.nan)
    narrowest = np.full(n, np.nan)
    for i in range(n):
        ring = local[offsets[i]:offsets[i + 1]]
        if len(ring) == 0:
            continue
        if len(ring) < 3 or not valid[i]:
            longest[i] = float(np.ptp(ring, axis=0).max()) if len(ring) > 1 else 0.0
            continue
        hull = cv2.convexHull(ring.astype(np.float32)).reshape(-1, 2).astype(np.float64)
        longest[i], narrowest[i] = _hull_calipers(hull)
    return longest, narrowest


_CHUNK = 256
"""Hull points per block in :func:`_hull_calipers` (bounds its memory for huge hulls)."""


def _hull_calipers(hull: NDArray[np.float64]) -> tuple[float, float]:
    """(max Feret diameter, min caliper width) of a convex polygon's vertices."""
    edges = np.roll(hull, -1, axis=0) - hull
    norms = np.hypot(edges[:, 0], edges[:, 1])
    keep = norms > 0
    # The narrowest strip enclosing a convex polygon has one side on a hull edge; the widest
    # pair of points are two hull vertices.
    normals = np.stack([-edges[keep, 1], edges[keep, 0]], axis=1) / norms[keep, None]
    longest, widths = 0.0, []
    for lo in range(0, len(hull), _CHUNK):
        block = hull[lo:lo + _CHUNK]
        d2 = ((block[:, None, :] - hull[None, :, :]) ** 2).sum(axis=2)
        longest = max(longest, float(d2.max()))
    for lo in range(0, len(normals), _CHUNK):
        projected = normals[lo:lo + _CHUNK] @ hull.T
        widths.append(projected.max(axis=1) - projected.min(axis=1))
    narrowest = float(np.concatenate(widths).min()) if widths else 0.0
    return math.sqrt(longest), narrowest


def shape_measurements(
    vertices: NDArray[np.floating], offsets: NDArray[np.integer], mpp: float, prefix: str
) -> dict[str, NDArray[np.float32]]:
    """:func:`polygon_shapes` in µm under QuPath's names, e.g. ``"Nucleus: Area µm^2"``."""
    shapes = polygon_shapes(vertices, offsets, mpp)
    return {f"{prefix}{name}": shapes[key] for key, name in SHAPE_NAMES}


def intensity_measurements(
    labels: NDArray[np.integer],
    wanted: NDArray[np.integer],
    channels: Mapping[str, NDArray[np.floating]],
    stats: Mapping[str, tuple[str, ...]],
    prefix: str,
    factor: int = 1,
) -> dict[str, NDArray[np.float32]]:
    """Per-object statistics of each channel over the pixels of each wanted label.

    Parameters
    ----------
    labels : (H, W) int ndarray
        0 background, objects 1..
    wanted : (N,) int ndarray
        Labels to report, in output order (a label absent from ``labels`` gets NaN).
    channels : dict
        Stain name → (H / factor, W / factor) float image (e.g. ``"Hematoxylin"`` →
        hematoxylin OD); label pixel ``(r, c)`` reads channel pixel ``(r // factor, c // factor)``
        (nearest, as the maps' type votes are upsampled).
    stats : dict
        Stain name → statistics among ``mean``, ``sum``, ``std dev``, ``max``, ``min``.
    prefix : str
        ``"Nucleus: "``, ``"Cell: "`` or ``"Cytoplasm: "``.
    factor : int
        Label pixels per channel pixel, per axis.

    Returns
    -------
    dict
        ``f"{prefix}{stain} OD {stat}"`` → (N,) float32, in ``stats`` order.
    """
    lab = np.asarray(labels)
    if lab.ndim != 2 or lab.dtype.kind not in "iu":
        raise ValueError(f"labels must be a 2-D integer image, got {lab.dtype} {lab.shape}")
    want = np.asarray(wanted, np.int64).reshape(-1)
    if factor < 1 or lab.shape[0] % factor or lab.shape[1] % factor:
        raise ValueError(f"labels {lab.shape} are not {factor} times a channel's shape")
    coarse = (lab.shape[0] // factor, lab.shape[1] // factor)
    groups = _Groups(lab.ravel(), want, lab.shape[1], factor)
    out: dict[str, NDArray[np.float32]] = {}
    for stain, names in stats.items():
        if stain not in channels:
            raise ValueError(f"no channel for stain {stain!r} (have {sorted(channels)})")
        image = np.asarray(channels[stain])
        if image.shape != coarse:
            raise ValueError(f"channel {stain!r} has shape {image.shape}, expected {coarse} "
                             f"(labels {lab.shape} / {factor})")
        computed = groups.statistics(image.ravel(), names)
        for stat in names:
            out[f"{prefix}{stain} OD {stat}"] = computed[stat].astype(np.float32)
    return out


class _Groups:
    """The pixels of each wanted label, gathered once (sorted by label, background and other
    labels left out) so that every image's per-label statistics are a few ``reduceat`` calls."""

    STATS = ("mean", "sum", "std dev", "max", "min")

    def __init__(self, flat: NDArray[np.integer], want: NDArray[np.int64], width: int,
                 factor: int) -> None:
        top = int(max(flat.max(initial=0), want.max(initial=0)))
        lut = np.zeros(top + 1, bool)
        lut[want[want > 0]] = True
        pixels = np.flatnonzero(lut[flat])
        labels = flat[pixels]
        order = np.argsort(labels, kind="stable")
        pixels = pixels[order]
        if factor > 1:  # the channel pixel under each label pixel
            rows, cols = np.divmod(pixels, width)
            pixels = (rows // factor) * (width // factor) + cols // factor
        self.pixels = pixels
        unique, self.starts = np.unique(labels[order], return_index=True)
        self.counts = np.diff(np.append(self.starts, len(self.pixels))).astype(np.float64)
        pos = np.minimum(np.searchsorted(unique, want), max(len(unique) - 1, 0))
        self.found = (unique[pos] == want) if len(unique) else np.zeros(len(want), bool)
        self.pos = pos[self.found]

    def statistics(self, values: NDArray[np.floating],
                   names: tuple[str, ...]) -> dict[str, NDArray[np.float64]]:
        """The named statistics of ``values`` (flat, as the label map) per wanted label; NaN for
        an absent label (and for the std dev of a single pixel)."""
        unknown = set(names) - set(self.STATS)
        if unknown:
            raise ValueError(f"unknown statistic(s) {sorted(unknown)}; known: {self.STATS}")
        out = {name: np.full(len(self.found), np.nan) for name in names}
        if not len(self.pixels):
            return out
        picked = np.asarray(values[self.pixels], np.float64)
        n = self.counts
        total = np.add.reduceat(picked, self.starts)
        mean = total / n
        found: dict[str, NDArray[np.float64]] = {"mean": mean, "sum": total}
        if "std dev" in names:
            # Two-pass variance (deviations from each label's mean): no cancellation.
            deviation = picked - np.repeat(mean, n.astype(np.intp))
            with np.errstate(divide="ignore", invalid="ignore"):
                variance = np.add.reduceat(deviation * deviation, self.starts) / (n - 1)
            found["std dev"] = np.where(n > 1, np.sqrt(variance), np.nan)
        if "max" in names:
            found["max"] = np.maximum.reduceat(picked, self.starts)
        if "min" in names:
            found["min"] = np.minimum.reduceat(picked, self.starts)
        for name in names:
            out[name][self.found] = found[name][self.pos]
        return out


def nucleus_measurement_names(*, typed: bool, cells: bool) -> list[str]:
    """Every measurement name written, in output order (for docs, tests and empty tables)."""
    names = [f"Nucleus: {name}" for _, name in SHAPE_NAMES]
    names += [f"Nucleus: {s} OD {stat}" for s, stats in NUCLEUS_STATS.items() for stat in stats]
    if cells:
        names += [f"Cell: {name}" for _, name in SHAPE_NAMES]
        for prefix in ("Cell: ", "Cytoplasm: "):
            names += [f"{prefix}{s} OD {stat}" for s, stats in COMPARTMENT_STATS.items()
                      for stat in stats]
        names.append(AREA_RATIO)
    names.append(DETECTION_PROBABILITY)
    if typed:
        names.append(CLASS_PROBABILITY)
    return names


def _stain_channels(rgb: NDArray[np.uint8], stains: StainVectors) -> dict[str, NDArray[np.float32]]:
    """Hematoxylin and eosin OD of the region's pixels (model grid)."""
    amounts = deconvolve(rgb, stains)
    return {stain: np.ascontiguousarray(amounts[..., k]) for k, stain in enumerate(STAINS)}


def measure_region(
    table: NucleusTable,
    labels: NDArray[np.integer],
    wanted: NDArray[np.integer],
    rgb: NDArray[np.uint8] | None,
    *,
    stains: StainVectors,
    factor: int,
    to_level0: tuple[float, float, float],
    slide_mpp: float,
    typed: bool,
    cell_expansion_px: float | None = None,
) -> NucleusTable:
    """``table`` with its QuPath measurements (and cells when ``cell_expansion_px`` is given).

    Parameters
    ----------
    table : NucleusTable
        One region's reported nuclei; row ``i`` is label ``wanted[i]`` of ``labels``.
    labels : (H, W) int ndarray
        The region's nucleus label map (``factor`` times finer than ``rgb``).
    wanted : (N,) int ndarray
        Label of each table row.
    rgb : (H / factor, W / factor, 3) uint8 ndarray or None
        The region's pixels on the model grid; None skips the intensity measurements.
    stains : StainVectors
        The slide's stain vectors.
    factor : int
        Label grid pixels per model pixel.
    to_level0 : (scale, x0, y0)
        Label-grid pixel index ``p`` lies at level-0 ``scale * (p + (x0, y0) + 0.5)``.
    slide_mpp : float
        µm per level-0 pixel.
    typed : bool
        Whether the model classifies (writes "Class probability").
    cell_expansion_px : float, optional
        Cell expansion in label-grid pixels; None for nuclei only.
    """
    from worker.cells import expand_nuclei, trace_outlines

    want = np.asarray(wanted, np.int64).reshape(-1)
    if len(want) != len(table):
        raise ValueError(f"{len(want)} labels for a table of {len(table)} nuclei")
    lab = np.asarray(labels)
    if rgb is not None and tuple(np.shape(rgb)[:2]) != (lab.shape[0] // factor,
                                                        lab.shape[1] // factor):
        raise ValueError(f"rgb {np.shape(rgb)} does not match labels {lab.shape} / {factor}")
    out = shape_measurements(table.vertices, table.offsets, slide_mpp, "Nucleus: ")
    channels = _stain_channels(rgb, stains) if rgb is not None else None
    if channels is not None:
        out |= intensity_measurements(lab, want, channels, NUCLEUS_STATS, "Nucleus: ", factor)
    cell_vertices = cell_offsets = None
    if cell_expansion_px is not None:
        cell_labels = expand_nuclei(lab, cell_expansion_px)
        rings, cell_offsets = trace_outlines(cell_labels, want)
        scale, x0, y0 = to_level0
        cell_vertices = ((rings + (x0 + 0.5, y0 + 0.5)) * scale).astype(np.float32)
        out |= shape_measurements(cell_vertices, cell_offsets, slide_mpp, "Cell: ")
        if channels is not None:
            out |= intensity_measurements(cell_labels, want, channels, COMPARTMENT_STATS,
                                          "Cell: ", factor)
            cytoplasm = np.where(lab > 0, 0, cell_labels)
            out |= intensity_measurements(cytoplasm, want, channels, COMPARTMENT_STATS,
                                          "Cytoplasm: ", factor)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = out[f"Nucleus: Area {MICRO}^2"] / out[f"Cell: Area {MICRO}^2"]
        out[AREA_RATIO] = np.minimum(ratio, 1.0).astype(np.float32)
    out[DETECTION_PROBABILITY] = table.np_prob.astype(np.float32)
    if typed:
        # An unclassified nucleus has no class, hence no class probability (NaN is not written).
        out[CLASS_PROBABILITY] = np.where(table.type > 0, table.type_prob, np.nan).astype(np.float32)
    return dataclasses.replace(table, measurements=out, cell_vertices=cell_vertices,
                               cell_offsets=cell_offsets)
