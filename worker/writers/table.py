"""``nuclei.zarr.zip``: the nucleus table as a zarr v3 group in one zip, with a count grid.

Group layout (row ``i`` = nucleus ``i`` of the :class:`~worker.nuclei.NucleusTable`)::

    id             (n,)      str      UUID, the same as the GeoJSON feature id
    centroid       (n, 2)    float64  (x, y) level-0 px
    bbox           (n, 4)    float64  (x_min, y_min, x_max, y_max) level-0 px, half-open
    area_um2, perimeter_um, solidity, eccentricity, type_prob, np_prob   (n,) float32
    type           (n,)      int16    index into attrs["classes"] (0 = unclassified)
    region         (n,)      int32    region that produced the nucleus
    vertices       (m, 2)    float32  (x, y) level-0 px, rings on pixel edges, not closed
    offsets        (n + 1,)  int64    nucleus i owns vertices[offsets[i]:offsets[i + 1]]
    measurements/<k> (n,)    float32  k = 0, 1, ...: QuPath measurement attrs["name"] (NaN where
                                      undefined), in attrs["measurements"] order
    cell_vertices  (mc, 2)   float32  only with cells: cell boundaries like vertices/offsets
    cell_offsets   (n + 1,)  int64
    count_grid     (C + 1, rows, cols) uint32  nuclei per class per grid cell (by centroid):
                                      the card's classes (background excluded), then
                                      "unclassified", so the grid counts every nucleus

The group's attributes give the classes (names, colours), µm per level-0 px, the slide shape, the
units of every column, the measurement names and how ids are derived (the run key).

Only the zip is kept (one file: the service serves it as is, a client downloads one object, and
:func:`~worker.writers.table_read.open_table` or ``zarr.storage.ZipStore`` reads it in place);
entries are stored, as the chunks are already compressed. The store is built in a local temporary
directory by :class:`TableWriter`, chunk by chunk, then zipped into ``fs`` (S3 included).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.storage import LocalStore

from models.card import ClassInfo
from worker.nuclei import COLUMNS, NucleusTable
from worker.writers._common import (
    NUCLEUS_UUID_NAMESPACE,
    UNCLASSIFIED_NAME,
    ClassTable,
    jsonable,
    nucleus_ids,
    prepare_root,
)

__all__ = [
    "CHUNK_ROWS",
    "FORMAT",
    "GRID_UM",
    "TABLE_NAME",
    "ZIP_NAME",
    "TableWriter",
    "count_grid",
    "write_table",
    "zip_tree",
]

logger = logging.getLogger(__name__)

TABLE_NAME = "nuclei.zarr"
"""Name of the store inside the zip (and of a store directory :func:`read_table` also reads)."""

ZIP_NAME = "nuclei.zarr.zip"
"""The file written."""

FORMAT = "hoverserve.nuclei"

CHUNK_ROWS = 65_536
"""Rows per chunk of the per-nucleus arrays."""

GRID_UM = 100.0
"""Default side of a count-grid cell, µm."""

_VERTEX_CHUNK = 1 << 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed entry dates: the same store gives the same zip bytes

def _check_geometry(mpp: float, slide_shape: Sequence[int], grid_um: float) -> tuple[int, int]:
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per level-0 pixel, got {mpp!r}")
    if not (math.isfinite(grid_um) and grid_um > 0):
        raise ValueError(f"grid_um must be positive, got {grid_um!r}")
    if len(slide_shape) < 2 or min(slide_shape[0], slide_shape[1]) <= 0:
        raise ValueError(f"slide_shape must be (height, width) > 0, got {tuple(slide_shape)}")
    return int(slide_shape[0]), int(slide_shape[1])


def count_grid(
    table: NucleusTable,
    *,
    classes: Sequence[ClassInfo],
    mpp: float,
    slide_shape: Sequence[int],
    grid_um: float = GRID_UM,
) -> tuple[NDArray[np.uint32], float]:
    """Nuclei per class per square cell of ``grid_um`` µm, binned by centroid.

    Parameters
    ----------
    table : NucleusTable
    classes : sequence of ClassInfo
        The model card's classes (``classes[0]`` background; empty = untyped).
    mpp : float
        µm per level-0 pixel of the slide.
    slide_shape : (int, int)
        Level-0 (height, width).
    grid_um : float
        Cell side, µm.

    Returns
    -------
    grid : (C + 1, rows, cols) uint32 ndarray
        One plane per class of the card (background excluded; none if untyped), then the
        unclassified plane: every nucleus is in exactly one plane. Cell ``(r, c)`` covers
        level-0 x in ``[c * cell, (c + 1) * cell)`` and y in ``[r * cell, (r + 1) * cell)``.
    cell_px : float
        Cell side in level-0 pixels.
    """
    height, width = _check_geometry(mpp, slide_shape, grid_um)
    cell_px = grid_um / mpp
    rows, cols = math.ceil(height / cell_px), math.ceil(width / cell_px)
    class_table = ClassTable.from_classes(classes)
    index = class_table.type_index(table.type)
    planes = len(class_table.counted) + 1
    # Type t > 0 is plane t - 1; type 0 (unclassified) the last plane.
    plane = np.where(index > 0, index - 1, planes - 1)
    col = np.clip(np.floor(table.centroid[:, 0] / cell_px), 0, cols - 1).astype(np.intp)
    row = np.clip(np.floor(table.centroid[:, 1] / cell_px), 0, rows - 1).astype(np.intp)
    flat = (plane * rows + row) * cols + col
    grid = np.bincount(flat, minlength=planes * rows * cols).astype(np.uint32)
    return grid.reshape(planes, rows, cols), cell_px


def _create(group: zarr.Group, name: str, dtype: Any, tail: tuple[int, ...], rows: int) -> zarr.Array:
    return group.create_array(name, shape=(0, *tail), dtype=dtype, chunks=(rows, *tail))


class TableWriter:
    """Builds the zarr store of a nucleus table chunk by chunk in a local directory.

    Parameters
    ----------
    path : Path
        Local directory of the store (created).
    classes, mpp, slide_shape, grid_um
        As for :func:`write_table`.
    measurements : sequence of str
        Measurement names every chunk carries, in order.
    cells : bool
        Whether chunks carry cell boundaries.
    ids : mapping
        How ids were derived (recorded in the attributes), e.g. ``{"key": run_key}``.
    chunk_rows : int
        Rows per zarr chunk.
    """

    def __init__(self, path: Path, *, classes: Sequence[ClassInfo], mpp: float,
                 slide_shape: Sequence[int], measurements: Sequence[str] = (),
                 cells: bool = False, ids: Mapping[str, Any] | None = None,
                 grid_um: float = GRID_UM, chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.height, self.width = _check_geometry(mpp, slide_shape, grid_um)
        self.classes, self.mpp, self.grid_um = tuple(classes), float(mpp), float(grid_um)
        self.names, self.cells = list(measurements), bool(cells)
        self.group = zarr.open_group(LocalStore(path), mode="w")
        self.n = self.vertex_count = self.cell_vertex_count = 0
        self.grid: NDArray[np.uint32] | None = None
        g = self.group
        self.id = _create(g, "id", str, (), chunk_rows)
        self.columns = {c.name: _create(g, c.name, c.dtype, c.shape, chunk_rows) for c in COLUMNS}
        self.vertices = _create(g, "vertices", "float32", (2,), _VERTEX_CHUNK)
        self.offsets = _create(g, "offsets", "int64", (), chunk_rows)
        self.offsets.append(np.zeros(1, np.int64))
        sub = g.create_group("measurements")
        self.measurements = []
        for k, name in enumerate(self.names):
            array = _create(sub, str(k), "float32", (), chunk_rows)
            array.attrs["name"] = name
            self.measurements.append(array)
        if self.cells:
            self.cell_vertices = _create(g, "cell_vertices", "float32", (2,), _VERTEX_CHUNK)
            self.cell_offsets = _create(g, "cell_offsets", "int64", (), chunk_rows)
            self.cell_offsets.append(np.zeros(1, np.int64))
        class_table = ClassTable.from_classes(self.classes)
        self.attrs: dict[str, Any] = {
            "format": FORMAT, "version": 2,
            "classes": [{"index": i, "name": c.name, "colour": list(c.colour)}
                        for i, c in enumerate(self.classes)],
            "typed": class_table.typed, "unclassified": UNCLASSIFIED_NAME,
            "mpp": self.mpp, "slide_shape": [self.height, self.width],
            "units": {**{c.name: c.unit for c in COLUMNS},
                      "vertices": "level-0 px (x, y), rings not closed",
                      "offsets": "row i owns vertices[offsets[i]:offsets[i+1]]"},
            "measurements": self.names, "cells": self.cells,
            "ids": {"uuid5_namespace": str(NUCLEUS_UUID_NAMESPACE), "name": "{key}/{row}",
                    **dict(ids or {})},
        }

    def append(self, table: NucleusTable, ids: Sequence[str]) -> None:
        """Add the next rows (and their ids)."""
        if len(ids) != len(table):
            raise ValueError(f"ids has {len(ids)} entries for a chunk of {len(table)} nuclei")
        extra = getattr(table, "measurements", None) or {}
        if list(extra) != self.names:
            raise ValueError(f"chunk measurements {list(extra)} differ from {self.names}")
        if len(table) == 0:
            return
        self.id.append(np.asarray(ids, dtype=np.dtypes.StringDType()))
        for c in COLUMNS:
            self.columns[c.name].append(np.asarray(getattr(table, c.name), dtype=c.dtype))
        self.vertices.append(np.asarray(table.vertices, np.float32))
        self.offsets.append(np.asarray(table.offsets[1:], np.int64) + self.vertex_count)
        self.vertex_count += len(table.vertices)
        for array, name in zip(self.measurements, self.names, strict=True):
            array.append(np.asarray(extra[name], np.float32))
        if self.cells:
            if table.cell_vertices is None or table.cell_offsets is None:
                raise ValueError("the table writer expects cell boundaries in every chunk")
            self.cell_vertices.append(np.asarray(table.cell_vertices, np.float32))
            self.cell_offsets.append(np.asarray(table.cell_offsets[1:], np.int64)
                                     + self.cell_vertex_count)
            self.cell_vertex_count += len(table.cell_vertices)
        grid, self.cell_px = count_grid(table, classes=self.classes, mpp=self.mpp,
                                        slide_shape=(self.height, self.width),
                                        grid_um=self.grid_um)
        self.grid = grid if self.grid is None else self.grid + grid
        self.n += len(table)

    def close(self) -> NDArray[np.uint32]:
        """Write the count grid and the attributes; returns the grid."""
        grid = self.grid
        if grid is None:
            grid, self.cell_px = count_grid(NucleusTable(), classes=self.classes, mpp=self.mpp,
                                            slide_shape=(self.height, self.width),
                                            grid_um=self.grid_um)
        chunks = (1, *(max(1, min(1024, s)) for s in grid.shape[1:]))
        array = self.group.create_array("count_grid", shape=grid.shape, dtype="uint32",
                                        chunks=chunks)
        if grid.size:
            array[...] = grid
        class_table = ClassTable.from_classes(self.classes)
        array.attrs.update(jsonable({
            "axes": ["class", "row", "col"],
            "classes": [c.name for c in class_table.legend],
            "class_index": [*(t for t, _ in class_table.counted), 0],
            "origin_px": [0.0, 0.0], "cell_px": self.cell_px, "cell_um": self.grid_um,
            "binned_by": "centroid",
        }))
        self.group.attrs.update(jsonable({**self.attrs, "n": self.n}))
        return grid


def zip_tree(local: Path, dest: str) -> None:
    """Zip the store directory ``local`` into the local file ``dest`` (names relative, stored,
    fixed dates)."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for dirpath, _, files in sorted(os.walk(local)):
            for name in sorted(files):
                path = Path(dirpath) / name
                info = zipfile.ZipInfo(path.relative_to(local).as_posix(), date_time=_ZIP_DATE)
                with open(path, "rb") as src, archive.open(info, "w", force_zip64=True) as out:
                    while block := src.read(1 << 20):
                        out.write(block)


