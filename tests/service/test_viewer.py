"""The viewer's API on a real server: DeepZoom descriptor and tiles as openslide makes them, the
nuclei in a box exactly as the GeoJSON has them, and all of it for the job's owner only."""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree as ET

import httpx
import numpy as np
import openslide
import pytest
import shapely.geometry
from openslide.deepzoom import DeepZoomGenerator
from PIL import Image

from service.deps import key_digest
from tests.service._server import CMU1, ORACLE, Server, service_env, submit, wait_for
from worker.nuclei_index import INDEX_DIR

pytestmark = pytest.mark.slow

OWNER, OTHER = "viewer-owner-key", "viewer-other-key"
ROI = {**ORACLE, "roi": [1100, 500, 1000, 1000]}
"""A part of the slide with many nuclei (a whole-slide run takes minutes on a busy CI machine)."""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("viewer")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    keys = ",".join(key_digest(k) for k in (OWNER, OTHER))
    with Server(service_env(home, api_keys=keys), home / "api.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def owner(server: Server) -> Iterator[httpx.Client]:
    with server.client({"Authorization": f"Bearer {OWNER}"}) as client:
        yield client


@pytest.fixture(scope="module")
def other(server: Server) -> Iterator[httpx.Client]:
    with server.client({"Authorization": f"Bearer {OTHER}"}) as client:
        yield client


@pytest.fixture(scope="module")
def job(owner: httpx.Client) -> dict:
    response = submit(owner, CMU1, ROI)
    assert response.status_code == 202, response.text
    finished = wait_for(owner, response.json()["id"])
    assert finished["state"] == "succeeded", finished
    return finished


@pytest.fixture(scope="module")
def reference() -> Iterator[DeepZoomGenerator]:
    slide = openslide.OpenSlide(CMU1)
    try:
        yield DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False)
    finally:
        slide.close()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(float) - b.astype(float)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_the_descriptor_is_openslides(owner: httpx.Client, job: dict, reference) -> None:
    response = owner.get(f"/v1/jobs/{job['id']}/slide.dzi")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/xml")
    ours, theirs = ET.fromstring(response.text), ET.fromstring(reference.get_dzi("jpeg"))
    assert ours.attrib == theirs.attrib
    assert ours[0].attrib == theirs[0].attrib == {"Width": "2220", "Height": "2967"}


@pytest.mark.parametrize("from_top", [0, 1, 3])
def test_tiles_equal_openslides_at_three_levels(owner: httpx.Client, job: dict, reference,
                                                from_top: int) -> None:
    level = reference.level_count - 1 - from_top
    cols, rows = reference.level_tiles[level]
    for col, row in {(0, 0), (cols // 2, rows // 2), (cols - 1, rows - 1)}:
        response = owner.get(f"/v1/jobs/{job['id']}/slide_files/{level}/{col}_{row}.jpeg")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        assert "max-age" in response.headers["cache-control"]
        tile = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))
        expected = np.asarray(reference.get_tile(level, (col, row)).convert("RGB"))
        assert tile.shape == expected.shape
        assert _psnr(tile, expected) > 25.0, (level, col, row)


def test_a_tile_is_revalidated_by_its_etag(owner: httpx.Client, job: dict) -> None:
    url = f"/v1/jobs/{job['id']}/slide_files/12/0_0.png"
    first = owner.get(url)
    assert first.status_code == 200 and first.headers["content-type"] == "image/png"
    again = owner.get(url, headers={"If-None-Match": first.headers["etag"]})
    assert again.status_code == 304


@pytest.mark.parametrize("tile", ["13/0_0.jpeg", "12/9_0.jpeg", "12/0_12.jpeg", "0/1_0.jpeg",
                                  "12/0_0.gif", "12/-1_0.jpeg"])
def test_a_tile_outside_the_slide_is_404(owner: httpx.Client, job: dict, tile: str) -> None:
    response = owner.get(f"/v1/jobs/{job['id']}/slide_files/{tile}")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"code", "message"}


@pytest.mark.parametrize("path", ["slide.dzi", "slide_files/12/0_0.jpeg", "nuclei?bbox=0,0,2220,2967",
                                  "nuclei/density"])
