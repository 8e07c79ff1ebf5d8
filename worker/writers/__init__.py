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
from worker.nuclei import NucleusTable
from worker.writers._common import NUCLEUS_CLASS, NUCLEUS_UUID_NAMESPACE, join, nucleus_ids
from worker.writers.counts import COUNTS_NAME, count_nuclei, write_counts
from worker.writers.geojson import (
    GEOJSON_NAME,
    INDEX_NAME,
    MAX_PER_FILE,
    CleanPolygons,
    clean_polygons,
    part_name,
    write_geojson,
)
from worker.writers.manifest import MANIFEST_NAME, file_sha256, software_versions, write_manifest
from worker.writers.overlay import OVERLAY_NAME, draw_overlay, write_overlay
from worker.writers.table import (
    GRID_UM,
    TABLE_NAME,
    ZIP_NAME,
    count_grid,
    read_table,
    write_table,
    zip_zarr,
)

__all__ = [
    "COUNTS_NAME",
    "GEOJSON_NAME",
    "GRID_UM",
    "INDEX_NAME",
    "MANIFEST_NAME",
    "MAX_PER_FILE",
    "NUCLEUS_CLASS",
    "NUCLEUS_UUID_NAMESPACE",
    "OVERLAY_NAME",
    "TABLE_NAME",
    "ZIP_NAME",
    "CleanPolygons",
    "clean_polygons",
    "count_grid",
    "count_nuclei",
    "draw_overlay",
    "file_sha256",
    "nucleus_ids",
    "part_name",
    "read_table",
    "software_versions",
    "write_all",
    "write_counts",
    "write_geojson",
    "write_manifest",
    "write_overlay",
    "write_table",
    "zip_zarr",
]

logger = logging.getLogger(__name__)


def _slide_geometry(slide_info: Mapping[str, Any]) -> tuple[tuple[int, int], float]:
    """(height, width) and level-0 µm/px from ``slide_info``."""
    if "shape" in slide_info:
        shape = tuple(int(v) for v in slide_info["shape"][:2])
    elif "height" in slide_info and "width" in slide_info:
        shape = (int(slide_info["height"]), int(slide_info["width"]))
    else:
        raise ValueError("slide_info needs 'shape' (height, width) or 'height' and 'width'")
    if "mpp" not in slide_info:
        raise ValueError("slide_info needs 'mpp' (µm per level-0 pixel)")
    return (shape[0], shape[1]), float(slide_info["mpp"])


def _size(fs: fsspec.AbstractFileSystem, path: str) -> int:
    return int(fs.du(path)) if fs.isdir(path) else int(fs.size(path))


def write_all(
    table: NucleusTable,
    *,
    fs: fsspec.AbstractFileSystem,
    root: str,
    card: ModelCard,
    slide_info: Mapping[str, Any],
    thumbnail: NDArray[np.uint8] | None,
    thumbnail_downsample: float,
    tissue_area_mm2: float,
    parameters: Mapping[str, Any],
    timings: Mapping[str, float],
    seed: str,
    grid_um: float = GRID_UM,
    analysed_area_mm2: float | None = None,
    max_per_file: int = MAX_PER_FILE,
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
    slide_info : mapping
        Slide identity for the manifest; must hold ``shape`` (level-0 height, width) or
        ``height``/``width``, and ``mpp`` (µm per level-0 pixel). Usually also ``name``,
        ``format`` and ``sha256`` (see :func:`file_sha256`).
    thumbnail : (H, W, 3) uint8 ndarray or None
        RGB thumbnail for the overlay; None writes no overlay.
    thumbnail_downsample : float
        Level-0 pixels per thumbnail pixel.
    tissue_area_mm2 : float
        Tissue area for densities.
    parameters : mapping
        Run parameters, recorded as given.
    timings : mapping
        Stage timings so far, seconds; the writers' own are added in the manifest.
    seed : str
        Slide identity for stable nucleus UUIDs (e.g. the slide's SHA-256).
    grid_um : float
        Count-grid cell side, µm.
    analysed_area_mm2 : float, optional
        Area analysed, recorded in ``counts.json``.
    max_per_file : int
        Nuclei per GeoJSON part.

    Returns
    -------
    dict of str to str
        Output name → path in ``fs`` (GeoJSON part names, ``nuclei-index.json``, ``counts.json``,
        ``nuclei.zarr``, ``nuclei.zarr.zip``, ``overlay.png``, ``manifest.json``).
    """
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be a ModelCard, got {type(card).__name__}")
    slide_shape, mpp = _slide_geometry(slide_info)
    classes = card.classes
    spent: dict[str, float] = {}
    start = time.perf_counter()
    ids = nucleus_ids(seed, range(len(table)))
    polygons = clean_polygons(table, slide_shape=slide_shape)
    spent["write_prepare"] = time.perf_counter() - start

    names: list[str] = []
    start = time.perf_counter()
    names += write_geojson(table, fs=fs, root=root, classes=classes, seed=seed,
                           slide_shape=slide_shape, max_per_file=max_per_file,
                           polygons=polygons, ids=ids)
    spent["write_geojson"] = time.perf_counter() - start
    start = time.perf_counter()
    names.append(write_counts(table, fs=fs, root=root, classes=classes,
                              tissue_area_mm2=tissue_area_mm2,
                              analysed_area_mm2=analysed_area_mm2))
    spent["write_counts"] = time.perf_counter() - start
    start = time.perf_counter()
    names += write_table(table, fs=fs, root=root, classes=classes, mpp=mpp,
                         slide_shape=slide_shape, seed=seed, ids=ids, grid_um=grid_um)
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
        slide=dict(slide_info),
        outputs=outputs,
        nuclei={**counts, "geojson": polygons.stats, "seed": seed},
    ))
    logger.info("wrote %d outputs for %d nuclei under %s in %.2f s", len(names), len(table),
                root, sum(spent.values()))
    return {name: join(root, name) for name in names}
