"""Reading ``nuclei.zarr.zip`` (or a ``nuclei.zarr`` store directory), whole or in row chunks.

:class:`TableReader` reads any rows ``lo:hi`` of the table (columns, polygons, measurements, cell
boundaries, ids) without loading the rest, so a million-nucleus table can be re-exported with
memory bounded by the chunk size (:func:`~worker.writers.qupath.export_qupath`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

import fsspec
import numpy as np
import zarr
from numpy.typing import NDArray
from zarr.abc.store import Store
from zarr.storage import FsspecStore, ZipStore

from models.card import ClassInfo
from worker.nuclei import COLUMNS, NucleusTable
from worker.writers._common import check_fs, join
from worker.writers.table import CHUNK_ROWS, FORMAT, TABLE_NAME, ZIP_NAME

__all__ = ["TableReader", "open_table", "read_table"]

logger = logging.getLogger(__name__)

Chunk = tuple[NucleusTable, Sequence[str]]


class TableReader:
    """An open nucleus table; use as a context manager (or call :meth:`close`).

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    path : str
        ``…/nuclei.zarr.zip`` (any file is read as a zip) or a ``…/nuclei.zarr`` store directory
        inside ``fs``. A zip on a remote filesystem is first copied to a local temporary file.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str) -> None:
        check_fs(fs)
        if not fs.exists(path):
            raise FileNotFoundError(f"no nucleus table at {path}")
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.store = self._open_store(fs, path)
        try:
            self.group = zarr.open_group(self.store, mode="r")
        except (FileNotFoundError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            self.close()
            raise ValueError(f"{path} is not a zarr store or zip of one: {exc}") from exc
        if self.group.attrs.get("format") != FORMAT:
            self.close()
            raise ValueError(f"{path} is not a HoVerServe nucleus table")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        self.n = int(self._array("id").shape[0])
        sub = self.group.get("measurements")
        self.measurement_arrays: list[tuple[str, zarr.Array]] = []
        if isinstance(sub, zarr.Group):
            for k in range(len(self.attrs.get("measurements", []))):
                array = sub[str(k)]
                if isinstance(array, zarr.Array):
                    self.measurement_arrays.append((str(array.attrs["name"]), array))
        self.has_cells = isinstance(self.group.get("cell_offsets"), zarr.Array)

    def _open_store(self, fs: fsspec.AbstractFileSystem, path: str) -> Store:
        if not fs.isdir(path):  # a zip, whatever its name (a download may be renamed)
            local = path
            if "file" not in fs.protocol:
                self._tmp = tempfile.TemporaryDirectory(prefix="hoverserve-read-")
                local = os.path.join(self._tmp.name, "table.zip")
                fs.get_file(path, local)
            if not zipfile.is_zipfile(local):
                self.close_temporary()
                raise ValueError(f"{path} is not a zip file (a nuclei.zarr.zip is expected)")
            return ZipStore(local, mode="r")
        return FsspecStore.from_mapper(fs.get_mapper(path), read_only=True)

    def __enter__(self) -> TableReader:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.store.close()
        self.close_temporary()

    def close_temporary(self) -> None:
        """Delete the local copy of a remote zip, if any."""
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __len__(self) -> int:
        return self.n

    @property
    def classes(self) -> list[ClassInfo]:
        """The model card's classes, as recorded."""
        return [ClassInfo(name=c["name"], colour=tuple(c["colour"]))
                for c in self.attrs.get("classes", [])]

    @property
    def slide_shape(self) -> tuple[int, int]:
        height, width = self.attrs["slide_shape"]
        return int(height), int(width)

    @property
    def measurement_names(self) -> list[str]:
        return [name for name, _ in self.measurement_arrays]

    def _array(self, key: str) -> zarr.Array:
        array = self.group.get(key)
        if not isinstance(array, zarr.Array):
            raise ValueError(f"nucleus table has no array {key!r}")
        return array

    def _ragged(self, vertices: str, offsets: str, lo: int, hi: int, geometry: bool
                ) -> tuple[NDArray[np.float32], NDArray[np.int64]]:
        off = np.asarray(self._array(offsets)[lo : hi + 1], np.int64)
        if not geometry:  # a read-only stand-in of the right length, no memory
            return np.broadcast_to(np.zeros((1, 2), np.float32), (int(off[-1] - off[0]), 2)), \
                off - off[0]
        verts = np.asarray(self._array(vertices)[int(off[0]) : int(off[-1])], np.float32)
        return verts.reshape(-1, 2), off - off[0]

    def rows(self, lo: int, hi: int, *, geometry: bool = True) -> Chunk:
        """Rows ``lo:hi`` as a table, and their ids.

        ``geometry=False`` leaves the vertices out (zeros of the right length) and the ids too
        (an empty list): enough to size the rows' GeoJSON, at a fraction of the reading."""
        lo, hi = max(0, lo), min(self.n, hi)
        if hi <= lo:
            return NucleusTable(), []
        columns = {c.name: np.asarray(self._array(c.name)[lo:hi], c.dtype) for c in COLUMNS}
        vertices, offsets = self._ragged("vertices", "offsets", lo, hi, geometry)
        cells: dict[str, Any] = {}
        if self.has_cells:
            cells["cell_vertices"], cells["cell_offsets"] = self._ragged(
                "cell_vertices", "cell_offsets", lo, hi, geometry)
        measurements = {name: np.asarray(array[lo:hi], np.float32)
                        for name, array in self.measurement_arrays}
        ids = ([str(v) for v in np.asarray(self._array("id")[lo:hi]).tolist()]
               if geometry else [])
        table = NucleusTable(**columns, vertices=vertices, offsets=offsets,
                             measurements=measurements, **cells)
        return table, ids

    def chunks(self, chunk_rows: int = CHUNK_ROWS, *, geometry: bool = True
               ) -> Callable[[], Iterator[Chunk]]:
        """A factory of the table's row chunks, in order (what the GeoJSON writer takes);
        ``geometry`` as for :meth:`rows`."""
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")

        def chunks() -> Iterator[Chunk]:
            for lo in range(0, self.n, chunk_rows):
                yield self.rows(lo, lo + chunk_rows, geometry=geometry)
        return chunks

    def read(self) -> NucleusTable:
        """The whole table."""
        return self.rows(0, self.n)[0] if self.n else NucleusTable()


def open_table(fs: fsspec.AbstractFileSystem, path: str) -> TableReader:
    """Open a nucleus table (``nuclei.zarr.zip`` or a store directory) for reading."""
    return TableReader(fs, path)


def read_table(fs: fsspec.AbstractFileSystem, root: str, *, name: str | None = None) -> NucleusTable:
    """Read a whole nucleus table written by :func:`~worker.writers.write_table`.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    root : str
        Directory inside ``fs``.
    name : str, optional
        ``"nuclei.zarr.zip"`` or ``"nuclei.zarr"``; default whichever exists (the zip first).

    Returns
    -------
    NucleusTable
    """
    check_fs(fs)
    if name is None:
        name = ZIP_NAME if fs.exists(join(root, ZIP_NAME)) else TABLE_NAME
    with TableReader(fs, join(root, name)) as reader:
        return reader.read()
