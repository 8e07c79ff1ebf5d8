"""A spatial index of a finished slide's nuclei, so a viewer can ask for the nuclei in a box.

Built once from the written GeoJSON (``nuclei.geojson.gz``, its parts, or the entries of
``nuclei.zip``), streamed feature by feature, so the features served are byte for byte the
GeoJSON's. Stored as a few flat files in a directory of any fsspec filesystem::

    index.json     geometry of the bucket grid, the classes, the number of nuclei
    cells.i8       (rows · cols + 1,) int64: nuclei of bucket k are records[cells[k]:cells[k + 1]]
    records.bin    one fixed-size record per nucleus (centroid, class, where its text lies),
                   sorted by bucket (row-major), then by order in the GeoJSON
    features.json  the features' JSON texts, in record order (so a bucket row is one byte range)
    density.json   nuclei per class per grid cell, for overviews

A nucleus' centroid is the centroid of its GeoJSON polygon (GEOS, as ``shapely``'s ``centroid``);
buckets are squares of ``cell_px`` level-0 px binned by centroid, so a box query
(:meth:`NucleusIndex.query`) reads one range of records and one range of text per bucket row the
box overlaps, never the whole slide's nuclei. A nucleus is in a box ``[x0, x1) × [y0, y1)`` when
its centroid is. Class 0 is "unclassified" (features without a classification).

Building holds the records (30 bytes per nucleus) in memory; the feature texts go through a
local temporary file.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import logging
import math
import mmap
import os
import tempfile
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import numpy as np
import shapely
import shapely.errors
import shapely.geometry
from numpy.typing import NDArray

__all__ = [
    "CELL_PX",
    "DENSITY_UM",
    "INDEX_DIR",
    "MAX_LIMIT",
    "UNCLASSIFIED",
    "NucleusIndex",
    "QueryResult",
    "build_index",
    "build_index_from_results",
    "geojson_sources",
    "index_exists",
    "iter_features",
    "open_index",
]

logger = logging.getLogger(__name__)

INDEX_DIR = "viewer-index"
"""Directory of the index inside a job's results directory."""

CELL_PX = 512.0
"""Bucket side, level-0 px: a few dozen nuclei per bucket in dense tissue at 40×."""

DENSITY_UM = 100.0
"""Side of a density cell, µm (the count grid's default)."""

MAX_LIMIT = 50_000
"""Most nuclei one query returns."""

UNCLASSIFIED = {"name": "unclassified", "colour": [150, 150, 150]}
"""Class 0: nuclei whose feature has no classification."""

_VERSION = 2
_READ_CHARS = 1 << 20
_BLOCK = 4096
_RECORD = np.dtype([("x", "<f8"), ("y", "<f8"), ("start", "<i8"), ("length", "<i4"), ("cls", "<i2")])


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


# --------------------------------------------------------------------------- reading GeoJSON


def iter_features(stream: IO[str], *, chunk: int = _READ_CHARS) -> Iterator[tuple[str, dict[str, Any]]]:
    """The features of a GeoJSON ``FeatureCollection`` text stream, one at a time.

    Yields ``(text, feature)``: each feature's exact JSON text and its decoded value. Memory holds
    about ``chunk`` characters plus one feature, whatever the file's size.

    Raises
    ------
    ValueError
        If the text has no ``"features"`` array or ends inside it.
    """
    decoder = json.JSONDecoder()
    buffer, pos, eof = "", 0, False

    def fill() -> None:
        nonlocal buffer, pos, eof
        data = stream.read(chunk)
        eof = not data
        buffer, pos = buffer[pos:] + data, 0

    while True:  # find the array: '"features"', a colon, '['
        at = buffer.find('"features"')
        start = buffer.find("[", at) if at >= 0 else -1
        if start >= 0:
            pos = start + 1
            break
        if eof:
            raise ValueError("not a GeoJSON FeatureCollection: no \"features\" array")
        fill()
    while True:
        while True:
            while pos < len(buffer) and buffer[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buffer) or eof:
                break
            fill()
        if pos >= len(buffer):
            raise ValueError("the GeoJSON ends inside its \"features\" array")
        if buffer[pos] == "]":
            return
        try:
            feature, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if eof:
                raise ValueError("the GeoJSON has a malformed feature") from None
            fill()  # the feature continues in the next chunk
            continue
        if not isinstance(feature, dict):
            raise ValueError("a GeoJSON feature is not an object")
        yield buffer[pos:end], feature
        pos = end