def write_table(
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    classes: Sequence[ClassInfo],
    mpp: float,
    slide_shape: Sequence[int],
    seed: str,
    ids: Sequence[str] | None = None,
    grid_um: float = GRID_UM,
    chunk_rows: int = CHUNK_ROWS,
    id_info: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write ``nuclei.zarr.zip`` under ``root``; see the module docstring.

    Parameters
    ----------
    table : NucleusTable
    fs : fsspec.AbstractFileSystem
    root : str
        Directory inside ``fs``.
    classes : sequence of ClassInfo
        The model card's classes.
    mpp : float
        µm per level-0 pixel of the slide.
    slide_shape : (int, int)
        Level-0 (height, width).
    seed : str
        Run key the ids derive from (recorded; used for the ids when ``ids`` is not given).
    ids : sequence of str, optional
        One UUID per row.
    grid_um : float
        Count-grid cell side, µm.
    chunk_rows : int
        Rows per chunk.
    id_info : mapping, optional
        More about the ids to record (e.g. the run key's parts).

    Returns
    -------
    list of str
        Names written under ``root``: ``["nuclei.zarr.zip"]``.
    """
    prepare_root(fs, root)
    if ids is None:
        ids = nucleus_ids(seed, range(len(table)))
    elif len(ids) != len(table):
        raise ValueError(f"ids has {len(ids)} entries for a table of {len(table)} nuclei")
    with tempfile.TemporaryDirectory(prefix="hoverserve-zarr-") as tmp:
        local = Path(tmp) / TABLE_NAME
        writer = TableWriter(local, classes=classes, mpp=mpp, slide_shape=slide_shape,
                             measurements=list(getattr(table, "measurements", None) or {}),
                             cells=getattr(table, "cell_offsets", None) is not None,
                             ids={"key": seed, **dict(id_info or {})}, grid_um=grid_um,
                             chunk_rows=chunk_rows)
        for lo in range(0, len(table), chunk_rows):
            hi = min(lo + chunk_rows, len(table))
            part = table if (lo, hi) == (0, len(table)) else table.take(np.arange(lo, hi))
            writer.append(part, ids[lo:hi])
        grid = writer.close()
        local_zip = Path(tmp) / ZIP_NAME
        zip_tree(local, local_zip.as_posix())
        target = f"{root.rstrip('/')}/{ZIP_NAME}" if root else ZIP_NAME
        fs.put_file(local_zip.as_posix(), target)
    stale = f"{root.rstrip('/')}/{TABLE_NAME}" if root else TABLE_NAME
    if fs.exists(stale):  # a store directory of an earlier version beside the zip
        fs.rm(stale, recursive=True)
    logger.info("zarr: wrote %d nuclei, count grid %s under %s", len(table), grid.shape, root)
    return [ZIP_NAME]
