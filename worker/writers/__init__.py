"""Writers: the nucleus table → QuPath GeoJSON, counts, a zarr table, an overlay and a manifest.

Every writer takes an fsspec filesystem and a directory inside it, so results go to a local
directory, memory or an object store alike. :func:`write_all` writes them all for one slide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import fsspec
import numpy as np
from numpy.typing import NDArray

from models.card import ModelCard
from worker.job import SlideIdentity
from worker.nuclei import NucleusTable
from worker.writers._common import (
    NUCLEUS_CLASS,
    NUCLEUS_UUID_NAMESPACE,
    UNCLASSIFIED,
    UNCLASSIFIED_NAME,
    join,
    nucleus_ids,
    run_key,
)
from worker.writers.counts import COUNTS_NAME, count_nuclei, write_counts
from worker.writers.features import ObjectType, measurement_columns
from worker.writers.geojson import (
    ENTRY_BYTES,
    GEOJSON_NAME,
    GEOJSON_ZIP_NAME,
    INDEX_NAME,
    GeoJSONWritten,
    entry_name,
    write_geojson,
    write_geojson_chunks,
)
from worker.writers.manifest import MANIFEST_NAME, file_sha256, software_versions, write_manifest
from worker.writers.overlay import OVERLAY_NAME, draw_overlay, write_overlay
from worker.writers.polygons import CleanPolygons, clean_polygons, clean_rings
from worker.writers.qupath import export_qupath
from worker.writers.table import GRID_UM, TABLE_NAME, ZIP_NAME, TableWriter, count_grid, write_table
from worker.writers.table_read import TableReader, open_table, read_table

__all__ = [
    "COUNTS_NAME",
    "ENTRY_BYTES",
    "GEOJSON_NAME",
    "GEOJSON_ZIP_NAME",
    "GRID_UM",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "NUCLEUS_CLASS",
    "NUCLEUS_UUID_NAMESPACE",
    "OVERLAY_NAME",
    "TABLE_NAME",
    "UNCLASSIFIED",
    "UNCLASSIFIED_NAME",
    "ZIP_NAME",
    "CleanPolygons",
    "GeoJSONWritten",
    "ObjectType",
    "TableReader",
    "TableWriter",
    "clean_polygons",
    "clean_rings",
    "count_grid",
    "count_nuclei",
    "draw_overlay",
    "entry_name",
    "export_qupath",
    "file_sha256",
    "measurement_columns",
    "nucleus_ids",
    "open_table",
    "read_table",
    "run_key",
    "software_versions",
    "write_all",
    "write_counts",
    "write_geojson",
    "write_geojson_chunks",
    "write_manifest",
    "write_overlay",
    "write_table",
]

logger = logging.getLogger(__name__)


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    return int(fs.du(path)) if fs.isdir(path) else int(fs.size(path))


def write_all(
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    card: ModelCard,
    slide: SlideIdentity,
    thumbnail: NDArray[np.uint8] | None,
    thumbnail_downsample: float,
    tissue_area_mm2: float,
    parameters: Mapping[str, Any],
    timings: Mapping[str, float],
    grid_um: float = GRID_UM,
    analysed_area_mm2: float | None = None,
    entry_bytes: int = ENTRY_BYTES,
    objects: ObjectType | None = None,
) -> dict[str, str]:
    """Write every output of a slide under ``root``.

    Parameters
    ----------
    table : NucleusTable
        The slide's nuclei, level-0 pixels.
    fs : fsspec.AbstractFileSystem
    root : str
        Directory inside ``fs``.
    card : ModelCard
        The model that produced the nuclei (classes, colours; copied into the manifest).
    slide : SlideIdentity
        The slide: its level-0 shape and µm per pixel place the outputs, its identity goes into
        the manifest, and its hash (else its name) with the model and ``parameters`` into the
        run key nucleus ids derive from (:func:`run_key`).
    thumbnail : (H, W, 3) uint8 ndarray or None
        RGB thumbnail for the overlay; None writes no overlay.
    thumbnail_downsample : float
        Level-0 pixels per thumbnail pixel.
    tissue_area_mm2 : float
        Tissue area for densities.
    parameters : mapping
        Run parameters, recorded as given; those in :data:`~worker.writers._common.ID_PARAMETERS`
        enter the run key the nucleus ids derive from.
    timings : mapping
        Stage timings so far, seconds; the writers' own are added in the manifest.
    grid_um : float
        Count-grid cell side, µm.
    analysed_area_mm2 : float, optional
        Area analysed, recorded in ``counts.json``.
    entry_bytes : int
        Most JSON bytes per GeoJSON file or zip entry.
    objects : {"detections", "cells"}, optional
        QuPath object type (default: cells when the table has cell boundaries).

    Returns
    -------
    dict of str to str
        Output name → path in ``fs``: ``nuclei.geojson.gz`` (or ``nuclei.zip`` and
        ``nuclei-index.json``), ``counts.json``, ``nuclei.zarr.zip``, ``overlay.png``,
        ``manifest.json``.
    """
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be a ModelCard, got {type(card).__name__}")
    slide_shape, mpp, seed = slide.shape, slide.mpp, slide.seed
    classes = card.classes
    spent: dict[str, float] = {}
    start = time.perf_counter()
    key = run_key(seed, card, parameters)
    ids = nucleus_ids(key, range(len(table)))
    spent["write_prepare"] = time.perf_counter() - start

    names: list[str] = []
    start = time.perf_counter()
    geojson = write_geojson(table, fs=fs, root=root, classes=classes, slide_shape=slide_shape,
                            ids=ids, entry_bytes=entry_bytes, objects=objects)
    names += geojson.names
    spent["write_geojson"] = time.perf_counter() - start
    start = time.perf_counter()
    names.append(write_counts(table, fs=fs, root=root, classes=classes,
                              tissue_area_mm2=tissue_area_mm2,
                              analysed_area_mm2=analysed_area_mm2))
    spent["write_counts"] = time.perf_counter() - start
    start = time.perf_counter()
    names += write_table(table, fs=fs, root=root, classes=classes, mpp=mpp,
                         slide_shape=slide_shape, seed=key, ids=ids, grid_um=grid_um,
                         id_info={"slide": seed})
    spent["write_table"] = time.perf_counter() - start
    if thumbnail is not None:
        start = time.perf_counter()
        names.append(write_overlay(thumbnail, table, fs=fs, root=root,
                                   downsample=thumbnail_downsample, classes=classes))
        spent["write_overlay"] = time.perf_counter() - start

    counts = count_nuclei(table, classes=classes, tissue_area_mm2=tissue_area_mm2,
                          analysed_area_mm2=analysed_area_mm2)
    outputs = [{"name": name, "bytes": _size(fs, join(root, name))} for name in names]
    names.append(write_manifest(
        fs=fs, root=root,
        model=card,
        parameters=dict(parameters),
        timings={**timings, **spent},
        slide=slide.to_dict(),
        outputs=outputs,
        # "seed" is what nucleus_ids() takes: the run key, not the slide hash.
        nuclei={**counts, "geojson": geojson.stats, "seed": key, "slide_seed": seed},
    ))
    logger.info("wrote %d outputs for %d nuclei under %s in %.2f s", len(names), len(table),
                root, sum(spent.values()))
    return {name: join(root, name) for name in names}
