"""GeoJSON text of QuPath features: one detection (or cell) per nucleus, built with array
arithmetic rather than per number, and an upper bound of each feature's size so files can be
planned before they are written (see :mod:`worker.writers.geojson`).

Each feature follows ``shared/docs/qupath-geojson.md``: a ``Polygon`` with a closed, valid ring
(:mod:`worker.writers.polygons`), numeric measurements only (NaN left out), a UUID ``id``, and a
``{"name", "color"}`` classification — none at all for unclassified nuclei, which carry no class
probability either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from models.card import ClassInfo
from worker.nuclei import COLUMNS, NucleusTable
from worker.writers._common import ClassTable
from worker.writers.polygons import CleanPolygons, clean_polygons, clean_rings

__all__ = [
    "HEAD",
    "TAIL",
    "ChunkFeatures",
    "FeatureSpec",
    "ObjectType",
    "feature_bounds",
    "measurement_columns",
    "plan_entries",
]

logger = logging.getLogger(__name__)

MEASUREMENT_DECIMALS = 4
"""Measurements are rounded so float32 noise (0.8799999952316284) is not written."""

ObjectType = Literal["detections", "cells"]

_LEGACY = tuple((c.measurement, c.name, f"Nucleus: {c.measurement}")
                for c in COLUMNS if c.measurement is not None)
"""Columns of the table written under these names unless ``table.measurements`` has the QuPath
equivalent (third name) or the same name."""

HEAD = b'{"type":"FeatureCollection","features":[\n'
TAIL = b"\n]}\n"


# --------------------------------------------------------------------------- measurements


def measurement_columns(table: NucleusTable, classes: ClassTable,
                        keep: Sequence[str] | None = None) -> list[tuple[str, NDArray]]:
    """(name, one value per row) of every measurement written, in output order.

    ``table.measurements`` first, verbatim; then the table's own shape columns not already there;
    ``Class probability`` (typed models) and ``Detection probability``. Unclassified nuclei get no
    class probability (NaN, which is not written). ``keep`` selects and orders names.
    """
    extra: dict[str, NDArray] = dict(getattr(table, "measurements", None) or {})
    columns: list[tuple[str, NDArray]] = list(extra.items())
    for name, attr, qupath in _LEGACY:
        if name not in extra and qupath not in extra:
            columns.append((name, getattr(table, attr)))
    index = classes.type_index(table.type)
    if classes.typed:
        prob = np.asarray(extra.get("Class probability", table.type_prob), np.float64)
        prob = np.where(index > 0, prob, np.nan)
        columns = [c for c in columns if c[0] != "Class probability"]
        columns.append(("Class probability", prob))
    else:
        columns = [c for c in columns if c[0] != "Class probability"]
    if "Detection probability" not in extra:
        columns.append(("Detection probability", table.np_prob))
    if keep is None:
        return columns
    by_name = dict(columns)
    unknown = [k for k in keep if k not in by_name]
    if unknown:
        raise ValueError(f"unknown measurement(s) {unknown}; the table has: {list(by_name)}")
    return [(k, by_name[k]) for k in keep]


def _measurement_texts(columns: list[tuple[str, NDArray]], rows: NDArray) -> list[str]:
    """``"name":value`` members per row, NaN and infinities left out (QuPath wants numbers)."""
    if not columns:
        return [""] * len(rows)
    keys = [json.dumps(name, ensure_ascii=False) for name, _ in columns]
    values = np.stack([np.round(np.asarray(column[rows], np.float64), MEASUREMENT_DECIMALS)
                       for _, column in columns], axis=1)
    finite = np.isfinite(values)
    texts = [""] * len(rows)
    # One template per pattern of finite values (usually one or two: unclassified nuclei have no
    # class probability), rather than a per-value test on every row.
    patterns = None
    if len(keys) <= 62:
        patterns = (finite * (np.int64(1) << np.arange(len(keys), dtype=np.int64))).sum(axis=1)
    if patterns is None:
        for j in range(len(rows)):
            texts[j] = ",".join(f"{key}:{v!r}" for key, v, ok in
                                zip(keys, values[j].tolist(), finite[j].tolist(), strict=True) if ok)
        return texts
    for pattern in np.unique(patterns).tolist():
        where = np.flatnonzero(patterns == pattern)
        use = finite[where[0]]
        template = ",".join(f"{key}:%r" for key, ok in zip(keys, use.tolist(), strict=True) if ok)
        for j, members in zip(where.tolist(), values[where][:, use].tolist(), strict=True):
            texts[j] = template % tuple(members)
    return texts


def _value_chars(values: NDArray) -> NDArray[np.int64]:
    """Upper bound of the characters of each value as written (rounded to 4 decimals)."""
    a = np.nan_to_num(np.abs(np.asarray(values, np.float64)), nan=0.0, posinf=1e300)
    digits = np.floor(np.log10(np.maximum(np.minimum(a, 1e15), 1.0))).astype(np.int64) + 1
    return np.where(a < 1e15, 1 + digits + 1 + MEASUREMENT_DECIMALS, 24)


# --------------------------------------------------------------------------- text


def _ring_text(coords: NDArray[np.float64], offsets: NDArray[np.int64]) -> tuple[str, list[int]]:
    """JSON text ``[x,y],[x,y],...`` of each ring, built with array arithmetic, not per number.

    ``coords`` are non-negative multiples of 0.01. Each pair is laid out in a fixed-width byte
    matrix (digits from integer division) and the characters not wanted — leading zeros, a
    trailing zero decimal, the comma after a ring's last pair — are masked out, giving the same
    text as Python's ``repr`` (``1000.0``, ``1000.5``, ``1000.25``) some ten times faster.

    Returns the rings' text and bounds: ring ``i`` is ``text[bounds[i]:bounds[i + 1]]``.
    """
    if not len(coords):
        return "", [0] * len(offsets)
    hundredths = np.rint(coords * 100.0).astype(np.int64)
    whole, frac = np.divmod(hundredths, 100)
    width = len(str(int(whole.max())))
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


def _class_json(c: ClassInfo) -> str:
    return json.dumps({"name": c.name, "color": [int(v) for v in c.colour]}, ensure_ascii=False,
                      separators=(",", ":"))


@dataclass(frozen=True)
class FeatureSpec:
    """What every feature of one output carries (the same for every chunk)."""

    classes: ClassTable
    objects: ObjectType
    keep: tuple[str, ...] | None
    slide_shape: tuple[int, int]

    @property
    def fixed_bytes(self) -> int:
        longest = max(len(_class_json(c)) for c in self.classes.by_type)
        frame = ('{"type":"Feature","id":"00000000-0000-0000-0000-000000000000",'
                 '"geometry":{"type":"Polygon","coordinates":[[]]},"properties":{"objectType":'
                 '"detection","classification":,"measurements":{}}},\n')
        cell = ',"nucleusGeometry":{"type":"Polygon","coordinates":[[]]}'
        return len(frame) + longest + (len(cell) if self.objects == "cells" else 0)

    @property
    def pair_bytes(self) -> int:
        width = len(str(int(max(self.slide_shape))))
        return 2 * (width + 3) + 4  # "[x,y]," with x and y "digits.dd"


def feature_bounds(table: NucleusTable, spec: FeatureSpec) -> NDArray[np.int64]:
    """Upper bound of each row's feature size in bytes (repairs of invalid rings aside)."""
    vertices = np.diff(table.offsets) + 1
    if spec.objects == "cells":
        cells = table.cell_offsets
        vertices = vertices + (np.diff(cells) + 1 if cells is not None else vertices)
    size = spec.fixed_bytes + vertices * spec.pair_bytes
    for name, column in measurement_columns(table, spec.classes, spec.keep):
        size = size + len(json.dumps(name, ensure_ascii=False).encode()) + 2 + _value_chars(column)
    return size.astype(np.int64)


