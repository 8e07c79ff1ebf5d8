"""Nucleus records (per region, model pixels) and the columnar nucleus table (level-0 pixels).

``hover_instances`` returns :class:`Nucleus` records in the coordinates of the maps it was given.
The pipeline maps them to level-0 slide pixels and packs them into a :class:`NucleusTable`, the one
value every writer reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

__all__ = ["COLUMNS", "COLUMN_NAMES", "Column", "Nucleus", "NucleusTable"]


@dataclass(frozen=True, slots=True)
class Column:
    """One per-nucleus column of :class:`NucleusTable`, as every stored form writes it.

    Attributes
    ----------
    name : str
        The table's attribute, and the array's name in the stores.
    dtype : str
        numpy dtype of the values.
    shape : tuple of int
        Trailing shape of one row (``()`` for a scalar).
    unit : str
        What a value means, written into the zarr table's attributes.
    measurement : str or None
        QuPath measurement name the GeoJSON writes the column under (None: not a measurement).
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    unit: str
    measurement: str | None = None


COLUMNS: tuple[Column, ...] = (
    Column("centroid", "float64", (2,), "level-0 px (x, y)"),
    Column("bbox", "float64", (4,), "level-0 px (x_min, y_min, x_max, y_max), half-open"),
    Column("area_um2", "float32", (), "µm^2", "Area µm^2"),
    Column("perimeter_um", "float32", (), "µm", "Perimeter µm"),
    Column("solidity", "float32", (), "1 (area / convex hull area)", "Solidity"),
    Column("eccentricity", "float32", (), "1 (0 = circle)", "Eccentricity"),
    Column("type", "int16", (), "class index into attrs['classes'] (0 = unclassified)"),
    Column("type_prob", "float32", (), "1 (fraction of pixels voting for type)"),
    Column("np_prob", "float32", (), "1 (mean nucleus probability)"),
    Column("region", "int32", (), "region index"),
)
"""The per-nucleus columns, in stored order (the ragged vertices/offsets and the measurements
are handled apart). The one list: the table's checks, ``take`` and ``concat``, the zarr table's
writer and reader, and the GeoJSON's shape measurements read it."""

COLUMN_NAMES: tuple[str, ...] = tuple(column.name for column in COLUMNS)


@dataclass(frozen=True, slots=True)
class Nucleus:
    """One segmented nucleus, in the pixel coordinates of the maps it came from.

    Attributes
    ----------
    label : int
        Its id in the accompanying label image.
    centroid : (float, float)
        (x, y) centre of mass, pixels.
    bbox : (int, int, int, int)
        (x_min, y_min, x_max, y_max), half-open, pixels.
    area : int
        Pixel count.
    contour : (N, 2) float32 ndarray
        Outer boundary as (x, y) vertices, not closed (first vertex not repeated).
    type : int
        Class index into the model card's classes (0 = background/untyped).
    type_prob : float
        Fraction of the nucleus' pixels voting for ``type`` (1.0 when untyped).
    np_prob : float
        Mean nucleus probability over its pixels.
    perimeter : float
        Contour length, pixels.
    solidity : float
        Area over convex hull area.
    eccentricity : float
        Of the ellipse with the same second moments (0 = circle).
    """

    label: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]
    area: int
    contour: NDArray[np.float32]
    type: int = 0
    type_prob: float = 1.0
    np_prob: float = 1.0
    perimeter: float = 0.0
    solidity: float = 1.0
    eccentricity: float = 0.0


def _empty(shape: tuple[int, ...], dtype: type) -> NDArray:
    return np.zeros(shape, dtype=dtype)


