"""QuPath GeoJSON: one detection per nucleus, gzipped, split into parts of at most ~200k.

Follows ``shared/docs/qupath-geojson.md``: a ``FeatureCollection`` of ``Polygon`` detections with a
closed ring, a ``{"name", "color"}`` classification, numeric measurements only, and a UUID ``id``.
QuPath imports nothing from a file with one bad feature, so every polygon is validated *after* its
coordinates are rounded to 0.01 px (rounding alone can create self-intersections), repaired when
invalid and dropped when degenerate.

Files written under ``root``:

- ``nuclei.geojson.gz`` when at most ``max_per_file`` nuclei are written, otherwise
  ``nuclei-part-001.geojson.gz``, ``nuclei-part-002.geojson.gz``, ... (each a complete
  FeatureCollection QuPath imports on its own) and no ``nuclei.geojson.gz``;
- ``nuclei-index.json`` always: the files in order with their nucleus counts, the total written and
  the rows repaired or dropped, so a client finds every part without listing the directory.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import numpy as np
import shapely
from numpy.typing import NDArray

from models.card import ClassInfo
from worker.nuclei import NucleusTable
from worker.writers._common import ClassTable, join, nucleus_ids, prepare_root, write_json

__all__ = [
    "GEOJSON_NAME",
    "GZIP_LEVEL",
    "INDEX_NAME",
    "MAX_PER_FILE",
    "MIN_AREA_PX",
    "CleanPolygons",
    "clean_polygons",
    "part_name",
    "write_geojson",
]

logger = logging.getLogger(__name__)

GEOJSON_NAME = "nuclei.geojson.gz"
"""File name when the nuclei fit in one file."""

INDEX_NAME = "nuclei-index.json"
"""File listing the GeoJSON file(s) written and their nucleus counts."""

MAX_PER_FILE = 200_000
"""Nuclei per GeoJSON file; QuPath needs a ~2 GB heap to import 200k (see the QuPath notes)."""

MIN_AREA_PX = 0.01
"""Polygons smaller than this (level-0 px²) after rounding are degenerate and dropped."""

DECIMALS = 2
"""Coordinates are written rounded to 0.01 level-0 px (QuPath 0.6+ snaps to that grid anyway)."""

MEASUREMENT_DECIMALS = 4
"""Measurements are rounded so float32 noise (0.8799999952316284) is not written."""

GZIP_LEVEL = 3
"""gzip level of the GeoJSON files: level 6 is ~10 % smaller but takes twice the CPU time
(measured on 200k nuclei: 45 MB in 3.5 s vs 41 MB in 6.1 s)."""

_BLOCK = 4096
"""Features formatted per write call: bounds memory to a few MB whatever the slide."""


@dataclass(frozen=True, eq=False)
class CleanPolygons:
    """Polygons ready for QuPath: valid, closed, rounded to 0.01 px, inside the slide.

    Attributes
    ----------
    rows : (k,) int64 ndarray
        Rows of the nucleus table that are written, ascending.
    coords : (m, 2) float64 ndarray
        Closed rings (first vertex repeated last) as (x, y) level-0 pixels; ring ``i`` is
        ``coords[offsets[i]:offsets[i + 1]]``.
    offsets : (k + 1,) int64 ndarray
    repaired : (r,) int64 ndarray
        Rows whose polygon was invalid and was replaced by the largest polygon of its valid form.
    dropped : (d,) int64 ndarray
        Rows not written: fewer than 3 vertices, a non-finite vertex, no area inside the slide,
        or beyond repair.
    """

    rows: NDArray[np.int64]
    coords: NDArray[np.float64]
    offsets: NDArray[np.int64]
    repaired: NDArray[np.int64]
    dropped: NDArray[np.int64]

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"CleanPolygons(n={len(self)}, repaired={len(self.repaired)}, "
                f"dropped={len(self.dropped)})")

    def ring(self, i: int) -> NDArray[np.float64]:
        """Closed ring (x, y) of the ``i``-th kept polygon (table row ``rows[i]``)."""
        return self.coords[self.offsets[i] : self.offsets[i + 1]]

    @property
    def stats(self) -> dict[str, int]:
        return {"written": len(self), "repaired": len(self.repaired), "dropped": len(self.dropped)}


def _slide_size(slide_shape: Sequence[int]) -> tuple[float, float]:
    if len(slide_shape) < 2 or min(slide_shape[0], slide_shape[1]) <= 0:
        raise ValueError(f"slide_shape must be (height, width) > 0, got {tuple(slide_shape)}")
    return float(slide_shape[0]), float(slide_shape[1])


def _snap(xy: NDArray, width: float, height: float) -> NDArray[np.float64]:
    """Clip (x, y) into the slide and round to the 0.01 px grid (``+ 0.0`` turns -0.0 into 0.0)."""
    out = np.asarray(xy, dtype=np.float64).copy()
    np.clip(out[:, 0], 0.0, width, out=out[:, 0])
    np.clip(out[:, 1], 0.0, height, out=out[:, 1])
    return np.round(out, DECIMALS) + 0.0


def _largest_polygon(geometry: shapely.Geometry) -> shapely.Polygon | None:
    stack, polygons = [geometry], []
    while stack:
        g = stack.pop()
        if isinstance(g, shapely.Polygon):
            if not g.is_empty:
                polygons.append(g)
        elif hasattr(g, "geoms"):
            stack.extend(g.geoms)
    return max(polygons, key=lambda p: p.area) if polygons else None


def _repair(polygon: shapely.Polygon, width: float, height: float,
            min_area: float) -> NDArray[np.float64] | None:
    """Closed, rounded ring of the largest part of ``polygon`` made valid, or None if none is.

    Only the exterior is kept: a nucleus is a filled shape, and the exterior ring of a valid
    polygon is itself a valid polygon. Rounding the new vertices (intersection points) can break
    validity again, so the second attempt snaps with GEOS' precision reducer first.
    """
    fixed = shapely.make_valid(polygon)
    for _ in range(2):
        part = _largest_polygon(fixed)
        if part is None:
            return None
        ring = _snap(np.asarray(part.exterior.coords), width, height)
        if len(ring) >= 4:
            candidate = shapely.Polygon(ring)
            if candidate.is_valid and candidate.area >= min_area:
                return ring
        fixed = shapely.make_valid(shapely.set_precision(part, 10.0**-DECIMALS))
    return None


def _splice(
    closed: NDArray[np.float64],
    offsets: NDArray[np.int64],
    good: NDArray[np.bool_],
    repaired: dict[int, NDArray[np.float64]],
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Rings kept (``good``) with the ``repaired`` ones put in their place, in ring order, using
    one slice per run of untouched rings rather than one array per ring.

    Returns the concatenated rings and the size of every ring (0 where dropped).
    """
    sizes = np.where(good, np.diff(offsets), 0)
    keep_vertex = np.repeat(good, np.diff(offsets))
    pieces, previous = [], 0
    for j in sorted(repaired):
        span = slice(offsets[previous], offsets[j])
        pieces += [closed[span][keep_vertex[span]], repaired[j]]
        sizes[j] = len(repaired[j])
        previous = j + 1
    span = slice(offsets[previous], offsets[-1])
    pieces.append(closed[span][keep_vertex[span]])
    return np.concatenate(pieces), sizes