def plan_entries(bounds: NDArray[np.int64], budget: int) -> list[tuple[int, int]]:
    """Row ranges ``[lo, hi)`` whose bounds add up to at most ``budget`` bytes each (a feature
    larger than the budget alone goes in an entry of its own)."""
    room = budget - len(HEAD) - len(TAIL)
    cumulative = np.cumsum(bounds)
    entries, lo, base = [], 0, 0
    while lo < len(bounds):
        hi = max(int(np.searchsorted(cumulative, base + room, side="right")), lo + 1)
        entries.append((lo, hi))
        base, lo = int(cumulative[hi - 1]), hi
    return entries or [(0, 0)]


class ChunkFeatures:
    """The features of one chunk of rows, formatted block by block."""

    def __init__(self, table: NucleusTable, ids: Sequence[str], spec: FeatureSpec) -> None:
        self.polygons = clean_polygons(table, slide_shape=spec.slide_shape)
        self.ids, self.spec = ids, spec
        self.type_index = spec.classes.type_index(table.type)
        self.class_json = [_class_json(c) for c in spec.classes.by_type]
        self.columns = measurement_columns(table, spec.classes, spec.keep)
        self.cells: CleanPolygons | None = None
        self.cell_of = np.full(len(table), -1, np.int64)
        if spec.objects == "cells":
            if table.cell_vertices is None or table.cell_offsets is None:
                raise ValueError("the nucleus table has no cell boundaries (run with cells)")
            self.cells = clean_rings(table.cell_vertices, table.cell_offsets,
                                     slide_shape=spec.slide_shape)
            self.cell_of[self.cells.rows] = np.arange(len(self.cells.rows))

    def __len__(self) -> int:
        return len(self.polygons)

    def block(self, lo: int, hi: int) -> str:
        """Features ``lo:hi`` (of the kept polygons), joined by ``",\\n"``."""
        p = self.polygons
        s0 = int(p.offsets[lo])
        text, bounds = _ring_text(p.coords[s0 : int(p.offsets[hi])], p.offsets[lo : hi + 1] - s0)
        rows = p.rows[lo:hi]
        measurements = _measurement_texts(self.columns, rows)
        kinds = self.type_index[rows].tolist()
        cells = self._cell_texts(rows, text, bounds)
        objtype = '"cell"' if self.cells is not None else '"detection"'
        if cells is None:
            template = ('{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":'
                        '[[%s]]},"properties":{"objectType":' + objtype
                        + '%s,"measurements":{%s}}}')
        else:
            template = ('{"type":"Feature","id":"%s","geometry":{"type":"Polygon","coordinates":'
                        '[[%s]]},"nucleusGeometry":{"type":"Polygon","coordinates":[[%s]]},'
                        '"properties":{"objectType":' + objtype + '%s,"measurements":{%s}}}')
        labels = ["", *(',"classification":' + c for c in self.class_json[1:])]
        ids = self.ids
        texts = []
        for j, row in enumerate(rows.tolist()):
            ring = text[bounds[j] : bounds[j + 1]]
            if cells is None:
                texts.append(template % (ids[row], ring, labels[kinds[j]], measurements[j]))
            else:
                texts.append(template % (ids[row], cells[j], ring, labels[kinds[j]],
                                         measurements[j]))
        return ",\n".join(texts)

    def _cell_texts(self, rows: NDArray, nucleus_text: str, nucleus_bounds: list[int]
                    ) -> list[str] | None:
        """Cell ring text per row (the nucleus' own where its cell ring was dropped)."""
        if self.cells is None:
            return None
        c = self.cells
        where = self.cell_of[rows]
        have = where[where >= 0]
        starts, ends = c.offsets[have], c.offsets[have + 1]
        pieces = [c.coords[a:b] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
        coords = np.concatenate(pieces) if pieces else np.zeros((0, 2))
        local = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        text, bounds = _ring_text(coords, local)
        out, k = [], 0
        for j, w in enumerate(where.tolist()):
            if w >= 0:
                out.append(text[bounds[k] : bounds[k + 1]])
                k += 1
            else:
                out.append(nucleus_text[nucleus_bounds[j] : nucleus_bounds[j + 1]])
        return out
