"""Writers: QuPath GeoJSON, counts, the zarr table, the overlay and the manifest.

Nuclei are hand-made polygons with known troubles (a bow-tie, three collinear points, a vertex that
rounding pushes onto an edge, 4-decimal coordinates, a nucleus crossing the slide's edge), and every
GeoJSON file written is run through the shared re-implementation of QuPath's importer checks.
The re-export of large tables and a real run's consistency are in ``test_export_qupath.py``.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import math
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import cv2
import fsspec
import numpy as np
import pytest
import shapely
import zarr
from zarr.storage import ZipStore

from models.card import ClassInfo, ModelCard
from worker.job import SlideIdentity
from worker.nuclei import NucleusTable
from worker.writers import (
    UNCLASSIFIED,
    GeoJSONWritten,
    clean_polygons,
    count_grid,
    draw_overlay,
    file_sha256,
    nucleus_ids,
    open_table,
    read_table,
    run_key,
    write_all,
    write_counts,
    write_geojson,
    write_manifest,
    write_overlay,
    write_table,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared"
CHECKER = SHARED / "tools" / "qupath_geojson_check.py"

SLIDE_SHAPE = (1000, 2000)  # level-0 (height, width)
MPP = 0.5
SEED = "sha256-of-the-slide"
CLASSES = (
    ClassInfo(name="Background", colour=(0, 0, 0)),
    ClassInfo(name="Tumour", colour=(255, 0, 0)),
    ClassInfo(name="Lymphocyte", colour=(0, 128, 255)),
    ClassInfo(name="Stroma", colour=(0, 200, 0)),
)
CARD = ModelCard(name="test-model", input_size=256, output_size=164, mpp=0.25, classes=CLASSES)

SQUARE = [(100, 100), (120, 100), (120, 120), (100, 120)]
BOW_TIE = [(300, 300), (340, 340), (340, 300), (300, 340)]
COLLINEAR = [(500, 500), (510, 510), (520, 520)]
FOUR_DECIMALS = [(700.12345, 200.5), (730.98765, 200.5), (730.98765, 230.0001),
                 (700.12345, 230.0001)]
# Valid as given; rounding moves (905, 400.004) onto the bottom edge, so the ring touches itself.
NOTCH = [(900, 400), (910, 400), (910, 410), (905, 400.004), (900, 410)]
ACROSS_EDGE = [(1990, 600), (2010, 600), (2010, 620), (1990, 620)]  # slide is 2000 wide
HEXAGON = [(1500, 800), (1510, 795), (1520, 800), (1520, 810), (1510, 815), (1500, 810)]
POLYGONS = [SQUARE, BOW_TIE, COLLINEAR, FOUR_DECIMALS, NOTCH, ACROSS_EDGE, HEXAGON]
TYPES = [1, 2, 1, 1, 2, 2, 1]
BOW_TIE_ROW, COLLINEAR_ROW, FOUR_DECIMALS_ROW, NOTCH_ROW, ACROSS_EDGE_ROW = 1, 2, 3, 4, 5


def make_table(polygons: Sequence[Sequence[tuple[float, float]]], types: Sequence[int],
               *, nan_eccentricity_row: int | None = 0) -> NucleusTable:
    """A table whose geometry columns follow the polygons; measurements vary per row."""
    n = len(polygons)
    rings = [np.asarray(p, np.float64) for p in polygons]
    eccentricity = np.linspace(0.1, 0.7, n).astype(np.float32)
    if nan_eccentricity_row is not None and n:
        eccentricity[nan_eccentricity_row] = np.nan
    return NucleusTable(
        centroid=np.array([r.mean(axis=0) for r in rings]).reshape(n, 2),
        bbox=np.array([[*r.min(axis=0), *r.max(axis=0)] for r in rings]).reshape(n, 4),
        area_um2=np.linspace(20, 80, n).astype(np.float32),
        perimeter_um=np.linspace(15, 40, n).astype(np.float32),
        solidity=np.full(n, 0.93, np.float32),
        eccentricity=eccentricity,
        type=np.asarray(types, np.int16),
        type_prob=np.linspace(0.5, 0.99, n).astype(np.float32),
        np_prob=np.full(n, 0.875, np.float32),
        vertices=(np.concatenate(rings) if rings else np.zeros((0, 2))).astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum([len(p) for p in polygons])]).astype(np.int64),
        region=np.arange(n, dtype=np.int32),
    )


def square(x: float, y: float, side: float = 10.0) -> list[tuple[float, float]]:
    return [(x, y), (x + side, y), (x + side, y + side), (x, y + side)]


def run_checker(*paths: str) -> str:
    result = subprocess.run([sys.executable, str(CHECKER), *paths], capture_output=True,
                            text=True, check=True)
    return result.stdout


def assert_qupath_accepts(*paths: str) -> None:
    """Every file OK and not a single warning from the importer re-implementation."""
    report = run_checker(*paths)
    lines = report.splitlines()
    assert sum(line.startswith("OK") for line in lines) == len(paths), report
    assert "FAIL" not in report and "fatal" not in report and "warn" not in report, report


def features(fs: fsspec.AbstractFileSystem, path: str, **json_options: object) -> list[dict]:
    with fs.open(path, "rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as fh:
        document = json.load(fh, **json_options)
    assert document["type"] == "FeatureCollection"
    return document["features"]


@pytest.fixture
def local() -> fsspec.AbstractFileSystem:
    return fsspec.filesystem("file")


@pytest.fixture
def memory() -> Iterator[tuple[fsspec.AbstractFileSystem, str]]:
    fs = fsspec.filesystem("memory")
    root = f"/writers-{uuid.uuid4().hex}"
    yield fs, root
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def table() -> NucleusTable:
    return make_table(POLYGONS, TYPES)


def write(table: NucleusTable, root: Path, **options: Any) -> GeoJSONWritten:
    options.setdefault("seed", SEED)
    return write_geojson(table, fs=fsspec.filesystem("file"), root=str(root), classes=CLASSES,
                         slide_shape=SLIDE_SHAPE, **options)


def zip_features(path: Path) -> dict[str, list[dict]]:
    """Features of every entry of a ``nuclei.zip``, by entry name."""
    with zipfile.ZipFile(path) as archive:
        return {name: json.loads(archive.read(name))["features"] for name in archive.namelist()}


def open_zarr(path: Path) -> zarr.Group:
    return zarr.open_group(ZipStore(path, mode="r"), mode="r")


# --------------------------------------------------------------------------------- GeoJSON


def test_geojson_passes_the_qupath_checker(table: NucleusTable, tmp_path: Path) -> None:
    written = write(table, tmp_path)

    # One file, no index: everything fits in one entry.
    assert written.names == ["nuclei.geojson.gz"] and written.entries == [
        ("nuclei.geojson.gz", len(table) - 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.geojson.gz"]
    assert_qupath_accepts(str(tmp_path / "nuclei.geojson.gz"))
    assert f"n={len(table) - 1} " in run_checker(str(tmp_path / "nuclei.geojson.gz"))


def test_features_are_classified_detections(table: NucleusTable, tmp_path: Path, local) -> None:
    write(table, tmp_path)
    written = features(local, str(tmp_path / "nuclei.geojson.gz"))
    by_id = {f["id"]: f for f in written}
    ids = nucleus_ids(SEED, range(len(table)))

    for row in (0, 6):
        feature = by_id[ids[row]]
        assert feature["type"] == "Feature"
        assert feature["properties"]["objectType"] == "detection"
        assert "type" not in feature["properties"]  # an alias of objectType in QuPath
        assert feature["properties"]["classification"] == {"name": "Tumour", "color": [255, 0, 0]}
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon"
        assert len(feature["geometry"]["coordinates"]) == 1
        assert len(ring) >= 4 and ring[0] == ring[-1]
        assert "nucleusGeometry" not in feature
    assert by_id[ids[BOW_TIE_ROW]]["properties"]["classification"] == {
        "name": "Lymphocyte", "color": [0, 128, 255]}
    assert [f["id"] for f in written] == [ids[r] for r in (0, 1, 3, 4, 5, 6)]  # table order


def test_unclassified_nuclei_carry_no_classification(tmp_path: Path, local) -> None:
    typed = make_table(POLYGONS, [0, 2, 1, 1, 0, 0, 1])
    write(typed, tmp_path / "typed")
    write_geojson(typed, fs=local, root=str(tmp_path / "untyped"), classes=(), seed=SEED,
                  slide_shape=SLIDE_SHAPE)
    ids = nucleus_ids(SEED, range(len(typed)))

    by_id = {f["id"]: f for f in features(local, str(tmp_path / "typed" / "nuclei.geojson.gz"))}
    for row in (0, 4, 5):
        properties = by_id[ids[row]]["properties"]
        assert "classification" not in properties
        assert "Class probability" not in properties["measurements"]
        assert "Detection probability" in properties["measurements"]
    assert by_id[ids[6]]["properties"]["classification"]["name"] == "Tumour"
    assert "Class probability" in by_id[ids[6]]["properties"]["measurements"]
    untyped = features(local, str(tmp_path / "untyped" / "nuclei.geojson.gz"))
    assert len(untyped) == 6
    assert all("classification" not in f["properties"] for f in untyped)
    assert all("Class probability" not in f["properties"]["measurements"] for f in untyped)
    assert_qupath_accepts(str(tmp_path / "typed" / "nuclei.geojson.gz"),
                          str(tmp_path / "untyped" / "nuclei.geojson.gz"))


def test_bow_tie_is_repaired_and_degenerate_dropped(table: NucleusTable, tmp_path: Path,
                                                    local) -> None:
    assert not shapely.Polygon(BOW_TIE).is_valid
    written = write(table, tmp_path)
    by_id = {f["id"]: f for f in features(local, str(tmp_path / "nuclei.geojson.gz"))}
    ids = nucleus_ids(SEED, range(len(table)))

    bow_tie = shapely.geometry.shape(by_id[ids[BOW_TIE_ROW]]["geometry"])
    assert bow_tie.is_valid and bow_tie.geom_type == "Polygon"
    assert bow_tie.area == pytest.approx(400.0)  # one of the two 400 px² triangles
    assert ids[COLLINEAR_ROW] not in by_id
    assert written.dropped_rows == [COLLINEAR_ROW] and written.repaired == 2
    assert written.stats == {"written": len(table) - 1, "repaired": 2, "dropped": 1,
                             "file": "nuclei.geojson.gz", "entries": 1}


def test_polygon_broken_by_rounding_is_repaired(table: NucleusTable, tmp_path: Path,
                                                local) -> None:
    assert shapely.Polygon(NOTCH).is_valid
    assert not shapely.Polygon(np.round(np.asarray(NOTCH, np.float32).astype(float), 2)).is_valid
    polygons = clean_polygons(table, slide_shape=SLIDE_SHAPE)
    assert polygons.repaired.tolist() == [BOW_TIE_ROW, NOTCH_ROW]

    write(table, tmp_path)
    by_id = {f["id"]: f for f in features(local, str(tmp_path / "nuclei.geojson.gz"))}
    notch = shapely.geometry.shape(by_id[nucleus_ids(SEED, [NOTCH_ROW])[0]]["geometry"])
    # The touch splits the ring into two 25 px² triangles; the larger (first) one is kept.
    assert notch.is_valid and notch.area == pytest.approx(25.0)


def test_contour_spike_is_cut_and_nuclei_outside_the_slide_or_not_finite_dropped() -> None:
    spike = [(10, 10), (20, 10), (20, 15), (25, 15), (20, 15), (20, 20), (10, 20)]
    outside = square(2100, 500)
    not_a_number = [(50, 50), (60, math.nan), (60, 60)]
    polygons = clean_polygons(make_table([spike, outside, not_a_number], [1, 1, 1]),
                              slide_shape=SLIDE_SHAPE)

    assert polygons.rows.tolist() == [0] and polygons.dropped.tolist() == [1, 2]
    assert polygons.repaired.tolist() == [0]
    repaired = shapely.Polygon(polygons.ring(0))
    assert repaired.is_valid and repaired.area == pytest.approx(100.0)
    assert polygons.stats == {"written": 1, "repaired": 1, "dropped": 2}


def test_coordinates_have_two_decimals_and_lie_in_the_slide(table: NucleusTable, tmp_path: Path,
                                                            local) -> None:
    write(table, tmp_path)
    # parse_float=str keeps every number as written, to count its decimals.
    written = features(local, str(tmp_path / "nuclei.geojson.gz"), parse_float=str)
    height, width = SLIDE_SHAPE
    for feature in written:
        for x, y in feature["geometry"]["coordinates"][0]:
            for text, limit in ((x, width), (y, height)):
                assert "." not in text or len(text.split(".")[1]) <= 2, text
                assert 0.0 <= float(text) <= limit
    by_id = {f["id"]: f for f in written}
    ring = by_id[nucleus_ids(SEED, [FOUR_DECIMALS_ROW])[0]]["geometry"]["coordinates"][0]
    assert ring[:4] == [["700.12", "200.5"], ["730.99", "200.5"], ["730.99", "230.0"],
                        ["700.12", "230.0"]]
    edge = by_id[nucleus_ids(SEED, [ACROSS_EDGE_ROW])[0]]["geometry"]["coordinates"][0]
    assert max(float(x) for x, _ in edge) == 2000.0


def test_coordinate_text_is_the_shortest_repr_of_the_rounded_value(tmp_path: Path, local) -> None:
    rng = np.random.default_rng(3)
    centres = rng.uniform(0, 990, (150, 2)) * (2, 1)  # inside the 2000 × 1000 slide
    centres[:10] = np.round(centres[:10])  # integers
    centres[10:20] = np.round(centres[10:20], 1)  # one decimal
    polygons = [square(x, y, 7.25) for x, y in centres] + [square(0, 0, 5)]
    noisy = make_table(polygons, [1] * len(polygons))
    write(noisy, tmp_path)
    written = features(local, str(tmp_path / "nuclei.geojson.gz"), parse_float=str)

    assert len(written) == len(polygons)
    for feature, polygon in zip(written, polygons, strict=True):
        ring = feature["geometry"]["coordinates"][0]
        expected = np.round(np.asarray(polygon, np.float32).astype(np.float64), 2)
        assert [[float(x), float(y)] for x, y in ring[:-1]] == expected.tolist()
        assert all(t == repr(float(t)) for pair in ring for t in pair)


def test_measurements_are_finite_numbers_and_nan_is_skipped(table: NucleusTable, tmp_path: Path,
                                                            local) -> None:
    write(table, tmp_path)
    written = features(local, str(tmp_path / "nuclei.geojson.gz"))
    names = {"Area µm^2", "Perimeter µm", "Solidity", "Eccentricity", "Class probability",
             "Detection probability"}
    for feature in written:
        measurements = feature["properties"]["measurements"]
        assert set(measurements) <= names
        for value in measurements.values():
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert math.isfinite(value)
    assert set(written[0]["properties"]["measurements"]) == (
        names - {"Eccentricity"})  # row 0 has a NaN eccentricity
    assert set(written[1]["properties"]["measurements"]) == names
    assert written[1]["properties"]["measurements"]["Detection probability"] == 0.875
    assert written[0]["properties"]["measurements"]["Area µm^2"] == 20.0


def test_table_measurements_are_written_verbatim_and_replace_ours(tmp_path: Path,
                                                                  local) -> None:
    nuclei = make_table([SQUARE, HEXAGON], [1, 0], nan_eccentricity_row=None)
    nuclei.measurements = {"Nucleus: Area µm^2": np.array([100.0, 7.5], np.float32),
                           "Nucleus: Hematoxylin OD mean": np.array([0.25, np.nan], np.float32)}
    write(nuclei, tmp_path)
    first, second = features(local, str(tmp_path / "nuclei.geojson.gz"))

    assert list(first["properties"]["measurements"]) == [
        "Nucleus: Area µm^2", "Nucleus: Hematoxylin OD mean", "Perimeter µm", "Solidity",
        "Eccentricity", "Class probability", "Detection probability"]
    assert first["properties"]["measurements"]["Nucleus: Area µm^2"] == 100.0
    assert "Nucleus: Hematoxylin OD mean" not in second["properties"]["measurements"]
    write(nuclei, tmp_path / "some", measurements=["Detection probability",
                                                   "Nucleus: Area µm^2"])
    (chosen, _) = features(local, str(tmp_path / "some" / "nuclei.geojson.gz"))
    assert list(chosen["properties"]["measurements"]) == ["Detection probability",
                                                          "Nucleus: Area µm^2"]
    with pytest.raises(ValueError, match="unknown measurement"):
        write(nuclei, tmp_path / "bad", measurements=["Nucleus: Colour"])


def test_cells_carry_the_nucleus_as_nucleus_geometry(tmp_path: Path, local) -> None:
    nuclei = make_table([square(100, 100), square(200, 100)], [1, 0])
    cells = [square(95, 95, 20), [(190, 90), (220, 90), (205, 90)]]  # the second is degenerate
    nuclei.cell_vertices = np.concatenate([np.asarray(c, np.float32) for c in cells])
    nuclei.cell_offsets = np.array([0, 4, 7], np.int64)
    written = write(nuclei, tmp_path)
    first, second = features(local, str(tmp_path / "nuclei.geojson.gz"))

    assert written.total == 2
    assert first["properties"]["objectType"] == "cell"
    assert shapely.geometry.shape(first["geometry"]).area == 400.0
    assert shapely.geometry.shape(first["nucleusGeometry"]).area == 100.0
    # A cell boundary that cannot be written falls back to the nucleus outline.
    assert second["geometry"] == second["nucleusGeometry"]
    assert_qupath_accepts(str(tmp_path / "nuclei.geojson.gz"))
    detections = write(nuclei, tmp_path / "detections", objects="detections")
    assert detections.total == 2
    only = features(local, str(tmp_path / "detections" / "nuclei.geojson.gz"))
    assert {f["properties"]["objectType"] for f in only} == {"detection"}
    with pytest.raises(ValueError, match="cell boundaries"):
        write(make_table([SQUARE], [1]), tmp_path / "none", objects="cells")


def test_ids_are_stable_uuids(table: NucleusTable, tmp_path: Path, local) -> None:
    write(table, tmp_path / "a")
    write(table, tmp_path / "b")
    first = [f["id"] for f in features(local, str(tmp_path / "a" / "nuclei.geojson.gz"))]
    second = [f["id"] for f in features(local, str(tmp_path / "b" / "nuclei.geojson.gz"))]

    assert first == second and len(set(first)) == len(first)
    assert all(uuid.UUID(i).version == 5 and str(uuid.UUID(i)) == i for i in first)
    assert (tmp_path / "a" / "nuclei.geojson.gz").read_bytes() == (
        tmp_path / "b" / "nuclei.geojson.gz").read_bytes()
    assert nucleus_ids("another slide", [0]) != nucleus_ids(SEED, [0])


def test_run_key_changes_with_everything_that_changes_the_nuclei() -> None:
    full = {"roi": None, "mpp": None, "region_size": 2048, "tissue": "auto", "halo_um": 8.0}
    key = run_key(SEED, CARD, full)

    # The same job again, with other workers or batch sizes: the same key.
    assert run_key(SEED, CARD, {**full, "batch_size": 2, "workers": 1, "job": "x"}) == key
    others = [
        run_key("another slide", CARD, full),
        run_key(SEED, CARD, {**full, "roi": [0, 0, 500, 500]}),
        run_key(SEED, CARD, {**full, "mpp": 0.5}),
        run_key(SEED, CARD, {**full, "region_size": 1024}),
        run_key(SEED, CARD, {**full, "tissue": "none"}),
        run_key(SEED, CARD.model_copy(update={"version": "2"}), full),
        run_key(SEED, CARD.model_copy(update={"postprocess": {"np_threshold": 0.6}}), full),
    ]
    assert len({key, *others}) == len(others) + 1
    assert not set(nucleus_ids(key, range(100))) & set(nucleus_ids(others[1], range(100)))


def test_large_outputs_are_one_zip_of_entries_under_the_budget(tmp_path: Path) -> None:
    many = make_table([square(20 + 12 * (i % 150), 20 + 12 * (i // 150)) for i in range(900)],
                      [i % 4 for i in range(900)])
    # Leave a one-file output of an earlier run behind: it must go.
    write(many.take(np.arange(3)), tmp_path)
    written = write(many, tmp_path, entry_bytes=60_000)

    assert written.names == ["nuclei.zip", "nuclei-index.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei-index.json", "nuclei.zip"]
    entries = zip_features(tmp_path / "nuclei.zip")
    names = [f"nuclei-{i:03d}.geojson" for i in range(1, len(entries) + 1)]
    assert list(entries) == names and len(names) > 3
    with zipfile.ZipFile(tmp_path / "nuclei.zip") as archive:
        infos = archive.infolist()
    assert all(i.compress_type == zipfile.ZIP_DEFLATED and i.file_size < 60_000 for i in infos)
    assert all(i.file_size > 40_000 for i in infos[:-1])  # the bound is not too loose
    assert [written.entries] == [[(n, len(entries[n])) for n in names]]
    ids = [f["id"] for n in names for f in entries[n]]
    assert ids == nucleus_ids(SEED, range(900))
    index = json.loads((tmp_path / "nuclei-index.json").read_text())
    assert index["file"] == "nuclei.zip" and index["total"] == 900
    assert index["entries"] == [{"name": n, "count": len(entries[n])} for n in names]
    assert_qupath_accepts(str(tmp_path / "nuclei.zip"))

    # A re-run that fits in one file leaves neither the zip nor the index behind.
    assert write(many, tmp_path).names == ["nuclei.geojson.gz"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.geojson.gz"]


def test_empty_table_writes_an_empty_collection(tmp_path: Path, local) -> None:
    write(NucleusTable(), tmp_path)

    assert features(local, str(tmp_path / "nuclei.geojson.gz")) == []
    assert "n=0 " in run_checker(str(tmp_path / "nuclei.geojson.gz"))


def test_geojson_rejects_bad_arguments(table: NucleusTable, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="entry_bytes"):
        write(table, tmp_path, entry_bytes=0)
    with pytest.raises(ValueError, match="objects"):
        write(table, tmp_path, objects="annotations")
    with pytest.raises(ValueError, match="slide_shape"):
        clean_polygons(table, slide_shape=(0, 100))
    with pytest.raises(ValueError, match="types span"):
        write(make_table([SQUARE], [7]), tmp_path)
    with pytest.raises(ValueError, match="ids"):
        write(table, tmp_path, ids=["x"])
    with pytest.raises(TypeError, match="fsspec"):
        write_geojson(table, fs=str(tmp_path), root=str(tmp_path), classes=CLASSES, seed=SEED,
                      slide_shape=SLIDE_SHAPE)
    with pytest.raises(ValueError, match="seed"):
        nucleus_ids("", [0])


# --------------------------------------------------------------------------------- counts


def test_counts_cover_every_class_with_densities(table: NucleusTable, tmp_path: Path,
                                                 local) -> None:
    name = write_counts(table, fs=local, root=str(tmp_path), classes=CLASSES,
                        tissue_area_mm2=0.5, analysed_area_mm2=0.75)
    counts = json.loads((tmp_path / name).read_text())

    assert counts["classes"] == {"Tumour": 4, "Lymphocyte": 3, "Stroma": 0}
    assert counts["total"] == 7 and counts["unclassified"] == 0
    assert counts["tissue_area_mm2"] == 0.5 and counts["analysed_area_mm2"] == 0.75
    assert counts["density_per_mm2"] == {"Tumour": 8.0, "Lymphocyte": 6.0, "Stroma": 0.0,
                                         "unclassified": 0.0, "total": 14.0}


def test_counts_of_an_untyped_model_are_all_unclassified(table: NucleusTable, tmp_path: Path,
                                                         local) -> None:
    write_counts(table, fs=local, root=str(tmp_path), classes=(), tissue_area_mm2=0.0)
    text = (tmp_path / "counts.json").read_text()
    counts = json.loads(text)

    assert "null" not in text and "NaN" not in text
    assert counts["classes"] == {} and counts["unclassified"] == 7 and counts["total"] == 7
    assert counts["density_per_mm2"] == {"unclassified": 0.0, "total": 0.0}
    assert "analysed_area_mm2" not in counts
    with pytest.raises(ValueError, match="tissue_area_mm2"):
        write_counts(table, fs=local, root=str(tmp_path), classes=(), tissue_area_mm2=math.nan)


# --------------------------------------------------------------------------------- zarr


def assert_tables_equal(actual: NucleusTable, expected: NucleusTable) -> None:
    for name in ("centroid", "bbox", "area_um2", "perimeter_um", "solidity", "eccentricity",
                 "type", "type_prob", "np_prob", "vertices", "offsets", "region"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert got.dtype == want.dtype, name
        np.testing.assert_array_equal(got, want, err_msg=name)
    assert list(actual.measurements) == list(expected.measurements)
    for name, values in expected.measurements.items():
        np.testing.assert_array_equal(actual.measurements[name], values, err_msg=name)
    for name in ("cell_vertices", "cell_offsets"):
        got, want = getattr(actual, name), getattr(expected, name)
        assert (got is None) == (want is None), name
        if want is not None:
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_zarr_round_trip(table: NucleusTable, tmp_path: Path, local) -> None:
    names = write_table(table, fs=local, root=str(tmp_path), classes=CLASSES, mpp=MPP,
                        slide_shape=SLIDE_SHAPE, seed=SEED, chunk_rows=4)

    assert names == ["nuclei.zarr.zip"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.zarr.zip"]
    assert_tables_equal(read_table(local, str(tmp_path)), table)
    group = open_zarr(tmp_path / "nuclei.zarr.zip")
    assert group.metadata.zarr_format == 3
    assert group["id"][...].tolist() == nucleus_ids(SEED, range(len(table)))
    assert group["centroid"].chunks == (4, 2)
    assert group.attrs["mpp"] == MPP and group.attrs["slide_shape"] == list(SLIDE_SHAPE)
    assert group.attrs["classes"][1] == {"index": 1, "name": "Tumour", "colour": [255, 0, 0]}
    assert group.attrs["units"]["area_um2"] == "µm^2"
    assert group.attrs["unclassified"] == "unclassified" and group.attrs["n"] == len(table)
    assert group.attrs["ids"]["key"] == SEED and group.attrs["measurements"] == []


def test_zarr_keeps_measurements_and_cells_and_reads_rows(tmp_path: Path, memory) -> None:
    fs, root = memory
    nuclei = make_table([square(10 * i, 10, 5 + i) for i in range(9)], [1, 0, 2] * 3)
    nuclei.measurements = {"Nucleus: Area µm^2": np.arange(9, dtype=np.float32),
                           "Nucleus: Eosin OD mean": np.full(9, np.nan, np.float32)}
    nuclei.cell_vertices = nuclei.vertices * 1.5
    nuclei.cell_offsets = nuclei.offsets.copy()
    write_table(nuclei, fs=fs, root=root, classes=CLASSES, mpp=MPP, slide_shape=SLIDE_SHAPE,
                seed=SEED, chunk_rows=4)

    assert_tables_equal(read_table(fs, root), nuclei)
    with open_table(fs, f"{root}/nuclei.zarr.zip") as reader:
        assert len(reader) == 9 and reader.has_cells
        assert reader.measurement_names == list(nuclei.measurements)
        assert reader.slide_shape == SLIDE_SHAPE and reader.classes == list(CLASSES)
        part, ids = reader.rows(3, 7)
        assert_tables_equal(part, nuclei.take(np.arange(3, 7)))
        assert ids == nucleus_ids(SEED, range(3, 7))
        assert sum(len(t) for t, _ in reader.chunks(4)()) == 9


def test_zarr_round_trip_of_an_empty_table(tmp_path: Path, local) -> None:
    write_table(NucleusTable(), fs=local, root=str(tmp_path), classes=CLASSES, mpp=MPP,
                slide_shape=SLIDE_SHAPE, seed=SEED)

    assert len(read_table(local, str(tmp_path))) == 0
    grid = open_zarr(tmp_path / "nuclei.zarr.zip")["count_grid"][...]
    assert grid.shape == (4, 5, 10) and not grid.any()


def test_reading_what_is_not_a_table_fails_clearly(tmp_path: Path, local) -> None:
    (tmp_path / "nuclei.zarr.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="zip"):
        read_table(local, str(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_table(local, str(tmp_path / "nowhere"))


def test_count_grid_counts_every_nucleus_by_centroid(tmp_path: Path, local) -> None:
    nuclei = make_table(POLYGONS, [1, 2, 0, 1, 2, 0, 1])
    write_table(nuclei, fs=local, root=str(tmp_path), classes=CLASSES, mpp=MPP,
                slide_shape=SLIDE_SHAPE, seed=SEED, grid_um=100.0, chunk_rows=3)
    array = open_zarr(tmp_path / "nuclei.zarr.zip")["count_grid"]
    grid = array[...]

    # 100 µm at 0.5 µm/px = 200 px cells over 1000 × 2000 px: 5 rows, 10 columns; the three
    # classes, then unclassified: the grid holds every nucleus.
    assert grid.dtype == np.uint32 and grid.shape == (4, 5, 10)
    assert grid.sum(axis=(1, 2)).tolist() == [3, 2, 0, 2] and int(grid.sum()) == len(nuclei)
    assert grid[0, 4, 7] == 1  # the hexagon, centroid (1510, 805): Tumour, row 4, column 7
    assert grid[3, 3, 9] == 1  # across the edge, centroid (2000, 610): clamped into column 9
    assert array.attrs["cell_px"] == 200.0 and array.attrs["cell_um"] == 100.0
    assert array.attrs["origin_px"] == [0.0, 0.0]
    assert array.attrs["classes"] == ["Tumour", "Lymphocyte", "Stroma", "unclassified"]
    assert array.attrs["class_index"] == [1, 2, 3, 0]


def test_count_grid_of_an_untyped_model_has_one_unclassified_plane(table: NucleusTable) -> None:
    grid, cell_px = count_grid(table, classes=(), mpp=0.25, slide_shape=SLIDE_SHAPE,
                               grid_um=50.0)

    assert grid.shape == (1, 5, 10) and cell_px == 200.0
    assert int(grid.sum()) == len(table)


# --------------------------------------------------------------------------------- overlay


def test_overlay_draws_class_colours_at_nuclei(tmp_path: Path, local) -> None:
    big = square(400, 200, 40)  # 10 thumbnail px across at downsample 4
    tiny = square(1200, 600, 6)  # 1.5 thumbnail px: a dot
    nuclei = make_table([big, tiny], [1, 2])
    thumbnail = np.full((250, 500, 3), 255, np.uint8)
    image = draw_overlay(thumbnail, nuclei, downsample=4.0, classes=CLASSES, legend=False)

    assert image.shape == thumbnail.shape and image.dtype == np.uint8
    assert (thumbnail == 255).all()  # the input is not modified
    assert image[50, 105].tolist() == [255, 0, 0]  # top edge of the big square (y 200 / 4)
    assert image[55, 110].tolist() == [255, 0, 0]  # right edge (x 440 / 4)
    assert image[55, 105].tolist() == [255, 255, 255]  # outlined, not filled
    assert image[150, 300].tolist() == [0, 128, 255]  # the tiny one's dot at (1203, 603) / 4
    drawn = np.any(image != 255, axis=2)
    assert drawn.sum() == 40 + 9  # the square's outline and one 3×3 dot, nothing else

    name = write_overlay(thumbnail, nuclei, fs=local, root=str(tmp_path), downsample=4.0,
                         classes=CLASSES, legend=False)
    png = cv2.imdecode(np.frombuffer((tmp_path / name).read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(cv2.cvtColor(png, cv2.COLOR_BGR2RGB), image)


def test_overlay_legend_shows_every_class_and_unclassified(table: NucleusTable) -> None:
    image = draw_overlay(np.full((300, 500, 3), 255, np.uint8), make_table([], []),
                         downsample=4.0, classes=CLASSES)
    corner = image[:100, :160].reshape(-1, 3).tolist()

    for cls in (*CLASSES[1:], UNCLASSIFIED):
        assert list(cls.colour) in corner
    with pytest.raises(TypeError, match="uint8"):
        draw_overlay(np.zeros((10, 10, 3), np.float32), table, downsample=1.0, classes=CLASSES)
    with pytest.raises(ValueError, match="downsample"):
        draw_overlay(np.zeros((10, 10, 3), np.uint8), table, downsample=0.0, classes=CLASSES)


def test_unclassified_colour_is_far_from_every_bundled_class_colour() -> None:
    from models.card import read_card
    from models.zoo import list_models

    colours = {c.colour for path in list_models() for c in read_card(path).classes[1:]}
    colours |= {c.colour for c in CLASSES[1:]}
    grey = np.asarray(UNCLASSIFIED.colour, float)
    assert colours and min(np.linalg.norm(grey - np.asarray(c, float)) for c in colours) > 120


def test_unclassified_nuclei_are_drawn_in_their_own_colour() -> None:
    nuclei = make_table([square(400, 200, 40)], [0])
    image = draw_overlay(np.full((250, 500, 3), 255, np.uint8), nuclei, downsample=4.0,
                         classes=CLASSES, legend=False)
    assert image[50, 105].tolist() == list(UNCLASSIFIED.colour)


# --------------------------------------------------------------------------------- manifest


def test_file_sha256_streams_any_filesystem(tmp_path: Path, local, memory) -> None:
    data = bytes(range(256)) * 1000
    (tmp_path / "slide.svs").write_bytes(data)
    fs, root = memory
    fs.pipe_file(f"{root}/slide.svs", data)
    expected = hashlib.sha256(data).hexdigest()

    assert file_sha256(local, str(tmp_path / "slide.svs"), block_size=4096) == expected
    assert file_sha256(fs, f"{root}/slide.svs") == expected


def test_manifest_sections_are_strict_json(tmp_path: Path, local) -> None:
    name = write_manifest(fs=local, root=str(tmp_path), model=CARD,
                          parameters={"tile": np.int64(256), "path": tmp_path, "x": math.nan})
    manifest = json.loads((tmp_path / name).read_text(),
                          parse_constant=lambda c: pytest.fail(f"{c} in manifest"))

    assert manifest["model"]["name"] == "test-model"
    assert manifest["parameters"] == {"tile": 256, "path": str(tmp_path), "x": None}
    assert manifest["software"]["numpy"] == np.__version__
    assert "python" in manifest["software"] and "created" in manifest


# --------------------------------------------------------------------------------- write_all


def run_write_all(table: NucleusTable, fs: fsspec.AbstractFileSystem, root: str,
                  **options: Any) -> dict[str, str]:
    thumbnail = np.full((250, 500, 3), 240, np.uint8)
    slide = SlideIdentity(name="slide.svs", format="aperio", shape=SLIDE_SHAPE, mpp=MPP, levels=1,
                          sha256=SEED)
    parameters = options.pop("parameters", {"batch_size": 8})
    return write_all(table, fs=fs, root=root, card=CARD, slide=slide,
                     thumbnail=thumbnail, thumbnail_downsample=4.0, tissue_area_mm2=0.5,
                     parameters=parameters, timings={"infer": 1.5}, **options)


def test_write_all_writes_every_output(table: NucleusTable, tmp_path: Path, local) -> None:
    outputs = run_write_all(table, local, str(tmp_path))

    assert set(outputs) == {"nuclei.geojson.gz", "counts.json", "nuclei.zarr.zip",
                            "overlay.png", "manifest.json"}
    assert all(local.exists(path) for path in outputs.values())
    assert_qupath_accepts(outputs["nuclei.geojson.gz"])
    manifest = json.loads(Path(outputs["manifest.json"]).read_text())
    assert manifest["model"]["classes"][1]["name"] == "Tumour"
    assert manifest["slide"]["sha256"] == SEED and manifest["parameters"]["batch_size"] == 8
    assert manifest["timings"]["infer"] == 1.5 and "write_geojson" in manifest["timings"]
    assert manifest["nuclei"]["total"] == 7 and manifest["nuclei"]["geojson"] == {
        "written": 6, "repaired": 2, "dropped": 1, "file": "nuclei.geojson.gz", "entries": 1}
    # The ids derive from the run key recorded as the seed, the same in GeoJSON and zarr.
    key = manifest["nuclei"]["seed"]
    assert key == run_key(SEED, CARD, {"batch_size": 8}) and manifest["nuclei"]["slide_seed"] == SEED
    ids = nucleus_ids(key, range(len(table)))
    assert [f["id"] for f in features(local, outputs["nuclei.geojson.gz"])] == [
        ids[r] for r in (0, 1, 3, 4, 5, 6)]
    assert open_zarr(tmp_path / "nuclei.zarr.zip")["id"][...].tolist() == ids
    sizes = {o["name"]: o["bytes"] for o in manifest["outputs"]}
    assert sizes["counts.json"] == local.size(outputs["counts.json"])
    assert sizes["nuclei.zarr.zip"] == local.size(outputs["nuclei.zarr.zip"]) > 0


def test_roi_and_full_runs_share_no_id(table: NucleusTable, tmp_path: Path, local) -> None:
    full = run_write_all(table, local, str(tmp_path / "full"), parameters={"roi": None})
    roi = run_write_all(table.take(np.array([6, 4, 0])), local, str(tmp_path / "roi"),
                        parameters={"roi": [0, 0, 1600, 1000]})
    again = run_write_all(table, local, str(tmp_path / "again"), parameters={"roi": None})

    def ids(outputs: dict[str, str]) -> list[str]:
        return [f["id"] for f in features(local, outputs["nuclei.geojson.gz"])]

    assert not set(ids(full)) & set(ids(roi))
    assert ids(again) == ids(full)


def test_write_all_to_a_memory_filesystem_in_several_entries(table: NucleusTable,
                                                             memory) -> None:
    fs, root = memory
    outputs = run_write_all(table, fs, root, entry_bytes=2_000)

    assert outputs["nuclei.zip"] == f"{root}/nuclei.zip" and "nuclei-index.json" in outputs
    index = json.loads(fs.cat(outputs["nuclei-index.json"]))
    assert index["total"] == 6 and len(index["entries"]) > 1
    assert json.loads(fs.cat(outputs["counts.json"]))["classes"]["Tumour"] == 4
    assert_tables_equal(read_table(fs, root), table)
    assert fs.cat(outputs["overlay.png"])[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(fs.cat(outputs["manifest.json"]))["nuclei"]["total"] == 7


def manifest_slide() -> SlideIdentity:
    return SlideIdentity(name="slide.svs", format="aperio", shape=SLIDE_SHAPE, mpp=MPP, levels=1,
                         sha256=SEED)


def test_write_all_derives_the_run_key_from_the_slide_hash(table: NucleusTable, tmp_path: Path,
                                                           local) -> None:
    outputs = run_write_all(table, local, str(tmp_path), parameters={"roi": None})
    manifest = json.loads(Path(outputs["manifest.json"]).read_text())
    assert manifest["nuclei"]["slide_seed"] == SEED
    assert manifest["nuclei"]["seed"] == run_key(SEED, CARD, {"roi": None})
    nameless = dataclasses.replace(manifest_slide(), sha256=None)
    assert nameless.seed == "slide.svs"  # a slide that is not one local file: its name
