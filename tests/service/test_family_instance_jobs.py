"""An ``instance`` (panoptic) model behind the CLI and the HTTP API: the same kinds of results as
a hover model, valid for QuPath.

The model is the disk-detecting oracle of :mod:`tests._synthetic_instance`, so the counts are
known exactly; then the shipped panoptic model (``hoverserve-panoptic``) by name on a box of a
real slide, where the CLI and a job must report the same nuclei.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import main
from tests._synthetic import write_tiff
from tests._synthetic_instance import build_instance_oracle, draw_disks, encode_disk_slide
from tests.service._server import CMU1, Server, qupath_check, service_env, submit, wait_for

pytestmark = pytest.mark.slow

SHAPE = (400, 600)
PANOPTIC = "hoverserve-panoptic"
ROI = (700, 1000, 640, 640)
"""A tissue box of CMU-1-Small-Region (level-0 px at 20x), across 4 x 4 region cores."""
RESULTS = {"nuclei.geojson.gz", "counts.json", "manifest.json", "overlay.png", "nuclei.zarr.zip"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("instance-jobs")


@pytest.fixture(scope="module")
def scene(home: Path) -> tuple[Path, Path, int, int]:
    """(slide, model, disks drawn, disks of class 1)."""
    disks, classes = draw_disks(SHAPE, 150, seed=8)
    slide = write_tiff(home / "disks.tif", encode_disk_slide(SHAPE, disks, classes), mpp=0.25)
    (home / "models").mkdir(exist_ok=True)
    model = build_instance_oracle(home / "models" / "instance-oracle.onnx")
    return slide, model, len(disks), int((classes == 1).sum())


@pytest.fixture(scope="module")
def client(home: Path, scene) -> Iterator[httpx.Client]:
    with Server(service_env(home), home / "api.log") as server, server.client() as c:
        yield c


def _valid_geojson(path: Path, expected: int) -> None:
    features = json.loads(gzip.decompress(path.read_bytes()))["features"]
    assert len(features) == expected
    check = qupath_check(path)
    assert check.stdout.startswith("OK"), check.stdout


def test_the_cli_runs_an_instance_model_like_any_other(scene, tmp_path: Path) -> None:
    slide, model, drawn, alpha = scene
    assert main(["model", "info", str(model)]) == 0
    assert main(["infer", str(slide), "--model", str(model), "--out", str(tmp_path),
                 "--no-tissue-mask", "--region-size", "128", "-q"]) == 0
    assert {p.name for p in tmp_path.iterdir()} >= RESULTS
    counts = json.loads((tmp_path / "counts.json").read_text())
    assert counts["total"] == drawn and counts["classes"]["Alpha"] == alpha
    _valid_geojson(tmp_path / "nuclei.geojson.gz", drawn)


def test_an_api_job_with_an_instance_model_gives_the_same_kinds_of_results(
        client: httpx.Client, scene, tmp_path: Path) -> None:
    slide, _, drawn, alpha = scene
    assert "instance-oracle" in [m["name"] for m in client.get("/v1/models").json()["models"]]
    response = submit(client, slide, {"model": "instance-oracle", "tissue_mask": False})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert set(job["results"]) >= RESULTS
    counts = client.get(job["results"]["counts.json"]).json()
    assert counts["total"] == drawn and counts["classes"]["Alpha"] == alpha
    path = tmp_path / "nuclei.geojson.gz"
    path.write_bytes(client.get(job["results"]["nuclei.geojson.gz"]).content)
    _valid_geojson(path, drawn)


@pytest.fixture(scope="module")
def panoptic_cli(home: Path) -> Path:
    out = home / "panoptic-cli"
    assert main(["infer", str(CMU1), "--model", PANOPTIC, "--roi", ",".join(map(str, ROI)),
                 "--out", str(out), "-q"]) == 0
    return out


def test_the_shipped_panoptic_model_is_an_instance_model(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["model", "info", PANOPTIC]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "instance"


def test_the_cli_runs_the_shipped_panoptic_model_by_name(panoptic_cli: Path) -> None:
    assert {p.name for p in panoptic_cli.iterdir()} >= RESULTS
    counts = json.loads((panoptic_cli / "counts.json").read_text())
    assert counts["total"] > 100  # a 0.1 mm² box of dense tissue
    _valid_geojson(panoptic_cli / "nuclei.geojson.gz", counts["total"])


def test_a_job_with_the_shipped_panoptic_model_reports_what_the_cli_does(
        client: httpx.Client, panoptic_cli: Path, tmp_path: Path) -> None:
    response = submit(client, CMU1, {"model": PANOPTIC, "roi": list(ROI)})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    assert set(job["results"]) >= RESULTS
    counts = client.get(job["results"]["counts.json"]).json()
    assert counts == json.loads((panoptic_cli / "counts.json").read_text())
    path = tmp_path / "nuclei.geojson.gz"
    path.write_bytes(client.get(job["results"]["nuclei.geojson.gz"]).content)
    _valid_geojson(path, counts["total"])
