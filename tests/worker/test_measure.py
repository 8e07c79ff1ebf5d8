"""QuPath measurements: exact names, shape definitions on hand-made polygons, per-object intensity
statistics, and the end-to-end rule that a nucleus' area is the area of the polygon written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import fsspec
import numpy as np
import pytest

from tests._synthetic import build_oracle, oracle_card
from worker.measure import (
    CLASS_PROBABILITY,
    DETECTION_PROBABILITY,
    intensity_measurements,
    nucleus_measurement_names,
    polygon_shapes,
    shape_measurements,
)

CMU1 = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _rings(*rings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rings])]).astype(np.int64)
    return np.concatenate(rings).astype(np.float64), offsets


def _ellipse(a: float, b: float, n: int = 1000, centre: tuple[float, float] = (0.0, 0.0),
             angle: float = 0.0) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x, y = a * np.cos(t), b * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.c_[c * x - s * y + centre[0], s * x + c * y + centre[1]]


def test_names_are_qupath_cell_detection_names_with_micro_sign_and_caret() -> None:
    names = nucleus_measurement_names(typed=True, cells=False)
    assert names == [
        "Nucleus: Area µm^2", "Nucleus: Perimeter µm", "Nucleus: Circularity",
        "Nucleus: Max caliper µm", "Nucleus: Min caliper µm", "Nucleus: Eccentricity",
        "Nucleus: Hematoxylin OD mean", "Nucleus: Hematoxylin OD sum",
        "Nucleus: Hematoxylin OD std dev", "Nucleus: Hematoxylin OD max",
        "Nucleus: Hematoxylin OD min", "Nucleus: Eosin OD mean",
        "Detection probability", "Class probability",
    ]
    assert "\u00b5m^2" in names[0] and "\u03bc" not in names[0]  # MICRO SIGN, not Greek mu
    cells = nucleus_measurement_names(typed=False, cells=True)
    assert CLASS_PROBABILITY not in cells and cells[-1] == DETECTION_PROBABILITY
    for expected in ("Cell: Area µm^2", "Cell: Min caliper µm", "Cell: Hematoxylin OD std dev",
                     "Cytoplasm: Hematoxylin OD mean", "Cytoplasm: Eosin OD mean",
                     "Nucleus/Cell area ratio"):
        assert expected in cells


def test_square_has_exact_area_perimeter_calipers_and_no_eccentricity() -> None:
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    shapes = polygon_shapes(*_rings(square), scale=0.5)
    assert shapes["area"][0] == pytest.approx(25.0)
    assert shapes["perimeter"][0] == pytest.approx(20.0)
    assert shapes["circularity"][0] == pytest.approx(math.pi / 4, rel=1e-6)
    assert shapes["max_caliper"][0] == pytest.approx(5 * math.sqrt(2), rel=1e-6)
    assert shapes["min_caliper"][0] == pytest.approx(5.0, rel=1e-6)
    assert shapes["eccentricity"][0] == pytest.approx(0.0, abs=1e-6)


def test_disk_is_circular_with_equal_calipers_far_from_the_origin() -> None:
    # Level-0 coordinates reach 1e5 px: the moments must not lose their digits there.
    disk = _ellipse(8.0, 8.0, centre=(98_765.0, 54_321.0))
    shapes = polygon_shapes(*_rings(disk), scale=0.25)
    assert shapes["area"][0] == pytest.approx(math.pi * 2.0**2, rel=1e-5)
    assert shapes["circularity"][0] == pytest.approx(1.0, abs=1e-5)
    assert shapes["max_caliper"][0] == pytest.approx(4.0, rel=1e-5)
    assert shapes["min_caliper"][0] == pytest.approx(4.0, rel=1e-5)
    assert shapes["eccentricity"][0] < 1e-3


def test_rotated_rectangle_and_ellipse_eccentricity_follow_their_axes() -> None:
    c, s = math.cos(0.5), math.sin(0.5)
    rect = np.array([[0, 0], [4, 0], [4, 2], [0, 2]], float) @ np.array([[c, s], [-s, c]])
    ellipse = _ellipse(6.0, 3.0, angle=1.1)
    shapes = polygon_shapes(*_rings(rect, ellipse))
    assert shapes["min_caliper"][0] == pytest.approx(2.0, rel=1e-6)
    assert shapes["max_caliper"][0] == pytest.approx(math.sqrt(20.0), rel=1e-6)
    # Second moments a²/12 and b²/12: the same axis ratio as an ellipse of those axes.
    assert shapes["eccentricity"][0] == pytest.approx(math.sqrt(1 - 0.25), rel=1e-6)
    assert shapes["eccentricity"][1] == pytest.approx(math.sqrt(1 - 0.25), rel=1e-4)
    assert shapes["min_caliper"][1] == pytest.approx(6.0, rel=1e-4)
    assert shapes["max_caliper"][1] == pytest.approx(12.0, rel=1e-4)


def test_degenerate_rings_get_nan_where_an_area_is_needed() -> None:
    line = np.array([[0, 0], [3, 4]], float)
    square = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], float)
    shapes = polygon_shapes(*_rings(line, square))
    assert shapes["area"][0] == 0 and math.isnan(shapes["circularity"][0])
    assert math.isnan(shapes["eccentricity"][0]) and shapes["max_caliper"][0] == pytest.approx(4)
    assert shapes["area"][1] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="offsets"):
        polygon_shapes(square, np.array([0, 3]))


def test_shape_measurements_carry_the_prefix_and_units() -> None:
    square = np.array([[0, 0], [10, 0], [10, 10], [0, 10]], float)
    out = shape_measurements(*_rings(square), mpp=0.5, prefix="Cell: ")
    assert list(out) == ["Cell: Area µm^2", "Cell: Perimeter µm", "Cell: Circularity",
                         "Cell: Max caliper µm", "Cell: Min caliper µm", "Cell: Eccentricity"]
    assert out["Cell: Area µm^2"][0] == pytest.approx(25.0)


def test_intensity_statistics_per_label_match_numpy() -> None:
    rng = np.random.default_rng(3)
    labels = np.zeros((20, 20), np.int32)
    labels[2:8, 3:9] = 1
    labels[10:15, 10:18] = 4
    labels[18, 18] = 5  # one pixel: no standard deviation
    h = rng.random((20, 20)).astype(np.float32)
    e = rng.random((20, 20)).astype(np.float32)
    stats = {"Hematoxylin": ("mean", "sum", "std dev", "max", "min"), "Eosin": ("mean",)}
    out = intensity_measurements(labels, np.array([4, 1, 5, 7]), {"Hematoxylin": h, "Eosin": e},
                                 stats, "Nucleus: ")
    assert list(out) == ["Nucleus: Hematoxylin OD mean", "Nucleus: Hematoxylin OD sum",
                         "Nucleus: Hematoxylin OD std dev", "Nucleus: Hematoxylin OD max",
                         "Nucleus: Hematoxylin OD min", "Nucleus: Eosin OD mean"]
    for row, label in enumerate([4, 1]):
        px = h[labels == label].astype(np.float64)
        assert out["Nucleus: Hematoxylin OD mean"][row] == pytest.approx(px.mean(), rel=1e-5)
        assert out["Nucleus: Hematoxylin OD sum"][row] == pytest.approx(px.sum(), rel=1e-5)
        assert out["Nucleus: Hematoxylin OD std dev"][row] == pytest.approx(px.std(ddof=1), rel=1e-4)
        assert out["Nucleus: Hematoxylin OD max"][row] == pytest.approx(px.max())
        assert out["Nucleus: Hematoxylin OD min"][row] == pytest.approx(px.min())
        assert out["Nucleus: Eosin OD mean"][row] == pytest.approx(e[labels == label].mean(), rel=1e-5)
    assert math.isnan(out["Nucleus: Hematoxylin OD std dev"][2])
    assert out["Nucleus: Hematoxylin OD mean"][2] == pytest.approx(h[18, 18])
    assert all(math.isnan(v[3]) for v in out.values())  # label 7 is absent
    with pytest.raises(ValueError, match="no channel"):
        intensity_measurements(labels, np.array([1]), {"Eosin": e}, stats, "Nucleus: ")


def test_labels_on_a_finer_grid_read_the_channel_pixel_beneath() -> None:
    rng = np.random.default_rng(5)
    coarse = rng.random((6, 8)).astype(np.float32)
    labels = np.zeros((12, 16), np.int32)
    labels[1:6, 2:9] = 1
    labels[7:12, 9:15] = 2
    stats = {"Hematoxylin": ("mean", "sum", "std dev", "max", "min")}
    fine = np.repeat(np.repeat(coarse, 2, axis=0), 2, axis=1)
    expected = intensity_measurements(labels, np.array([2, 1]), {"Hematoxylin": fine}, stats, "")
    got = intensity_measurements(labels, np.array([2, 1]), {"Hematoxylin": coarse}, stats, "",
                                 factor=2)
    for key, values in expected.items():
        np.testing.assert_allclose(got[key], values, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        intensity_measurements(labels, np.array([1]), {"Hematoxylin": fine}, stats, "", factor=2)


@pytest.mark.slow
@pytest.mark.parametrize("objects", ["detections", "cells"])
def test_cmu_area_is_the_written_polygon_area(tmp_path: Path, objects: str) -> None:
    """On a real H&E ROI, every nucleus' "Nucleus: Area µm^2" is its table polygon's area × mpp²."""
    import shapely

    from worker.pipeline import InferenceOptions, run_slide

    model = build_oracle(tmp_path / "oracle.onnx", oracle_card(mpp=0.5))
    options = InferenceOptions(model=model, roi=(600, 800, 480, 400), region_size=512, workers=0,
                               tissue="none", objects=objects)  # type: ignore[arg-type]
    fs, root = fsspec.url_to_fs(str(tmp_path / "out"))
    result = run_slide(CMU1, fs=fs, root=root, options=options)
    table = result.table
    assert len(table) > 10
    # CMU-1 is H&E: the estimate succeeds, is recorded in the manifest and is what was used.
    assert result.plan.stains.source == "macenko"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["parameters"]["stain_vectors"] == result.plan.stains.to_dict()
    assert manifest["parameters"]["objects"] == objects
    assert list(table.measurements) == nucleus_measurement_names(
        typed=result.card.typed, cells=objects == "cells")
    mpp = 0.499  # CMU-1-Small-Region's level-0 µm/px
    polygons = [shapely.Polygon(table.polygon(i)) for i in range(len(table))]
    expected = np.array([p.area for p in polygons]) * mpp * mpp
    np.testing.assert_allclose(table.measurements["Nucleus: Area µm^2"], expected, rtol=0.01)
    hem = table.measurements["Nucleus: Hematoxylin OD mean"]
    assert np.isfinite(hem).all() and (hem > 0).all()
    if objects == "cells":
        assert table.has_cells
        ratio = table.measurements["Nucleus/Cell area ratio"]
        assert ((ratio > 0) & (ratio <= 1)).all()
        cells = [shapely.Polygon(table.cell_polygon(i)) for i in range(len(table))]
        cell_area = np.array([c.area for c in cells]) * mpp * mpp
        np.testing.assert_allclose(table.measurements["Cell: Area µm^2"], cell_area, rtol=0.01)
        assert all(c.buffer(1e-6).contains(p) for c, p in zip(cells, polygons, strict=True))


@pytest.mark.slow
def test_every_written_nucleus_area_is_its_geojson_polygon_area(tmp_path: Path) -> None:
    """The whole of CMU-1-Small-Region: for every feature QuPath would import, the area measurement
    is the area of the polygon in the file × mpp² (within 1 %)."""
    import gzip

    import shapely

    from worker.pipeline import InferenceOptions, run_slide

    model = build_oracle(tmp_path / "oracle.onnx", oracle_card(mpp=0.5))
    fs, root = fsspec.url_to_fs(str(tmp_path / "out"))
    run_slide(CMU1, fs=fs, root=root, options=InferenceOptions(model=model, workers=0))
    with gzip.open(tmp_path / "out" / "nuclei.geojson.gz", "rt") as fh:
        features = json.load(fh)["features"]
    assert len(features) > 500
    mpp = 0.499
    areas = np.array([shapely.geometry.shape(f["geometry"]).area for f in features]) * mpp * mpp
    written = np.array([f["properties"]["measurements"]["Nucleus: Area µm^2"] for f in features])
    np.testing.assert_allclose(written, areas, rtol=0.01)