def clean_polygons(
    table: NucleusTable,
    *,
    slide_shape: Sequence[int],
    min_area: float = MIN_AREA_PX,
) -> CleanPolygons:
    """Make every nucleus polygon importable by QuPath, or drop it.

    Vertices are clipped to ``[0, width] × [0, height]`` and rounded to 0.01 px; the rings are
    then checked (vectorised) for validity and area, and invalid ones repaired one by one.

    Parameters
    ----------
    table : NucleusTable
        Nuclei in level-0 pixels.
    slide_shape : (int, int)
        Level-0 (height, width) of the slide.
    min_area : float
        Smallest area kept, level-0 px².

    Returns
    -------
    CleanPolygons
    """
    if not isinstance(table, NucleusTable):
        raise TypeError(f"table must be a NucleusTable, got {type(table).__name__}")
    height, width = _slide_size(slide_shape)
    lengths = np.diff(table.offsets)
    vertex_row = np.repeat(np.arange(len(table)), lengths)
    bad_vertices = np.bincount(vertex_row, weights=~np.isfinite(table.vertices).all(axis=1),
                               minlength=len(table))
    is_candidate = (lengths >= 3) & (bad_vertices == 0)
    candidates = np.flatnonzero(is_candidate)
    verts = _snap(table.vertices[is_candidate[vertex_row]], width, height)
    ring_len = lengths[candidates]
    starts = np.concatenate([[0], np.cumsum(ring_len)]).astype(np.int64)
    # Close each ring by repeating its first vertex after its last.
    closed = np.insert(verts, starts[1:], verts[starts[:-1]], axis=0)
    closed_offsets = starts + np.arange(len(starts))
    ring_id = np.repeat(np.arange(len(candidates)), ring_len + 1)
    polygons = shapely.polygons(shapely.linearrings(closed, indices=ring_id))
    good = shapely.is_valid(polygons) & (shapely.area(polygons) >= min_area)

    repaired: dict[int, NDArray[np.float64]] = {}  # ring index -> its repaired ring
    dropped: list[int] = np.flatnonzero(~is_candidate).tolist()
    for j in np.flatnonzero(~good).tolist():
        # Valid but (near) zero area: nothing to repair, the nucleus is degenerate.
        ring = _repair(polygons[j], width, height, min_area) if not polygons[j].is_valid else None
        if ring is None:
            dropped.append(int(candidates[j]))
        else:
            repaired[j] = ring
    coords, sizes = _splice(closed, closed_offsets, good, repaired)
    good[list(repaired)] = True
    kept = np.flatnonzero(good)
    if dropped:
        logger.info("GeoJSON: dropped %d degenerate nuclei polygons (rows %s%s)", len(dropped),
                    sorted(dropped)[:10], "..." if len(dropped) > 10 else "")
    if repaired:
        logger.info("GeoJSON: repaired %d invalid nuclei polygons", len(repaired))
    return CleanPolygons(
        rows=candidates[kept].astype(np.int64),
        coords=coords,
        offsets=np.concatenate([[0], np.cumsum(sizes[kept])]).astype(np.int64),
        repaired=candidates[sorted(repaired)].astype(np.int64),
        dropped=np.asarray(sorted(dropped), np.int64),
    )


