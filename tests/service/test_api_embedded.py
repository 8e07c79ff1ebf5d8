"""The HTTP API in embedded mode (no Redis): a real uvicorn server, jobs run in-process.

One server per module; a restart on the same store checks that jobs and results are durable.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from models.zoo import default_model, list_models
from service.cli import main
from tests.service._server import CMU1, ORACLE, Server, qupath_check, service_env, submit, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with Server(service_env(home), home / "api.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def finished_job(client: httpx.Client) -> dict:
    """The whole CMU-1-Small-Region slide, run to completion with the oracle model."""
    response = submit(client, CMU1, ORACLE)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running")
    assert response.headers["location"].endswith(f"/v1/jobs/{job['id']}")
    return wait_for(client, job["id"])


def test_a_slide_job_succeeds_with_qupath_ready_geojson(
    client: httpx.Client, finished_job: dict, tmp_path: Path
) -> None:
    assert finished_job["state"] == "succeeded", finished_job
    assert finished_job["error"] is None
    progress = finished_job["progress"]
    assert progress["regions_total"] >= 1
    assert progress["regions_done"] == progress["regions_total"]
    assert progress["fraction"] == 1.0
    assert {"nuclei.geojson.gz", "counts.json", "manifest.json", "overlay.png",
            "nuclei.zarr.zip"} <= set(finished_job["results"])
    geojson = client.get(finished_job["results"]["nuclei.geojson.gz"])
    assert geojson.status_code == 200
    path = tmp_path / "nuclei.geojson.gz"
    path.write_bytes(geojson.content)
    features = json.loads(gzip.decompress(geojson.content))["features"]
    assert len(features) > 0
    check = qupath_check(path)
    assert check.stdout.startswith("OK"), check.stdout
    counts = client.get(f"/v1/jobs/{finished_job['id']}/results/counts.json").json()
    assert sum(counts.get("counts", counts).get(c, 0) for c in ("Alpha", "Beta")) == len(features) \
        or counts.get("total") == len(features)


def test_the_manifest_records_the_job_and_its_regions(client: httpx.Client, finished_job: dict) -> None:
    manifest = client.get(finished_job["results"]["manifest.json"]).json()
    parameters = manifest["parameters"]
    assert parameters["job"] == finished_job["id"]
    assert parameters["model"] == "oracle"
    assert len(parameters["region_workers"]) == finished_job["progress"]["regions_total"]
    assert manifest["slide"]["sha256"] == finished_job["slide"]["sha256"]


def test_models_openapi_health_and_metrics(client: httpx.Client, finished_job: dict) -> None:
    models = client.get("/v1/models").json()["models"]
    oracle = next(m for m in models if m["name"] == "oracle")
    assert oracle["card"]["mpp"] == 0.25 and oracle["card"]["input_size"] == 272
    # every bundled model is offered by name, the default first and marked
    assert [m["name"] for m in models if m["default"]] == [models[0]["name"]] == [default_model().stem]
    assert {p.stem for p in list_models()} <= {m["name"] for m in models}
    spec = client.get("/openapi.json").json()
    for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results/{name}",
                 "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    post = spec["paths"]["/v1/jobs"]["post"]
    assert "202" in post["responses"] and "413" in post["responses"]
    assert "slide" in post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert client.get("/readyz").json()["checks"] == {"store": "ok", "queue": "ok"}
    metrics = client.get("/metrics").text
    assert "hoverserve_jobs_submitted_total" in metrics
    assert 'route="/v1/jobs/{job_id}"' in metrics


def test_identical_uploads_are_stored_once(client: httpx.Client, finished_job: dict,
                                           home: Path) -> None:
    response = submit(client, CMU1, {**ORACLE, "roi": [0, 0, 300, 300]})
    assert response.status_code == 202
    wait_for(client, response.json()["id"])
    slides = list((home / "store" / "slides").iterdir())
    assert [p.name for p in slides] == [f"{finished_job['slide']['sha256']}.svs"]


def test_a_running_job_can_be_cancelled_and_a_finished_one_deleted(client: httpx.Client) -> None:
    job = submit(client, CMU1, {**ORACLE, "tissue_mask": False}).json()
    cancelled = client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert wait_for(client, job["id"])["state"] == "cancelled"
    small = submit(client, CMU1, {**ORACLE, "roi": [0, 0, 200, 200]}).json()
    assert wait_for(client, small["id"])["state"] == "succeeded"
    assert client.delete(f"/v1/jobs/{small['id']}").status_code == 204
    gone = client.get(f"/v1/jobs/{small['id']}")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "job_not_found"


def test_jobs_are_listed_newest_first_in_pages(client: httpx.Client, finished_job: dict) -> None:
    # Runs after the jobs above: one finished, one identical upload, one cancelled, one deleted.
    listing = client.get("/v1/jobs").json()
    items = listing["items"]
    assert listing["total"] == len(items) >= 3
    created = [item["created_at"] for item in items]
    assert created == sorted(created, reverse=True)
    assert finished_job["id"] in [item["id"] for item in items]
    page = client.get("/v1/jobs", params={"offset": 1, "limit": 1}).json()
    assert [item["id"] for item in page["items"]] == [items[1]["id"]]
    assert page["total"] == listing["total"]
    cancelled = client.get("/v1/jobs", params={"state": "cancelled"}).json()
    assert cancelled["total"] >= 1 and {item["state"] for item in cancelled["items"]} == {"cancelled"}
    assert cancelled["total"] == sum(item["state"] == "cancelled" for item in items)


def test_submit_command_follows_the_job_and_downloads_results(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results"
    code = main(["submit", str(CMU1), "--server", server.url, "--model", "oracle",
                 "--roi", "0,0,400,400", "--out", str(out), "--quiet", "--interval", "0.3"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    assert len(printed[0]) == 32  # the job id first, then the downloaded files
    assert (out / "nuclei.geojson.gz").is_file() and (out / "manifest.json").is_file()


def _task_processes(server: Server) -> list[psutil.Process]:
    """The server's task processes (its spawned children other than multiprocessing's tracker)."""
    found = []
    for child in psutil.Process(server.pid).children():
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdline = " ".join(child.cmdline())
            if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                found.append(child)
    return found


def test_cancel_stops_the_running_task_within_5_s_and_removes_partial_files(
    server: Server, client: httpx.Client, home: Path
) -> None:
    job = submit(client, CMU1, {**ORACLE, "region_size": 256, "tissue_mask": False}).json()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["regions_done"] < 1:
        assert time.monotonic() < deadline, "no region finished"
        time.sleep(0.1)
    running = client.get(f"/v1/jobs/{job['id']}").json()
    assert running["state"] == "running" and running["progress"]["phase"] == "segmenting"
    tasks = _task_processes(server)
    assert len(tasks) == 1
    folder = home / "store" / "jobs" / job["id"]
    assert (folder / "plan.json").is_file() and (folder / "plan.npz").is_file()

    cancelled = client.delete(f"/v1/jobs/{job['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    _, alive = psutil.wait_procs(tasks, timeout=5)
    assert alive == [], "the task process still runs 5 s after the cancel"
    deadline = time.monotonic() + 5
    while {p.name for p in folder.iterdir()} != {"job.json", "cancelled"}:
        assert time.monotonic() < deadline, sorted(p.name for p in folder.iterdir())
        time.sleep(0.1)
    final = client.get(f"/v1/jobs/{job['id']}").json()
    assert final["state"] == "cancelled" and final["progress"]["phase"] == "done"
    # the queue carries on with a fresh task process
    small = submit(client, CMU1, {**ORACLE, "roi": [0, 0, 200, 200]}).json()
    assert wait_for(client, small["id"])["state"] == "succeeded"


def test_a_cancelled_job_can_be_retried_and_only_failed_or_cancelled_ones(
    client: httpx.Client, finished_job: dict
) -> None:
    job = submit(client, CMU1, {**ORACLE, "roi": [0, 0, 300, 300], "tissue_mask": False}).json()
    assert client.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    retried = client.post(f"/v1/jobs/{job['id']}/retry")
    assert retried.status_code == 202, retried.text
    assert retried.json()["state"] == "queued" and retried.json()["retries"] == 1
    final = wait_for(client, job["id"])
    assert final["state"] == "succeeded", final
    assert final["progress"]["regions_done"] == final["progress"]["regions_total"] >= 1

    again = client.post(f"/v1/jobs/{finished_job['id']}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_retryable"
    missing = client.post(f"/v1/jobs/{'0' * 32}/retry")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"


def test_jobs_and_results_survive_an_api_restart(
    server: Server, client: httpx.Client, home: Path, finished_job: dict
) -> None:
    interrupted = submit(client, CMU1, {**ORACLE, "roi": [0, 0, 1000, 1000], "region_size": 256,
                                        "tissue_mask": False}).json()
    wait_for(client, interrupted["id"], states=("running",))
    server.kill()  # no shutdown of any kind: the job is mid-flight
    with Server(service_env(home), home / "api-2.log") as again, again.client() as fresh:
        job = fresh.get(f"/v1/jobs/{finished_job['id']}").json()
        assert job["state"] == "succeeded"
        assert job["progress"] == finished_job["progress"]
        geojson = fresh.get(f"/v1/jobs/{finished_job['id']}/results/nuclei.geojson.gz")
        assert geojson.status_code == 200
        assert len(json.loads(gzip.decompress(geojson.content))["features"]) > 0
        resumed = wait_for(fresh, interrupted["id"])
        assert resumed["state"] == "succeeded", resumed
        assert resumed["progress"]["regions_done"] == resumed["progress"]["regions_total"]
