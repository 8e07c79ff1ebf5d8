"""QuPath GeoJSON files: every nucleus in one file to drag into QuPath, whatever the slide size.

QuPath parses a whole file in memory (~13 bytes of heap per byte of JSON, measured with its own
importer, 0.5.1 – 0.7.0), so one file or zip entry holds at most :data:`ENTRY_BYTES` of JSON
(~1.3 GB of heap: it imports on QuPath's usual 2 GB). Written under ``root``:

- ``nuclei.geojson.gz`` when every nucleus fits in one entry;
- otherwise ``nuclei.zip`` of plain ``nuclei-001.geojson``, ``nuclei-002.geojson``, ... entries
  (deflated), each under the budget, and ``nuclei-index.json`` listing them with their nucleus
  counts. QuPath's drag and drop routes a zip of plain ``.geojson`` entries to its importer, which
  reads them one after the other: one drag imports every nucleus at the heap cost of one entry.

Entries are planned before anything is written, from an upper bound of each feature's size
(:func:`~worker.writers.features.feature_bounds`), then the features are cleaned, formatted and
compressed chunk by chunk and block by block, so memory stays bounded by the chunk size.
"""

from __future__ import annotations

import gzip
import logging
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Any

import fsspec
import numpy as np

from models.card import ClassInfo
from worker.nuclei import NucleusTable
from worker.writers._common import ClassTable, join, nucleus_ids, prepare_root, write_json
from worker.writers.features import (
    HEAD,
    TAIL,
    ChunkFeatures,
    FeatureSpec,
    ObjectType,
    feature_bounds,
    plan_entries,
)

__all__ = [
    "CHUNK_ROWS",
    "ENTRY_BYTES",
    "GEOJSON_NAME",
    "GEOJSON_ZIP_NAME",
    "GZIP_LEVEL",
    "INDEX_NAME",
    "Chunk",
    "GeoJSONWritten",
    "entry_name",
    "table_chunks",
    "write_geojson",
    "write_geojson_chunks",
]

logger = logging.getLogger(__name__)

GEOJSON_NAME = "nuclei.geojson.gz"
"""The file when every nucleus fits in one entry."""

GEOJSON_ZIP_NAME = "nuclei.zip"
"""The file otherwise: a zip of plain ``.geojson`` entries."""

INDEX_NAME = "nuclei-index.json"
"""Written with ``nuclei.zip`` only: its entries in order with their nucleus counts."""

ENTRY_BYTES = 100_000_000
"""Most uncompressed JSON per file or zip entry (at ~13 bytes of QuPath heap per byte)."""

GZIP_LEVEL = 3
"""Deflate level: level 6 is ~10 % smaller but takes twice the CPU time."""

CHUNK_ROWS = 65_536
"""Table rows cleaned and formatted at a time."""

_BLOCK = 4096
"""Features formatted per write call."""

_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed entry dates: the same nuclei give the same bytes

Chunk = tuple[NucleusTable, Sequence[str]]
"""Consecutive rows of a nucleus table and their ids."""


def entry_name(index: int) -> str:
    """Name of the ``index``-th (1-based) entry of ``nuclei.zip``: ``nuclei-001.geojson``."""
    return f"nuclei-{index:03d}.geojson"


@dataclass
class GeoJSONWritten:
    """What :func:`write_geojson` wrote: file ``names`` under the root, the ``entries`` (name,
    nucleus count) of the file, and the rows whose polygon was repaired or dropped."""

    names: list[str]
    entries: list[tuple[str, int]]
    repaired: int = 0
    dropped_rows: list[int] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(count for _, count in self.entries)

    @property
    def stats(self) -> dict[str, Any]:
        return {"written": self.total, "repaired": self.repaired,
                "dropped": len(self.dropped_rows), "file": self.names[0],
                "entries": len(self.entries)}


class _Unseekable:
    """A write-only view of a file without ``seek``: zipfile then streams (data descriptors),
    which works on object stores whose files cannot seek."""

    def __init__(self, raw: IO[bytes]) -> None:
        self.raw, self.position = raw, 0

    def write(self, data: bytes) -> int:
        self.raw.write(data)
        self.position += len(data)
        return len(data)

    def tell(self) -> int:
        return self.position

    def flush(self) -> None:
        self.raw.flush()


