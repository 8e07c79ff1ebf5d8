"""The nuclei index: a box query returns exactly the GeoJSON's nuclei whose centroid is inside,
reading only the buckets the box overlaps."""

from __future__ import annotations

import gzip
import io
import json
import uuid
import zipfile

import fsspec
import numpy as np
import pytest
import shapely.geometry

from worker.nuclei_index import (
    CELL_PX,
    INDEX_DIR,
    build_index,
    build_index_from_results,
    index_exists,
    iter_features,
    open_index,
)

SHAPE = (3000, 4000)  # height, width
MPP = 0.5
CLASSES = [{"name": "Tumour", "colour": [255, 0, 0]}, {"name": "Immune", "colour": [0, 200, 0]},
           {"name": "Stroma", "colour": [0, 0, 255]}]  # Stroma: no nucleus has it


def _features(n: int, seed: int = 1) -> list[dict]:
    """``n`` hexagonal nuclei at random places (some across the slide's edges); every fifth is
    unclassified, one is a MultiPolygon."""
    rng = np.random.default_rng(seed)
    out = []
    angles = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    for i in range(n):
        cx, cy = rng.uniform(-5, SHAPE[1] + 5), rng.uniform(-5, SHAPE[0] + 5)
        r = rng.uniform(3, 9)
        ring = [[round(cx + r * np.cos(a), 2), round(cy + r * np.sin(a), 2)] for a in angles]
        ring.append(ring[0])
        properties: dict = {"objectType": "detection",
                            "measurements": {"Area µm^2": round(float(rng.uniform(10, 80)), 4)}}
        if i % 5:
            cls = CLASSES[i % 2]
            properties["classification"] = {"name": cls["name"], "color": cls["colour"]}
        geometry = {"type": "Polygon", "coordinates": [ring]}
        if i == 3:
            geometry = {"type": "MultiPolygon", "coordinates": [[ring]]}
        out.append({"type": "Feature", "id": str(uuid.UUID(int=i)), "geometry": geometry,
                    "properties": properties})
    return out


def _collection(features: list[dict], *, pretty: bool = False) -> bytes:
    body = {"type": "FeatureCollection", "features": features}
    return json.dumps(body, indent=2 if pretty else None, ensure_ascii=False).encode()


_CENTROIDS: dict[str, tuple[float, float]] = {}


def _centroid(feature: dict) -> tuple[float, float]:
    """The polygon's centroid (GEOS), remembered by geometry."""
    key = json.dumps(feature["geometry"])
    if key not in _CENTROIDS:
        point = shapely.geometry.shape(feature["geometry"]).centroid
        _CENTROIDS[key] = (point.x, point.y)
    return _CENTROIDS[key]


def _inside(features: list[dict], box: tuple[float, float, float, float]) -> dict[str, dict]:
    """The features whose polygon centroid lies in the half-open box, by id."""
    x0, y0, x1, y1 = box
    out = {}
    for f in features:
        x, y = _centroid(f)
        if x0 <= x < x1 and y0 <= y < y1:
            out[f["id"]] = f
    return out


def _root(fs: fsspec.AbstractFileSystem) -> str:
    root = f"/index-{uuid.uuid4().hex}"
    fs.makedirs(root, exist_ok=True)
    return root


@pytest.fixture(scope="module")
def written():
    fs = fsspec.filesystem("memory")
    root = _root(fs)
    features = _features(3000)
    fs.pipe_file(f"{root}/nuclei.geojson.gz", gzip.compress(_collection(features)))
    build_index(fs, root, slide_shape=SHAPE, mpp=MPP, classes=CLASSES)
    yield fs, root, features
    fs.rm(root, recursive=True)


def _query(index, box, limit=50_000) -> tuple[dict[str, dict], bool]:
    result = index.query(*box, limit=limit)
    collection = json.loads(result.feature_collection(truncated=result.truncated))
    assert collection["type"] == "FeatureCollection" and collection["truncated"] == result.truncated
    return {f["id"]: f for f in collection["features"]}, result.truncated


@pytest.mark.parametrize("box", [(0, 0, 4000, 3000), (100, 200, 900, 700), (1023.5, 0, 1536.25, 3000),
                                 (3900, 2900, 5000, 4000), (-50, -50, 10, 10), (5000, 0, 6000, 10)])
def test_a_box_holds_exactly_the_geojson_nuclei_whose_centroid_is_inside(written, box) -> None:
    fs, root, features = written
    got, truncated = _query(open_index(fs, root), box)
    expected = _inside(features, box)
    assert not truncated
    assert got == expected  # the very features of the GeoJSON, unchanged


def test_the_whole_slide_box_gives_every_nucleus_once(written) -> None:
    fs, root, features = written
    result = open_index(fs, root).query(-100, -100, SHAPE[1] + 100, SHAPE[0] + 100, limit=50_000)
    ids = [json.loads(f)["id"] for f in result.features]
    assert len(ids) == len(set(ids)) == len(features)


