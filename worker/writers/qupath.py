"""Re-export a result's nucleus table as QuPath GeoJSON without re-running the slide.

Reads ``nuclei.zarr.zip`` (a job's download) or a ``nuclei.zarr`` store in row chunks and streams
the same files the run writes (``nuclei.geojson.gz`` or ``nuclei.zip``; see
:mod:`worker.writers.geojson`), with the ids, classes and measurements recorded in the table, so
memory is bounded by the chunk size whatever the nucleus count.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import fsspec

from worker.writers.features import ObjectType
from worker.writers.geojson import CHUNK_ROWS, ENTRY_BYTES, GeoJSONWritten, write_geojson_chunks
from worker.writers.table_read import open_table

__all__ = ["export_qupath"]

logger = logging.getLogger(__name__)


def export_qupath(
    source_fs: fsspec.AbstractFileSystem,
    source: str,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    objects: ObjectType = "detections",
    measurements: Sequence[str] | None = None,
    chunk_rows: int = CHUNK_ROWS,
    entry_bytes: int = ENTRY_BYTES,
) -> GeoJSONWritten:
    """Write a nucleus table as QuPath GeoJSON under ``root``.

    Parameters
    ----------
    source_fs : fsspec.AbstractFileSystem
        Filesystem of the table.
    source : str
        ``nuclei.zarr.zip`` or a ``nuclei.zarr`` store directory.
    fs : fsspec.AbstractFileSystem
        Where to write.
    root : str
        Output directory inside ``fs``.
    objects : {"detections", "cells"}
        QuPath object type; ``cells`` needs a table with cell boundaries.
    measurements : sequence of str, optional
        Measurement names to write, in order (default: all the table has).
    chunk_rows : int
        Table rows read at a time.
    entry_bytes : int
        Most JSON bytes per file or zip entry.

    Returns
    -------
    GeoJSONWritten
    """
    with open_table(source_fs, source) as reader:
        if objects == "cells" and not reader.has_cells:
            raise ValueError(f"{source} has no cell boundaries: export detections, or re-run "
                             "the slide with cells")
        logger.info("exporting %d nuclei of %s as QuPath %s", len(reader), source, objects)
        return write_geojson_chunks(reader.chunks(chunk_rows), fs=fs, root=root,
                                    classes=reader.classes, slide_shape=reader.slide_shape,
                                    objects=objects, measurements=measurements,
                                    entry_bytes=entry_bytes,
                                    sizing=reader.chunks(chunk_rows, geometry=False))