def _measurement_columns(table: NucleusTable, typed: bool) -> list[tuple[str, NDArray]]:
    columns = [
        ("Area µm^2", table.area_um2),
        ("Perimeter µm", table.perimeter_um),
        ("Solidity", table.solidity),
        ("Eccentricity", table.eccentricity),
        ("Detection probability", table.np_prob),
    ]
    if typed:  # an untyped model has no class vote; its constant 1.0 would only mislead
        columns.insert(4, ("Class probability", table.type_prob))
    return columns


def _measurement_texts(columns: list[tuple[str, NDArray]], rows: NDArray) -> list[str]:
    """``"name":value`` members per nucleus, NaN and infinities left out (QuPath wants numbers)."""
    keys = [json.dumps(name, ensure_ascii=False) for name, _ in columns]
    values = [np.round(np.asarray(column[rows], np.float64), MEASUREMENT_DECIMALS)
              for _, column in columns]
    if all(np.isfinite(v).all() for v in values):  # the usual case: one format per nucleus
        template = ",".join(f"{key}:%r" for key in keys)
        return [template % members for members in zip(*(v.tolist() for v in values), strict=True)]
    per_column = [[f"{key}:{v!r}" if math.isfinite(v) else "" for v in column.tolist()]
                  for key, column in zip(keys, values, strict=True)]
    return [",".join(t for t in members if t) for members in zip(*per_column, strict=True)]


def part_name(index: int) -> str:
    """Name of the ``index``-th (1-based) GeoJSON part: ``nuclei-part-001.geojson.gz``."""
    return f"nuclei-part-{index:03d}.geojson.gz"