def geojson_sources(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """The GeoJSON files of a results directory, in order: ``nuclei.geojson.gz``, else its parts
    (``nuclei-part-*.geojson.gz``), else the ``.geojson`` entries of ``nuclei.zip`` (as
    ``nuclei.zip::entry``)."""
    single = _join(root, "nuclei.geojson.gz")
    if fs.exists(single):
        return [single]
    parts = sorted(fs.glob(_join(root, "nuclei-part-*.geojson.gz")))
    if parts:
        return [str(p) for p in parts]
    archive = _join(root, "nuclei.zip")
    if fs.exists(archive):
        with fs.open(archive, "rb") as raw, zipfile.ZipFile(raw) as zf:
            return [f"{archive}::{name}" for name in sorted(zf.namelist()) if name.endswith(".geojson")]
    raise FileNotFoundError(f"no GeoJSON nuclei under {root}")


@contextlib.contextmanager
def _open_text(fs: fsspec.AbstractFileSystem, source: str) -> Iterator[IO[str]]:
    archive, _, entry = source.partition("::")
    with fs.open(archive, "rb") as raw:
        if entry:
            with zipfile.ZipFile(raw) as zf, zf.open(entry) as member:
                yield io.TextIOWrapper(member, encoding="utf-8")
        elif archive.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as gz:
                yield io.TextIOWrapper(gz, encoding="utf-8")
        else:
            yield io.TextIOWrapper(raw, encoding="utf-8")


# --------------------------------------------------------------------------- building


class _Classes:
    """Class names → indices (0 = unclassified), seeded with the model's classes."""

    def __init__(self, classes: Sequence[dict[str, Any]]) -> None:
        self.items: list[dict[str, Any]] = [dict(UNCLASSIFIED)]
        self.index: dict[str, int] = {}
        for c in classes:
            self.add(str(c["name"]), list(c["colour"]))

    def add(self, name: str, colour: list[int] | None) -> int:
        if name not in self.index:
            self.index[name] = len(self.items)
            self.items.append({"name": name, "colour": list(colour or UNCLASSIFIED["colour"])})
        return self.index[name]

    def of(self, feature: dict[str, Any]) -> int:
        classification = (feature.get("properties") or {}).get("classification")
        if not isinstance(classification, dict) or "name" not in classification:
            return 0
        return self.add(str(classification["name"]), classification.get("color"))


def _centroids(geometries: list[dict[str, Any]]) -> NDArray[np.float64]:
    """(n, 2) centroids of GeoJSON geometries; Polygons in bulk, anything else one by one."""
    out = np.full((len(geometries), 2), np.nan)
    simple = [i for i, g in enumerate(geometries)
              if g.get("type") == "Polygon" and len(g.get("coordinates") or ()) == 1]
    if simple:
        rings = [np.asarray(geometries[i]["coordinates"][0], np.float64) for i in simple]
        coords = np.concatenate(rings)
        ids = np.repeat(np.arange(len(rings)), [len(r) for r in rings])
        try:
            polygons = shapely.polygons(shapely.linearrings(coords, indices=ids))
            out[simple] = shapely.get_coordinates(shapely.centroid(polygons))
        except (shapely.errors.GEOSException, ValueError):
            simple = []  # a malformed ring among them: take them one by one
    done = set(simple)
    for i, geometry in enumerate(geometries):
        if i not in done:
            point = shapely.geometry.shape(geometry).centroid
            if not point.is_empty:
                out[i] = (point.x, point.y)
    return out


def _scan(fs: fsspec.AbstractFileSystem, sources: list[str], classes: _Classes, blob: IO[bytes]
          ) -> NDArray[np.void]:
    """Write every feature's text to ``blob``; their records (in GeoJSON order)."""
    records: list[NDArray[np.void]] = []
    offset = 0
    pending: list[tuple[int, int, int, dict[str, Any]]] = []

    def flush() -> None:
        block = np.zeros(len(pending), _RECORD)
        centres = _centroids([geometry for *_, geometry in pending])
        block["x"], block["y"] = centres[:, 0], centres[:, 1]
        block["start"] = [p[0] for p in pending]
        block["length"] = [p[1] for p in pending]
        block["cls"] = [p[2] for p in pending]
        records.append(block)
        pending.clear()

    for source in sources:
        with _open_text(fs, source) as stream:
            for text, feature in iter_features(stream):
                data = text.encode("utf-8")
                blob.write(data)
                pending.append((offset, len(data), classes.of(feature), feature.get("geometry") or {}))
                offset += len(data)
                if len(pending) >= _BLOCK:
                    flush()
    if pending:
        flush()
    return np.concatenate(records) if records else np.zeros(0, _RECORD)


def _bucket(x: NDArray[np.float64], y: NDArray[np.float64], cell: float, rows: int, cols: int
            ) -> NDArray[np.intp]:
    col = np.clip(np.floor(np.nan_to_num(x) / cell), 0, cols - 1).astype(np.intp)
    row = np.clip(np.floor(np.nan_to_num(y) / cell), 0, rows - 1).astype(np.intp)
    return row * cols + col


def _density(records: NDArray[np.void], n_classes: int, height: int, width: int, mpp: float,
             cell_um: float) -> dict[str, Any]:
    cell = cell_um / mpp
    rows, cols = math.ceil(height / cell), math.ceil(width / cell)
    flat = records["cls"].astype(np.intp) * rows * cols + _bucket(records["x"], records["y"], cell,
                                                                   rows, cols)
    grid = np.bincount(flat, minlength=n_classes * rows * cols).reshape(n_classes, -1)
    return {"cell_px": cell, "cell_um": cell_um, "rows": rows, "cols": cols,
            "counts": [plane.astype(int).tolist() for plane in grid]}


def build_index(
    fs: fsspec.AbstractFileSystem,
    root: str,
    *,
    slide_shape: Sequence[int],
    mpp: float,
    classes: Sequence[dict[str, Any]] = (),
    cell_px: float = CELL_PX,
    density_um: float = DENSITY_UM,
) -> str:
    """Index the GeoJSON nuclei of the results directory ``root``; returns the index directory.

    Parameters
    ----------
    fs : fsspec.AbstractFileSystem
    root : str
        A results directory holding the GeoJSON (see :func:`geojson_sources`).
    slide_shape : (int, int)
        Level-0 (height, width).
    mpp : float
        µm per level-0 px (for the density cells).
    classes : sequence of dict
        ``{"name", "colour"}`` of the model's classes (background excluded), so classes without
        nuclei still have their index and colour; classes met in the GeoJSON are added.
    cell_px : float
        Bucket side, level-0 px.
    density_um : float
        Density cell side, µm.
    """
    if len(slide_shape) < 2 or min(int(slide_shape[0]), int(slide_shape[1])) <= 0:
        raise ValueError(f"slide_shape must be (height, width) > 0, got {tuple(slide_shape)}")
    if not (isinstance(mpp, int | float) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per px, got {mpp!r}")
    if not (math.isfinite(cell_px) and cell_px >= 1):
        raise ValueError(f"cell_px must be >= 1, got {cell_px!r}")
    height, width = int(slide_shape[0]), int(slide_shape[1])
    known = _Classes(classes)
    sources = geojson_sources(fs, root)
    rows, cols = math.ceil(height / cell_px), math.ceil(width / cell_px)
    folder = _join(root, INDEX_DIR)
    with tempfile.TemporaryDirectory(prefix="hoverserve-index-") as tmp:
        scanned, ordered = os.path.join(tmp, "scanned"), os.path.join(tmp, "features.json")
        with open(scanned, "wb") as blob:
            records = _scan(fs, sources, known, blob)
        bucket = _bucket(records["x"], records["y"], cell_px, rows, cols)
        order = np.argsort(bucket, kind="stable")
        records = records[order]
        _reorder(scanned, ordered, records)
        cells = np.searchsorted(bucket[order], np.arange(rows * cols + 1), side="left").astype("<i8")
        fs.makedirs(folder, exist_ok=True)
        if fs.exists(_join(folder, "index.json")):  # a rebuild: readers see no half-new index
            fs.rm(_join(folder, "index.json"))
        fs.put_file(ordered, _join(folder, "features.json"))
    fs.pipe_file(_join(folder, "cells.i8"), cells.tobytes())
    fs.pipe_file(_join(folder, "records.bin"), records.tobytes())
    density = _density(records, len(known.items), height, width, float(mpp), density_um)
    fs.pipe_file(_join(folder, "density.json"), json.dumps(density).encode())
    info = {"format": "hoverserve.nuclei-index", "version": _VERSION, "n": len(records),
            "cell_px": float(cell_px), "rows": rows, "cols": cols, "slide_shape": [height, width],
            "mpp": float(mpp), "classes": [{"type": i, **c} for i, c in enumerate(known.items)]}
    # Written last: a directory without index.json is incomplete and is rebuilt.
    fs.pipe_file(_join(folder, "index.json"), json.dumps(info).encode())
    logger.info("nuclei index: %d nuclei in %d × %d buckets of %.0f px under %s",
                len(records), cols, rows, cell_px, folder)
    return folder


def _reorder(scanned: str, ordered: str, records: NDArray[np.void]) -> None:
    """Copy the feature texts into record order; records' ``start`` then point into the copy."""
    new_start = np.concatenate([[0], np.cumsum(records["length"], dtype=np.int64)])[:-1]
    with open(scanned, "rb") as src, open(ordered, "wb") as dst:
        if len(records) and os.path.getsize(scanned):
            with mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as view:
                for start, length in zip(records["start"].tolist(), records["length"].tolist(),
                                         strict=True):
                    dst.write(view[start : start + length])
    records["start"] = new_start


def build_index_from_results(fs: fsspec.AbstractFileSystem, root: str) -> str:
    """Build the index of a results directory, reading the slide and classes from its manifest."""
    manifest = json.loads(fs.cat_file(_join(root, "manifest.json")))
    try:
        slide = manifest["slide"]
        shape = slide.get("shape") or [slide["height"], slide["width"]]
        mpp = float(slide["mpp"])
        card_classes = (manifest.get("model") or {}).get("classes") or []
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{root}: manifest.json lacks the slide's shape or mpp ({exc})") from exc
    classes = [c for c in card_classes[1:] if isinstance(c, dict) and "name" in c and "colour" in c]
    return build_index(fs, root, slide_shape=shape, mpp=mpp, classes=classes)


def index_exists(fs: fsspec.AbstractFileSystem, root: str) -> bool:
    """Whether a complete index lies under ``root``."""
    return bool(fs.exists(_join(root, INDEX_DIR, "index.json")))


# --------------------------------------------------------------------------- querying


@dataclass(frozen=True)
class QueryResult:
    """Nuclei found in a box: their GeoJSON feature texts, and whether ``limit`` cut them short."""

    features: list[bytes]
    truncated: bool

    def feature_collection(self, **members: Any) -> bytes:
        """A GeoJSON FeatureCollection of the features, with ``members`` added (JSON values)."""
        extra = "".join(f",{json.dumps(k)}:{json.dumps(v)}" for k, v in members.items())
        return (b'{"type":"FeatureCollection","features":[' + b",".join(self.features) + b"]"
                + extra.encode() + b"}")


class NucleusIndex:
    """An index written by :func:`build_index`, opened for queries (see :func:`open_index`)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str) -> None:
        self.fs, self.folder = fs, folder
        self.info: dict[str, Any] = json.loads(fs.cat_file(_join(folder, "index.json")))
        if self.info.get("format") != "hoverserve.nuclei-index" or self.info.get("version") != _VERSION:
            raise ValueError(f"{folder} is not a version-{_VERSION} nuclei index")
        self.cells = np.frombuffer(fs.cat_file(_join(folder, "cells.i8")), "<i8")
        self.cell_px = float(self.info["cell_px"])
        self.rows, self.cols = int(self.info["rows"]), int(self.info["cols"])

    def __len__(self) -> int:
        return int(self.info["n"])

    @property
    def classes(self) -> list[dict[str, Any]]:
        """``{"type", "name", "colour"}`` of every class index (0 = unclassified)."""
        return list(self.info["classes"])

    def density(self) -> dict[str, Any]:
        """Nuclei per class per density cell (``counts[class][row * cols + col]``), with the classes."""
        document = json.loads(self.fs.cat_file(_join(self.folder, "density.json")))
        document["classes"] = self.classes
        return document

    def _records(self, start: int, stop: int) -> NDArray[np.void]:
        if stop <= start:
            return np.zeros(0, _RECORD)
        data = self.fs.cat_file(_join(self.folder, "records.bin"), start=start * _RECORD.itemsize,
                                end=stop * _RECORD.itemsize)
        return np.frombuffer(data, _RECORD)

    def _span(self, lo: float, hi: float, count: int) -> range:
        first = max(0, math.floor(lo / self.cell_px))
        last = min(count - 1, math.floor(hi / self.cell_px))
        return range(first, last + 1)

    def query(self, x0: float, y0: float, x1: float, y1: float, *, limit: int = 5000) -> QueryResult:
        """The nuclei whose centroid lies in ``[x0, x1) × [y0, y1)`` (level-0 px).

        At most ``limit``, bucket row by bucket row; ``truncated`` says whether more lay in the box.
        """
        box = (x0, y0, x1, y1)
        if not all(isinstance(v, int | float) and math.isfinite(v) for v in box):
            raise ValueError(f"bbox must be four finite numbers, got {box}")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"bbox must have x0 < x1 and y0 < y1, got {box}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
            raise ValueError(f"limit must be an integer within 1..{MAX_LIMIT}, got {limit!r}")
        features: list[bytes] = []
        cols = self._span(x0, math.nextafter(x1, -math.inf), self.cols)
        if not cols:
            return QueryResult(features, False)
        for r in self._span(y0, math.nextafter(y1, -math.inf), self.rows):
            # The buckets of one grid row are contiguous in the records and in the text.
            records = self._records(int(self.cells[r * self.cols + cols.start]),
                                    int(self.cells[r * self.cols + cols.stop]))
            inside = records[(records["x"] >= x0) & (records["x"] < x1)
                             & (records["y"] >= y0) & (records["y"] < y1)]
            room = limit - len(features)
            features += self._texts(inside[:room])
            if len(inside) > room:
                return QueryResult(features, True)
        return QueryResult(features, False)

    def _texts(self, records: NDArray[np.void]) -> list[bytes]:
        if not len(records):
            return []
        first = int(records["start"][0])
        last = int(records["start"][-1] + records["length"][-1])
        data = self.fs.cat_file(_join(self.folder, "features.json"), start=first, end=last)
        return [data[s - first : s - first + n]
                for s, n in zip(records["start"].tolist(), records["length"].tolist(), strict=True)]


def open_index(fs: fsspec.AbstractFileSystem, root: str) -> NucleusIndex:
    """Open the index under ``root`` (a results directory); raises FileNotFoundError if none."""
    folder = _join(root, INDEX_DIR)
    if not fs.exists(_join(folder, "index.json")):
        raise FileNotFoundError(f"no nuclei index under {root}")
    return NucleusIndex(fs, folder)