class _Sink:
    """The output file: one gzip stream, or a zip whose entries are opened one at a time."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str, names: list[str],
                 level: int) -> None:
        self.names, self.level = names, level
        self.single = len(names) == 1
        self.raw = fs.open(join(root, GEOJSON_NAME if self.single else GEOJSON_ZIP_NAME), "wb")
        self.zip = None if self.single else zipfile.ZipFile(
            _Unseekable(self.raw), "w", compression=zipfile.ZIP_DEFLATED)  # type: ignore[call-overload]
        self.entry: IO[bytes] | gzip.GzipFile | None = None

    def begin(self, index: int) -> None:
        if self.zip is None:
            # mtime=0 and no file name in the header: the same nuclei give the same bytes.
            self.entry = gzip.GzipFile(filename="", mode="wb", fileobj=self.raw,
                                       compresslevel=self.level, mtime=0)
        else:
            info = zipfile.ZipInfo(self.names[index], date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            # ZipFile.open(ZipInfo) takes the level from the entry (a private field up to 3.12).
            setattr(info, "compress_level" if hasattr(info, "compress_level") else
                    "_compresslevel", self.level)
            info.external_attr = 0o644 << 16
            self.entry = self.zip.open(info, "w")

    def end(self) -> None:
        if self.entry is not None:
            self.entry.close()
            self.entry = None

    def close(self) -> None:
        self.end()
        if self.zip is not None:
            self.zip.close()
        self.raw.close()


def table_chunks(table: NucleusTable, ids: Sequence[str],
                 chunk_rows: int = CHUNK_ROWS) -> Callable[[], Iterator[Chunk]]:
    """The chunks of an in-memory table, as :func:`write_geojson_chunks` takes them."""
    def chunks() -> Iterator[Chunk]:
        if len(table) <= chunk_rows:
            yield table, ids
            return
        for lo in range(0, len(table), chunk_rows):
            hi = min(lo + chunk_rows, len(table))
            yield table.take(np.arange(lo, hi)), ids[lo:hi]
    return chunks


def write_geojson(
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    classes: Sequence[ClassInfo],
    slide_shape: Sequence[int],
    seed: str | None = None,
    ids: Sequence[str] | None = None,
    objects: ObjectType | None = None,
    measurements: Sequence[str] | None = None,
    entry_bytes: int = ENTRY_BYTES,
    compresslevel: int = GZIP_LEVEL,
) -> GeoJSONWritten:
    """Write the nuclei as QuPath objects (see the module docstring for the files).

    Parameters
    ----------
    table : NucleusTable
        Nuclei in level-0 pixels.
    fs : fsspec.AbstractFileSystem
        Where to write (local, memory, S3...).
    root : str
        Directory inside ``fs``.
    classes : sequence of ClassInfo
        The model card's classes (``classes[0]`` background; empty for an untyped model).
    slide_shape : (int, int)
        Level-0 (height, width); coordinates are clipped into it.
    seed : str, optional
        Run key (:func:`~worker.writers.run_key`) the ids derive from, when ``ids`` is not given.
    ids : sequence of str, optional
        One UUID per table row.
    objects : {"detections", "cells"}, optional
        QuPath object type; default cells when the table has cell boundaries.
    measurements : sequence of str, optional
        Measurement names to write, in this order (default: all).
    entry_bytes : int
        Most JSON bytes per file or zip entry.
    compresslevel : int
        Deflate level 1-9.

    Returns
    -------
    GeoJSONWritten
    """
    if ids is None:
        if seed is None:
            raise ValueError("give the nucleus ids or the seed (run key) they derive from")
        ids = nucleus_ids(seed, range(len(table)))
    elif len(ids) != len(table):
        raise ValueError(f"ids has {len(ids)} entries for a table of {len(table)} nuclei")
    if objects is None:
        objects = "cells" if getattr(table, "cell_offsets", None) is not None else "detections"
    return write_geojson_chunks(table_chunks(table, ids), fs=fs, root=root, classes=classes,
                                slide_shape=slide_shape, objects=objects,
                                measurements=measurements, entry_bytes=entry_bytes,
                                compresslevel=compresslevel)


def _check(objects: str, entry_bytes: int, compresslevel: int) -> None:
    if objects not in ("detections", "cells"):
        raise ValueError(f"objects must be 'detections' or 'cells', got {objects!r}")
    if not isinstance(entry_bytes, int | np.integer) or entry_bytes < 1024:
        raise ValueError(f"entry_bytes must be an integer >= 1024, got {entry_bytes!r}")
    if compresslevel not in range(1, 10):
        raise ValueError(f"compresslevel must be within 1..9, got {compresslevel!r}")


def write_geojson_chunks(
    chunks: Callable[[], Iterable[Chunk]],
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    classes: Sequence[ClassInfo],
    slide_shape: Sequence[int],
    objects: ObjectType = "detections",
    measurements: Sequence[str] | None = None,
    entry_bytes: int = ENTRY_BYTES,
    compresslevel: int = GZIP_LEVEL,
    sizing: Callable[[], Iterable[Chunk]] | None = None,
) -> GeoJSONWritten:
    """:func:`write_geojson` for a table read chunk by chunk (memory bounded by the chunk).

    The entries are planned from ``sizing()`` (default ``chunks()``): the same consecutive row
    chunks in table order, of which only the ring lengths, types and measurement columns are
    used; then ``chunks()`` is iterated once to write them.
    """
    prepare_root(fs, root)
    _check(objects, entry_bytes, compresslevel)
    spec = FeatureSpec(ClassTable.from_classes(classes), objects,
                       None if measurements is None else tuple(measurements),
                       (int(slide_shape[0]), int(slide_shape[1])))
    parts = [feature_bounds(table, spec) for table, _ in (sizing or chunks)()]
    bounds = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    plan = plan_entries(bounds, int(entry_bytes))
    names = [GEOJSON_NAME] if len(plan) == 1 else [entry_name(i + 1) for i in range(len(plan))]
    written = GeoJSONWritten(names=[GEOJSON_NAME] if len(plan) == 1 else
                             [GEOJSON_ZIP_NAME, INDEX_NAME],
                             entries=[(name, 0) for name in names])
    sink = _Sink(fs, root, names, compresslevel)
    try:
        _stream(chunks(), plan, spec, sink, written)
    finally:
        sink.close()
    _remove_stale(fs, root, keep=set(written.names))
    if len(plan) > 1:
        write_json(fs, join(root, INDEX_NAME), {
            "format": "zip of QuPath GeoJSON FeatureCollections, one per entry",
            "file": GEOJSON_ZIP_NAME,
            "coordinates": "level-0 pixels (x right, y down), rounded to 0.01",
            "entries": [{"name": n, "count": c} for n, c in written.entries],
            "total": written.total, "repaired": written.repaired,
            "dropped": len(written.dropped_rows), "dropped_rows": written.dropped_rows,
            "entry_bytes": int(entry_bytes),
        })
    logger.info("GeoJSON: wrote %d nuclei in %s (%d entr%s) under %s", written.total,
                written.names[0], len(plan), "y" if len(plan) == 1 else "ies", root)
    return written


def _stream(chunks: Iterable[Chunk], plan: list[tuple[int, int]], spec: FeatureSpec,
            sink: _Sink, written: GeoJSONWritten) -> None:
    """Write every chunk's features into the planned entries, compressing in a second thread
    (zlib releases the GIL) while the next block is formatted."""
    starts = np.array([lo for lo, _ in plan], np.int64)
    counts = [0] * len(plan)
    current, first = -1, True
    base = 0
    with ThreadPoolExecutor(1, thread_name_prefix="geojson-deflate") as pool:
        pending: Future | None = None

        def put(data: bytes) -> None:
            nonlocal pending
            if pending is not None:
                pending.result()
            entry = sink.entry
            if entry is None:
                raise RuntimeError("no entry open")
            pending = pool.submit(entry.write, data)

        def switch(to: int) -> None:
            nonlocal current, first, pending
            while current < to:
                if current >= 0:
                    put(TAIL)
                    if pending is not None:
                        pending.result()
                        pending = None
                    sink.end()
                current += 1
                sink.begin(current)
                put(HEAD)
                first = True

        for table, ids in chunks:
            features = ChunkFeatures(table, ids, spec)
            p = features.polygons
            written.repaired += len(p.repaired)
            written.dropped_rows += (p.dropped + base).tolist()
            entry_of = np.searchsorted(starts, p.rows + base, side="right") - 1
            lo = 0
            while lo < len(p):
                target = int(entry_of[lo])
                hi = min(lo + _BLOCK, len(p))
                hi = lo + int(np.searchsorted(entry_of[lo:hi], target, side="right"))
                switch(target)
                data = features.block(lo, hi).encode("utf-8")
                put(data if first else b",\n" + data)
                first = False
                counts[target] += hi - lo
                lo = hi
            base += len(table)
        switch(len(plan) - 1)
        put(TAIL)
        if pending is not None:
            pending.result()
    sink.end()
    written.entries = [(name, c) for (name, _), c in zip(written.entries, counts, strict=True)]


def _remove_stale(fs: fsspec.AbstractFileSystem, root: str, *, keep: set[str]) -> None:
    """Delete GeoJSON files of an earlier run in ``root`` that this run did not write (an older
    split into ``nuclei-part-NNN.geojson.gz`` files included)."""
    for pattern in ("nuclei*.geojson.gz", "nuclei.zip", "nuclei-index.json"):
        for path in fs.glob(join(root, pattern)):
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name not in keep and (name in (GEOJSON_NAME, GEOJSON_ZIP_NAME, INDEX_NAME)
                                     or name.startswith("nuclei-part-")):
                fs.rm_file(path)