@dataclass(eq=False)
class NucleusTable:
    """Columnar table of nuclei in level-0 slide pixels and physical units.

    All per-nucleus columns have length ``n``. Polygons are ragged: nucleus ``i`` owns
    ``vertices[offsets[i]:offsets[i + 1]]`` (x, y level-0 pixels, ring not closed).

    ``measurements`` maps QuPath measurement names to one float32 value per nucleus (insertion
    order is output order; NaN where undefined). ``cell_vertices``/``cell_offsets`` hold cell
    boundaries the same way as the nuclei, or are None when cells were not asked for.
    """

    centroid: NDArray[np.float64] = field(default_factory=lambda: _empty((0, 2), np.float64))
    bbox: NDArray[np.float64] = field(default_factory=lambda: _empty((0, 4), np.float64))
    area_um2: NDArray[np.float32] = field(default_factory=lambda: _empty((0,), np.float32))
    perimeter_um: NDArray[np.float32] = field(default_factory=lambda: _empty((0,), np.float32))
    solidity: NDArray[np.float32] = field(default_factory=lambda: _empty((0,), np.float32))
    eccentricity: NDArray[np.float32] = field(default_factory=lambda: _empty((0,), np.float32))
    type: NDArray[np.int16] = field(default_factory=lambda: _empty((0,), np.int16))
    type_prob: NDArray[np.float32] = field(default_factory=lambda: _empty((0,), np.float32))
    np_prob: NDArray[np.float32] = field(default_factory=lambda: _empty((0,), np.float32))
    vertices: NDArray[np.float32] = field(default_factory=lambda: _empty((0, 2), np.float32))
    offsets: NDArray[np.int64] = field(default_factory=lambda: _empty((1,), np.int64))
    region: NDArray[np.int32] = field(default_factory=lambda: _empty((0,), np.int32))
    measurements: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    cell_vertices: NDArray[np.float32] | None = None
    cell_offsets: NDArray[np.int64] | None = None

    def __post_init__(self) -> None:
        n = len(self.centroid)
        for name in COLUMN_NAMES:
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name!r} has length {len(getattr(self, name))}, expected {n}")
        if len(self.offsets) != n + 1 or self.offsets[-1] != len(self.vertices):
            raise ValueError("offsets must have n + 1 entries ending at len(vertices)")
        for key, values in self.measurements.items():
            if len(values) != n:
                raise ValueError(f"measurement {key!r} has length {len(values)}, expected {n}")
        if (self.cell_vertices is None) != (self.cell_offsets is None):
            raise ValueError("cell_vertices and cell_offsets must be given together")
        if self.cell_offsets is not None and self.cell_vertices is not None and (
            len(self.cell_offsets) != n + 1 or self.cell_offsets[-1] != len(self.cell_vertices)
        ):
            raise ValueError("cell_offsets must have n + 1 entries ending at len(cell_vertices)")

    @property
    def has_cells(self) -> bool:
        """Whether the table carries cell boundaries."""
        return self.cell_offsets is not None

    def cell_polygon(self, i: int) -> NDArray[np.float32]:
        """Cell boundary (x, y) of nucleus ``i``, ring not closed (raises without cells)."""
        if self.cell_vertices is None or self.cell_offsets is None:
            raise ValueError("this table has no cell boundaries")
        return self.cell_vertices[self.cell_offsets[i] : self.cell_offsets[i + 1]]

    def __len__(self) -> int:
        return len(self.centroid)

    def __repr__(self) -> str:
        return f"NucleusTable(n={len(self)}, vertices={len(self.vertices)})"

    def polygon(self, i: int) -> NDArray[np.float32]:
        """Vertices (x, y) of nucleus ``i``, ring not closed."""
        return self.vertices[self.offsets[i] : self.offsets[i + 1]]

    def counts(self, n_classes: int) -> NDArray[np.int64]:
        """Nuclei per class index, length ``n_classes``."""
        return np.bincount(self.type.astype(np.int64), minlength=n_classes)[:n_classes]

    def take(self, index: NDArray[np.intp] | NDArray[np.bool_]) -> NucleusTable:
        """A new table with the selected rows (integer indices or boolean mask)."""
        idx: NDArray[np.intp] = (np.flatnonzero(index) if np.asarray(index).dtype == bool
                                 else np.asarray(index).astype(np.intp, copy=False))
        vertices, offsets = _take_ragged(self.vertices, self.offsets, idx)
        cell_vertices = cell_offsets = None
        if self.cell_vertices is not None and self.cell_offsets is not None:
            cell_vertices, cell_offsets = _take_ragged(self.cell_vertices, self.cell_offsets, idx)
        return NucleusTable(
            **{name: getattr(self, name)[idx] for name in COLUMN_NAMES},
            vertices=vertices.astype(np.float32), offsets=offsets,
            measurements={k: v[idx] for k, v in self.measurements.items()},
            cell_vertices=cell_vertices, cell_offsets=cell_offsets,
        )

    @classmethod
    def from_nuclei(
        cls,
        nuclei: Sequence[Nucleus],
        *,
        scale: float = 1.0,
        offset: tuple[float, float] = (0.0, 0.0),
        mpp: float = 1.0,
        region: int = -1,
    ) -> NucleusTable:
        """Pack records, mapping their pixels to level-0 as ``level0 = scale * (p + offset)``.

        ``offset`` is (x, y) of the maps' origin in model pixels; ``scale`` is level-0 pixels per
        model pixel; ``mpp`` is µm per *model* pixel (for areas and perimeters).
        """
        n = len(nuclei)
        if n == 0:
            return cls()
        ox, oy = offset
        cent = np.array([nu.centroid for nu in nuclei], dtype=np.float64)
        cent = (cent + (ox, oy)) * scale
        bbox = np.array([nu.bbox for nu in nuclei], dtype=np.float64)
        bbox = (bbox + (ox, oy, ox, oy)) * scale
        lengths = np.array([len(nu.contour) for nu in nuclei], dtype=np.int64)
        verts = np.concatenate([np.asarray(nu.contour, dtype=np.float64) for nu in nuclei])
        # Contour vertices are pixel centres of boundary pixels; +0.5 moves them to the
        # continuous frame (pixel (0,0) spans 0..1) before scaling, so shapes stay centred.
        verts = ((verts + (ox + 0.5, oy + 0.5)) * scale).astype(np.float32)
        cent = cent + 0.5 * scale
        return cls(
            centroid=cent,
            bbox=bbox,
            area_um2=np.array([nu.area for nu in nuclei], np.float32) * np.float32(mpp * mpp),
            perimeter_um=np.array([nu.perimeter for nu in nuclei], np.float32) * np.float32(mpp),
            solidity=np.array([nu.solidity for nu in nuclei], np.float32),
            eccentricity=np.array([nu.eccentricity for nu in nuclei], np.float32),
            type=np.array([nu.type for nu in nuclei], np.int16),
            type_prob=np.array([nu.type_prob for nu in nuclei], np.float32),
            np_prob=np.array([nu.np_prob for nu in nuclei], np.float32),
            vertices=verts,
            offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            region=np.full(n, region, np.int32),
        )

    @classmethod
    def concat(cls, tables: Iterable[NucleusTable]) -> NucleusTable:
        """One table of all rows, in order. Measurements missing from a table read NaN there;
        cells must be in every non-empty table or in none."""
        tables = [t for t in tables if len(t)]
        if not tables:
            return cls()
        offsets = _concat_offsets([t.offsets for t in tables])
        def cat(name: str) -> NDArray:
            return np.concatenate([getattr(t, name) for t in tables])
        with_cells = {t.has_cells for t in tables}
        if len(with_cells) > 1:
            raise ValueError("cannot concatenate tables with and without cell boundaries")
        cell_vertices = cell_offsets = None
        if with_cells.pop():
            cell_vertices = np.concatenate([t.cell_vertices for t in tables])
            cell_offsets = _concat_offsets([t.cell_offsets for t in tables])
        names = list(dict.fromkeys(k for t in tables for k in t.measurements))
        measurements = {
            k: np.concatenate([t.measurements.get(k, np.full(len(t), np.nan, np.float32))
                               for t in tables]).astype(np.float32, copy=False)
            for k in names
        }
        return cls(
            **{name: cat(name) for name in COLUMN_NAMES}, vertices=cat("vertices"), offsets=offsets,
            measurements=measurements, cell_vertices=cell_vertices, cell_offsets=cell_offsets,
        )


def _concat_offsets(parts: Sequence[NDArray[np.int64] | None]) -> NDArray[np.int64]:
    """Offsets of ragged arrays laid end to end."""
    pieces: list[NDArray[np.int64]] = [np.zeros(1, np.int64)]
    shift = 0
    for offsets in parts:
        if offsets is None:
            raise ValueError("missing offsets")
        pieces.append(np.asarray(offsets[1:], np.int64) + shift)
        shift += int(offsets[-1])
    return np.concatenate(pieces).astype(np.int64)


def _take_ragged(
    vertices: NDArray, offsets: NDArray[np.int64], idx: NDArray[np.intp]
) -> tuple[NDArray, NDArray[np.int64]]:
    """The rings ``idx`` of a ragged array, in that order (vectorised gather)."""
    starts = offsets[:-1][idx]
    lengths = (offsets[1:] - offsets[:-1])[idx]
    new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    # Vertex k of the result comes from starts[ring] + (k - new_offsets[ring]).
    ring = np.repeat(np.arange(len(idx)), lengths)
    source = starts[ring] + (np.arange(int(new_offsets[-1])) - new_offsets[:-1][ring])
    return vertices[source], new_offsets