def _ring_text(coords: NDArray[np.float64], offsets: NDArray[np.int64]) -> tuple[str, list[int]]:
    """JSON text ``[x,y],[x,y],...`` of each ring, built with array arithmetic, not per number.

    ``coords`` are non-negative multiples of 0.01 (see :func:`_snap`). Each pair is laid out in a
    fixed-width byte matrix (digits from integer division) and the characters not wanted — leading
    zeros, a trailing zero decimal, the comma after a ring's last pair — are masked out, giving
    the same text as Python's ``repr`` (``1000.0``, ``1000.5``, ``1000.25``) some ten times faster.

    Returns
    -------
    text : str
        All rings, concatenated.
    bounds : list of int
        Ring ``i`` is ``text[bounds[i]:bounds[i + 1]]``.
    """
    hundredths = np.rint(coords * 100.0).astype(np.int64)
    whole, frac = np.divmod(hundredths, 100)
    width = len(str(int(whole.max()))) if len(whole) else 1
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    digits = (whole[..., None] // powers) % 10 + ord("0")  # (m, 2, width)
    leading = whole[..., None] < powers
    leading[..., -1] = False  # "0" keeps its units digit
    m = len(coords)
    step = width + 4  # digits, ".", two decimals, then "," or "]"
    chars = np.empty((m, 2 * step + 2), np.uint8)
    keep = np.ones(chars.shape, bool)
    chars[:, 0] = ord("[")
    for axis in (0, 1):
        start = 1 + axis * step
        chars[:, start : start + width] = digits[:, axis]
        keep[:, start : start + width] = ~leading[:, axis]
        chars[:, start + width] = ord(".")
        chars[:, start + width + 1] = frac[:, axis] // 10 + ord("0")
        chars[:, start + width + 2] = frac[:, axis] % 10 + ord("0")
        keep[:, start + width + 2] = frac[:, axis] % 10 != 0
        chars[:, start + width + 3] = ord("]" if axis else ",")
    chars[:, -1] = ord(",")
    keep[offsets[1:] - 1, -1] = False  # no comma after the last pair of a ring
    per_pair = np.concatenate([[0], np.cumsum(keep.sum(axis=1))])
    return chars[keep].tobytes().decode("ascii"), per_pair[offsets].tolist()


class _FeatureFormatter:
    """Formats features ``lo:hi`` of the clean polygons as compact GeoJSON text."""

    def __init__(self, table: NucleusTable, polygons: CleanPolygons, classes: ClassTable,
                 ids: Sequence[str]) -> None:
        self.table, self.polygons, self.ids = table, polygons, ids
        self.class_json = [
            json.dumps({"name": c.name, "color": list(c.colour)}, ensure_ascii=False,
                       separators=(",", ":"))
            for c in classes.by_type
        ]
        self.type_index = classes.type_index(table.type[polygons.rows])
        self.columns = _measurement_columns(table, classes.typed)

    def block(self, lo: int, hi: int) -> str:
        p = self.polygons
        s0 = int(p.offsets[lo])
        text, bounds = _ring_text(p.coords[s0 : int(p.offsets[hi])], p.offsets[lo : hi + 1] - s0)
        measurements = _measurement_texts(self.columns, p.rows[lo:hi])
        classes = self.type_index[lo:hi].tolist()
        texts = []
        for j in range(hi - lo):
            texts.append(
                '{"type":"Feature","id":"' + self.ids[lo + j]
                + '","geometry":{"type":"Polygon","coordinates":[['
                + text[bounds[j] : bounds[j + 1]]
                + ']]},"properties":{"objectType":"detection","classification":'
                + self.class_json[classes[j]] + ',"measurements":{' + measurements[j] + "}}}"
            )
        return ",\n".join(texts)


def _write_part(fs: fsspec.AbstractFileSystem, path: str, formatter: _FeatureFormatter,
                lo: int, hi: int, compresslevel: int) -> None:
    # mtime=0 and no file name in the gzip header: the same nuclei give the same bytes.
    with fs.open(path, "wb") as raw, gzip.GzipFile(
        filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0
    ) as gz, ThreadPoolExecutor(1, thread_name_prefix="geojson-gzip") as pool:
        # zlib releases the GIL: compressing block i overlaps formatting block i + 1.
        pending = pool.submit(gz.write, b'{"type":"FeatureCollection","features":[\n')
        for start in range(lo, hi, _BLOCK):
            data = formatter.block(start, min(start + _BLOCK, hi)).encode("utf-8")
            pending.result()
            pending = pool.submit(gz.write, (b",\n" if start > lo else b"") + data)
        pending.result()
        gz.write(b"\n]}\n")


def write_geojson(
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    classes: Sequence[ClassInfo],
    seed: str,
    slide_shape: Sequence[int],
    max_per_file: int = MAX_PER_FILE,
    polygons: CleanPolygons | None = None,
    ids: Sequence[str] | None = None,
    compresslevel: int = GZIP_LEVEL,
) -> list[str]:
    """Write the nuclei as QuPath detections (see the module docstring for the file layout).

    Parameters
    ----------
    table : NucleusTable
        Nuclei in level-0 pixels.
    fs : fsspec.AbstractFileSystem
        Where to write (local, memory, S3...).
    root : str
        Directory inside ``fs``.
    classes : sequence of ClassInfo
        The model card's classes (``classes[0]`` background; empty for an untyped model, whose
        nuclei are written as class ``"Nucleus"``).
    seed : str
        Slide identity (e.g. its SHA-256) from which stable UUIDs are derived.
    slide_shape : (int, int)
        Level-0 (height, width); coordinates are clipped into it.
    max_per_file : int
        Above this many nuclei, write parts of at most this many.
    polygons : CleanPolygons, optional
        Result of :func:`clean_polygons` when the caller already has it.
    ids : sequence of str, optional
        One UUID per table row (default: derived from ``seed``).
    compresslevel : int
        gzip level 1-9 (default :data:`GZIP_LEVEL`).

    Returns
    -------
    list of str
        Names written under ``root``: the GeoJSON file(s) in order, then the index.
    """
    prepare_root(fs, root)
    if not isinstance(max_per_file, int | np.integer) or max_per_file < 1:
        raise ValueError(f"max_per_file must be a positive integer, got {max_per_file!r}")
    if compresslevel not in range(1, 10):
        raise ValueError(f"compresslevel must be within 1..9, got {compresslevel!r}")
    if polygons is None:
        polygons = clean_polygons(table, slide_shape=slide_shape)
    class_table = ClassTable.from_classes(classes)
    if ids is None:
        kept_ids: Sequence[str] = nucleus_ids(seed, polygons.rows.tolist())
    else:
        if len(ids) != len(table):
            raise ValueError(f"ids has {len(ids)} entries for a table of {len(table)} nuclei")
        kept_ids = [ids[r] for r in polygons.rows.tolist()]
    formatter = _FeatureFormatter(table, polygons, class_table, kept_ids)

    n = len(polygons)
    bounds = list(range(0, n, max_per_file)) + [n] if n else [0, 0]
    split = len(bounds) > 2
    names, counts = [], []
    for i, (lo, hi) in enumerate(itertools.pairwise(bounds), start=1):
        names.append(part_name(i) if split else GEOJSON_NAME)
        counts.append(hi - lo)
        _write_part(fs, join(root, names[-1]), formatter, lo, hi, compresslevel)
    _remove_stale(fs, root, keep=set(names))
    write_json(fs, join(root, INDEX_NAME), {
        "format": "QuPath GeoJSON FeatureCollection of detections, gzip",
        "coordinates": "level-0 pixels (x right, y down), rounded to 0.01",
        "parts": [{"name": name, "count": count}
                  for name, count in zip(names, counts, strict=True)],
        "total": n,
        "repaired": len(polygons.repaired),
        "dropped": len(polygons.dropped),
        "dropped_rows": polygons.dropped,
        "max_per_file": max_per_file,
    })
    logger.info("GeoJSON: wrote %d nuclei in %d file(s) under %s", n, len(names), root)
    return [*names, INDEX_NAME]


def _remove_stale(fs: fsspec.AbstractFileSystem, root: str, *, keep: set[str]) -> None:
    """Delete GeoJSON files of an earlier run in ``root`` that this run did not write, so a
    re-run with a different split leaves no stray parts behind."""
    for path in fs.glob(join(root, "nuclei*.geojson.gz")):
        name = path.rstrip("/").rsplit("/", 1)[-1]
        if name not in keep and (name == GEOJSON_NAME or name.startswith("nuclei-part-")):
            fs.rm_file(path)