def test_another_key_gets_404(other: httpx.Client, owner: httpx.Client, job: dict, path: str) -> None:
    assert owner.get(f"/v1/jobs/{job['id']}/{path}").status_code == 200
    response = other.get(f"/v1/jobs/{job['id']}/{path}")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_no_key_gets_401(server: Server, job: dict) -> None:
    with server.client() as anonymous:
        assert anonymous.get(f"/v1/jobs/{job['id']}/slide.dzi").status_code == 401


def _geojson(owner: httpx.Client, job: dict) -> list[dict]:
    response = owner.get(f"/v1/jobs/{job['id']}/results/nuclei.geojson.gz")
    assert response.status_code == 200
    return json.loads(gzip.decompress(response.content))["features"]


def _centroid(feature: dict) -> tuple[float, float]:
    """The centroid of a GeoJSON nucleus' polygon (GEOS, through shapely)."""
    point = shapely.geometry.shape(feature["geometry"]).centroid
    return point.x, point.y


@pytest.mark.parametrize("box", [(0, 0, 2220, 2967), (1300, 700, 1800, 1200), (1600.5, 0, 2220, 1283.5)])
def test_the_box_query_returns_exactly_the_geojson_nuclei_inside(
    owner: httpx.Client, job: dict, box: tuple[float, float, float, float]
) -> None:
    features = _geojson(owner, job)
    x0, y0, x1, y1 = box
    expected = {f["id"]: f for f in features
                if x0 <= _centroid(f)[0] < x1 and y0 <= _centroid(f)[1] < y1}
    response = owner.get(f"/v1/jobs/{job['id']}/nuclei",
                         params={"bbox": ",".join(map(str, box)), "limit": 50_000})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["type"] == "FeatureCollection" and body["truncated"] is False
    got = {f["id"]: f for f in body["features"]}
    assert got.keys() == expected.keys()
    assert box != (0, 0, 2220, 2967) or len(got) == len(features) > 0
    assert len(got) > 0
    assert got == expected  # the GeoJSON's features, unchanged


def test_the_index_was_built_when_the_job_finished(home: Path, job: dict) -> None:
    assert (home / "store" / "jobs" / job["id"] / "results" / INDEX_DIR / "index.json").is_file()


def test_the_index_is_rebuilt_on_first_use_when_missing(owner: httpx.Client, home: Path) -> None:
    import shutil

    response = submit(owner, CMU1, {**ORACLE, "roi": [1500, 900, 400, 400]})
    finished = wait_for(owner, response.json()["id"])
    assert finished["state"] == "succeeded", finished
    shutil.rmtree(home / "store" / "jobs" / finished["id"] / "results" / INDEX_DIR)
    first = owner.get(f"/v1/jobs/{finished['id']}/nuclei", params={"bbox": "1500,900,1900,1300"})
    assert first.status_code == 200
    assert len(first.json()["features"]) > 0


def test_the_density_grid_counts_the_geojson_nuclei_per_class(owner: httpx.Client, job: dict) -> None:
    density = owner.get(f"/v1/jobs/{job['id']}/nuclei/density").json()
    counts = owner.get(f"/v1/jobs/{job['id']}/results/counts.json").json()
    assert [c["name"] for c in density["classes"]] == ["unclassified", *counts["classes"]]
    expected = dict.fromkeys((c["name"] for c in density["classes"]), 0)
    for feature in _geojson(owner, job):
        classification = feature["properties"].get("classification")
        expected[classification["name"] if classification else "unclassified"] += 1
    got = {c["name"]: int(np.sum(density["counts"][c["type"]])) for c in density["classes"]}
    assert got == expected and sum(got.values()) > 0


@pytest.mark.parametrize("query", ["bbox=1,2,3", "bbox=5,0,1,10", "bbox=a,b,c,d", "bbox=0,0,1,nan",
                                   "bbox=0,0,10,10&limit=0", ""])
def test_bad_box_queries_are_4xx(owner: httpx.Client, job: dict, query: str) -> None:
    response = owner.get(f"/v1/jobs/{job['id']}/nuclei?{query}")
    assert response.status_code == 422
    assert set(response.json()["error"]) == {"code", "message"}


def test_the_viewer_api_is_documented(server: Server) -> None:
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    for path in ("/v1/jobs/{job_id}/slide.dzi", "/v1/jobs/{job_id}/nuclei",
                 "/v1/jobs/{job_id}/slide_files/{level}/{col}_{row}.{format}"):
        assert path in paths, sorted(paths)