def test_random_boxes_agree_with_the_geojson(written) -> None:
    fs, root, features = written
    index = open_index(fs, root)
    rng = np.random.default_rng(7)
    for _ in range(25):
        x0, y0 = rng.uniform(-100, 4000), rng.uniform(-100, 3000)
        box = (x0, y0, x0 + rng.uniform(1, 1500), y0 + rng.uniform(1, 1500))
        assert _query(index, box)[0].keys() == _inside(features, box).keys()


def test_limit_cuts_the_answer_and_says_so(written) -> None:
    fs, root, features = written
    got, truncated = _query(open_index(fs, root), (0, 0, 4000, 3000), limit=100)
    assert len(got) == 100 and truncated
    assert got.keys() <= _inside(features, (0, 0, 4000, 3000)).keys()


def test_a_small_box_reads_only_the_buckets_it_overlaps(written) -> None:
    fs, root, _ = written
    read: dict[str, int] = {}

    class Counting:
        def exists(self, path: str) -> bool:
            return fs.exists(path)

        def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
            data = fs.cat_file(path, start=start, end=end)
            name = path.rsplit("/", 1)[-1]
            read[name] = read.get(name, 0) + len(data)
            return data

    index = open_index(Counting(), root)  # type: ignore[arg-type]
    assert index.query(10, 10, 200, 200).features  # inside one 512 px bucket
    buckets = index.rows * index.cols
    for name in ("records.bin", "features.json"):
        assert 0 < read[name] < 3 * fs.size(f"{root}/{INDEX_DIR}/{name}") / buckets, name
    assert CELL_PX == 512.0


@pytest.mark.parametrize(("box", "limit"), [((0, 0, 0, 10), 10), ((5, 0, 1, 10), 10),
                                            ((0, 0, float("nan"), 1), 10), ((0, 0, 1, 1), 0),
                                            ((0, 0, 1, 1), 10**6)])
def test_bad_boxes_and_limits_are_refused(written, box, limit) -> None:
    fs, root, _ = written
    with pytest.raises(ValueError):
        open_index(fs, root).query(*box, limit=limit)


def test_classes_are_the_models_with_unclassified_first(written) -> None:
    fs, root, _ = written
    classes = open_index(fs, root).classes
    assert [c["name"] for c in classes] == ["unclassified", "Tumour", "Immune", "Stroma"]
    assert [c["type"] for c in classes] == [0, 1, 2, 3]
    assert classes[1]["colour"] == [255, 0, 0]


def test_density_counts_every_nucleus_per_class(written) -> None:
    fs, root, features = written
    density = open_index(fs, root).density()
    assert density["cell_px"] == pytest.approx(100.0 / MPP)
    assert density["rows"] * density["cols"] == 15 * 20 == len(density["counts"][0])
    names = [c["name"] for c in density["classes"]]
    expected = [0] * len(names)
    for f in features:
        cls = f["properties"].get("classification")
        expected[names.index(cls["name"]) if cls else 0] += 1
    assert [int(np.sum(plane)) for plane in density["counts"]] == expected


def test_zip_entries_and_pretty_printed_json_are_read_in_order(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    features = _features(500, seed=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("nuclei-001.geojson", _collection(features[:300], pretty=True))
        zf.writestr("nuclei-002.geojson", _collection(features[300:]))
    (tmp_path / "nuclei.zip").write_bytes(buffer.getvalue())
    build_index(fs, root, slide_shape=SHAPE, mpp=MPP)
    got, _ = _query(open_index(fs, root), (0, 0, 2000, 3000))
    assert got == _inside(features, (0, 0, 2000, 3000))


def test_the_parser_streams_features_across_small_chunks() -> None:
    features = _features(40, seed=3)
    text = _collection(features, pretty=True).decode()
    parsed = [f for _, f in iter_features(io.StringIO(text), chunk=97)]
    assert parsed == features
    assert [json.loads(t) for t, _ in iter_features(io.StringIO(text), chunk=13)] == features


@pytest.mark.parametrize("text", ['{"type": "Feature"}', '{"type":"FeatureCollection","features":[{"a":',
                                  '{"features": [1, 2]}'])
def test_the_parser_refuses_what_is_no_feature_collection(text: str) -> None:
    with pytest.raises(ValueError):
        list(iter_features(io.StringIO(text)))


def test_the_index_is_built_from_a_results_manifest(tmp_path) -> None:
    fs = fsspec.filesystem("file")
    root = str(tmp_path)
    features = _features(50, seed=4)
    (tmp_path / "nuclei.geojson.gz").write_bytes(gzip.compress(_collection(features)))
    manifest = {"slide": {"shape": list(SHAPE), "mpp": MPP},
                "model": {"classes": [{"name": "Background", "colour": [0, 0, 0]}, *CLASSES]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert not index_exists(fs, root)
    build_index_from_results(fs, root)
    assert index_exists(fs, root)
    index = open_index(fs, root)
    assert [c["name"] for c in index.classes] == ["unclassified", "Tumour", "Immune", "Stroma"]
    assert len(index) == 50


def test_no_index_is_reported_as_missing(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        open_index(fsspec.filesystem("file"), str(tmp_path))
