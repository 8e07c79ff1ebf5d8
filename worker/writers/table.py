"""``nuclei.zarr``: the nucleus table as a zarr v3 group, a per-class count grid, and its zip.

Group layout (row ``i`` = nucleus ``i`` of the :class:`~worker.nuclei.NucleusTable`)::

    id            (n,)      str      UUID, the same as the GeoJSON feature id
    centroid      (n, 2)    float64  (x, y) level-0 px
    bbox          (n, 4)    float64  (x_min, y_min, x_max, y_max) level-0 px, half-open
    area_um2, perimeter_um, solidity, eccentricity, type_prob, np_prob   (n,) float32
    type          (n,)      int16    index into attrs["classes"] (0 = background/untyped)
    region        (n,)      int32    region that produced the nucleus
    vertices      (m, 2)    float32  (x, y) level-0 px, rings not closed
    offsets       (n + 1,)  int64    nucleus i owns vertices[offsets[i]:offsets[i + 1]]
    count_grid    (C, rows, cols) uint32  nuclei per class per grid cell (by centroid)

The group's attributes give the classes (names, colours), µm per level-0 px, the slide shape, the
units of every column and how ids are derived. ``count_grid`` has one plane per counted class
(background excluded; one "Nucleus" plane for an untyped model; a typed model's type-0 nuclei are
in no plane), cells of ``grid_um`` µm from origin (0, 0) at level 0, and says so in its attributes.

The store is built in a local temporary directory, then copied file by file into ``fs`` (any fsspec
filesystem, S3 included) together with ``nuclei.zarr.zip``, a stored (uncompressed: chunks are
already zstd) zip of the same store, openable with ``zarr.storage.ZipStore``.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore, ZipStore

from models.card import ClassInfo
from worker.nuclei import NucleusTable
from worker.writers._common import (
    NUCLEUS_UUID_NAMESPACE,
    ClassTable,
    check_fs,
    join,
    jsonable,
    nucleus_ids,
    prepare_root,
)

__all__ = [
    "CHUNK_ROWS",
    "GRID_UM",
    "TABLE_NAME",
    "ZIP_NAME",
    "count_grid",
    "read_table",
    "write_table",
    "zip_zarr",
]

logger = logging.getLogger(__name__)

TABLE_NAME = "nuclei.zarr"
ZIP_NAME = "nuclei.zarr.zip"

CHUNK_ROWS = 65_536
"""Rows per chunk of the per-nucleus arrays."""

GRID_UM = 100.0
"""Default side of a count-grid cell, µm."""

_VERTEX_CHUNK = 1 << 20
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed entry dates: the same store gives the same zip bytes

_COLUMNS: dict[str, tuple[str, str]] = {
    "centroid": ("float64", "level-0 px (x, y)"),
    "bbox": ("float64", "level-0 px (x_min, y_min, x_max, y_max), half-open"),
    "area_um2": ("float32", "µm^2"),
    "perimeter_um": ("float32", "µm"),
    "solidity": ("float32", "1 (area / convex hull area)"),
    "eccentricity": ("float32", "1 (0 = circle)"),
    "type": ("int16", "class index into attrs['classes']"),
    "type_prob": ("float32", "1 (fraction of pixels voting for type)"),
    "np_prob": ("float32", "1 (mean nucleus probability)"),
    "region": ("int32", "region index"),
    "vertices": ("float32", "level-0 px (x, y), rings not closed"),
    "offsets": ("int64", "row i owns vertices[offsets[i]:offsets[i+1]]"),
}


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
    """Nuclei per counted class per square cell of ``grid_um`` µm, binned by centroid.

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
    grid : (C, rows, cols) uint32 ndarray
        ``C`` = classes without background (1 for an untyped model); cell ``(r, c)`` covers
        level-0 x in ``[c * cell, (c + 1) * cell)`` and y in ``[r * cell, (r + 1) * cell)``.
    cell_px : float
        Cell side in level-0 pixels.
    """
    height, width = _check_geometry(mpp, slide_shape, grid_um)
    cell_px = grid_um / mpp
    rows, cols = math.ceil(height / cell_px), math.ceil(width / cell_px)
    class_table = ClassTable.from_classes(classes)
    index = class_table.type_index(table.type)
    # Map each type index to its plane; -1 (typed model, type 0) is counted nowhere.
    plane_of = np.full(len(class_table.by_type), -1, np.intp)
    for i, (t, _) in enumerate(class_table.counted):
        plane_of[t] = i
    plane = plane_of[index]
    keep = plane >= 0
    col = np.clip(np.floor(table.centroid[keep, 0] / cell_px), 0, cols - 1).astype(np.intp)
    row = np.clip(np.floor(table.centroid[keep, 1] / cell_px), 0, rows - 1).astype(np.intp)
    n_planes = len(class_table.counted)
    flat = (plane[keep] * rows + row) * cols + col
    grid = np.bincount(flat, minlength=n_planes * rows * cols).astype(np.uint32)
    return grid.reshape(n_planes, rows, cols), cell_px


def _array(group: zarr.Group, name: str, data: NDArray, chunk_rows: int) -> None:
    chunks = (max(1, min(chunk_rows, len(data))), *data.shape[1:])
    # Variable-length strings ("string" in zarr v3); fixed-width ones have no stable v3 spec.
    dtype = str if data.dtype.kind in "UT" else data.dtype
    array = group.create_array(name, shape=data.shape, dtype=dtype, chunks=chunks)
    if data.size:
        array[...] = data


def _build_store(
    path: Path,
    table: NucleusTable,
    ids: Sequence[str],
    grid: NDArray[np.uint32],
    group_attrs: dict[str, Any],
    grid_attrs: dict[str, Any],
    chunk_rows: int,
) -> None:
    group = zarr.open_group(LocalStore(path), mode="w")
    group.attrs.update(group_attrs)
    _array(group, "id", np.asarray(ids, dtype=np.dtypes.StringDType()), chunk_rows)
    for name, (dtype, _) in _COLUMNS.items():
        data = np.asarray(getattr(table, name), dtype=dtype)
        rows = _VERTEX_CHUNK if name == "vertices" else chunk_rows
        _array(group, name, data, rows)
    chunks = (1, *(max(1, min(1024, s)) for s in grid.shape[1:]))
    array = group.create_array("count_grid", shape=grid.shape, dtype="uint32", chunks=chunks)
    if grid.size:
        array[...] = grid
    array.attrs.update(grid_attrs)


def _zip_tree(fs: fsspec.AbstractFileSystem, src: str, dest: str) -> None:
    """Zip every file under ``src`` (in ``fs``) into the local file ``dest``, names relative."""
    # find() answers without the protocol ("bucket/key" for "s3://bucket/key"): compare likewise.
    prefix = fs._strip_protocol(src).rstrip("/") + "/"
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_STORED) as archive:
        for path in sorted(fs.find(src)):
            info = zipfile.ZipInfo(path[len(prefix):] if path.startswith(prefix) else path,
                                   date_time=_ZIP_DATE)
            with fs.open(path, "rb") as fh:
                archive.writestr(info, fh.read())


def _upload_tree(local: Path, fs: fsspec.AbstractFileSystem, dest: str) -> None:
    if fs.exists(dest):  # stale chunks of an earlier, larger table must not survive
        fs.rm(dest, recursive=True)
    for dirpath, _, files in os.walk(local):
        rel = Path(dirpath).relative_to(local).as_posix()
        target = dest if rel == "." else join(dest, rel)
        fs.makedirs(target, exist_ok=True)
        for name in files:
            fs.put_file(os.path.join(dirpath, name), join(target, name))


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
    make_zip: bool = True,
) -> list[str]:
    """Write ``nuclei.zarr`` (and ``nuclei.zarr.zip``) under ``root``; see the module docstring.

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
        Slide identity for the stable UUIDs (ignored when ``ids`` is given).
    ids : sequence of str, optional
        One UUID per row.
    grid_um : float
        Count-grid cell side, µm.
    chunk_rows : int
        Rows per chunk.
    make_zip : bool
        Also write ``nuclei.zarr.zip``.

    Returns
    -------
    list of str
        Names written under ``root``.
    """
    prepare_root(fs, root)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    height, width = _check_geometry(mpp, slide_shape, grid_um)
    if ids is None:
        ids = nucleus_ids(seed, range(len(table)))
    elif len(ids) != len(table):
        raise ValueError(f"ids has {len(ids)} entries for a table of {len(table)} nuclei")
    grid, cell_px = count_grid(table, classes=classes, mpp=mpp, slide_shape=slide_shape,
                               grid_um=grid_um)
    class_table = ClassTable.from_classes(classes)
    group_attrs = jsonable({
        "format": "hoverserve.nuclei",
        "version": 1,
        "n": len(table),
        "classes": [{"index": i, "name": c.name, "colour": list(c.colour)}
                    for i, c in enumerate(classes)],
        "typed": class_table.typed,
        "mpp": float(mpp),
        "slide_shape": [height, width],
        "units": {name: unit for name, (_, unit) in _COLUMNS.items()},
        "ids": {"uuid5_namespace": str(NUCLEUS_UUID_NAMESPACE), "name": "{seed}/{row}",
                "seed": seed},
    })
    grid_attrs = jsonable({
        "axes": ["class", "row", "col"],
        "classes": [c.name for _, c in class_table.counted],
        "class_index": [t for t, _ in class_table.counted],
        "origin_px": [0.0, 0.0],
        "cell_px": cell_px,
        "cell_um": float(grid_um),
        "binned_by": "centroid",
    })
    with tempfile.TemporaryDirectory(prefix="hoverserve-zarr-") as tmp:
        local = Path(tmp) / TABLE_NAME
        _build_store(local, table, ids, grid, group_attrs, grid_attrs, chunk_rows)
        _upload_tree(local, fs, join(root, TABLE_NAME))
        names = [TABLE_NAME]
        if make_zip:
            local_zip = Path(tmp) / ZIP_NAME
            _zip_tree(fsspec.filesystem("file"), local.as_posix(), local_zip.as_posix())
            fs.put_file(local_zip.as_posix(), join(root, ZIP_NAME))
            names.append(ZIP_NAME)
    logger.info("zarr: wrote %d nuclei, count grid %s (%.1f px cells) under %s",
                len(table), grid.shape, cell_px, root)
    return names


def zip_zarr(fs: fsspec.AbstractFileSystem, root: str, *, name: str = TABLE_NAME) -> str:
    """Zip the zarr store ``root/name`` into ``root/name + ".zip"`` (both in ``fs``).

    Returns
    -------
    str
        Name of the zip written under ``root``.
    """
    check_fs(fs)
    src = join(root, name)
    if not fs.isdir(src):
        raise FileNotFoundError(f"no zarr store at {src}")
    with tempfile.TemporaryDirectory(prefix="hoverserve-zip-") as tmp:
        local_zip = os.path.join(tmp, name + ".zip")
        _zip_tree(fs, src, local_zip)
        fs.put_file(local_zip, join(root, name + ".zip"))
    return name + ".zip"


def _open_store(fs: fsspec.AbstractFileSystem, path: str, tmp: str) -> Store:
    if path.endswith(".zip"):
        local = os.path.join(tmp, "table.zip")
        fs.get_file(path, local)
        return ZipStore(local, mode="r")
    return FsspecStore.from_mapper(fs.get_mapper(path), read_only=True)


def _read(group: zarr.Group, key: str, dtype: str) -> NDArray:
    array = group.get(key)
    if not isinstance(array, zarr.Array):
        raise ValueError(f"nucleus table has no array {key!r}")
    return np.asarray(array[...], dtype=dtype)


def read_table(fs: fsspec.AbstractFileSystem, root: str, *, name: str = TABLE_NAME) -> NucleusTable:
    """Read a nucleus table written by :func:`write_table`.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    root : str
        Directory inside ``fs``.
    name : str
        ``"nuclei.zarr"`` (the store) or ``"nuclei.zarr.zip"`` (its zip).

    Returns
    -------
    NucleusTable
    """
    check_fs(fs)
    path = join(root, name)
    if not fs.exists(path):
        raise FileNotFoundError(f"no nucleus table at {path}")
    with tempfile.TemporaryDirectory(prefix="hoverserve-read-") as tmp:
        store = _open_store(fs, path, tmp)
        try:
            group = zarr.open_group(store, mode="r")
            if group.attrs.get("format") != "hoverserve.nuclei":
                raise ValueError(f"{path} is not a HoVerServe nucleus table")
            columns = {key: _read(group, key, dtype) for key, (dtype, _) in _COLUMNS.items()}
        finally:
            store.close()
    return NucleusTable(**columns)
