"""Retention over HTTP: a finished job's results and slide are deleted after the configured time;
the job stays listed as expired and its downloads answer 410, while a newer job is untouched."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service._server import CMU1, ORACLE, Server, service_env, submit, wait_for

pytestmark = pytest.mark.slow

RETENTION_S = 4.0


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("retention")


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[httpx.Client]:
    env = service_env(home, retention_hours=str(RETENTION_S / 3600), sweep_interval_s="0.5")
    with Server(env, home / "api.log") as server, server.client() as http:
        yield http


def _wait_expired(client: httpx.Client, job_id: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["expired"]:
            return job
        time.sleep(0.3)
    raise TimeoutError(f"job {job_id} did not expire: {job}")


def test_finished_jobs_expire_and_their_downloads_answer_410(client: httpx.Client, home: Path) -> None:
    old = wait_for(client, submit(client, CMU1, {**ORACLE, "roi": [0, 0, 300, 300]}).json()["id"])
    assert old["state"] == "succeeded"
    geojson_url = old["results"]["nuclei.geojson.gz"]
    assert client.get(geojson_url).status_code == 200
    slide = home / "store" / "slides" / f"{old['slide']['sha256']}.svs"
    assert slide.is_file()

    expired = _wait_expired(client, old["id"])
    assert expired["state"] == "succeeded" and expired["results"] == {}
    gone = client.get(geojson_url)
    assert gone.status_code == 410 and gone.json()["error"]["code"] == "results_expired"
    assert not (home / "store" / "jobs" / old["id"] / "results").exists()
    assert not slide.exists()  # no unexpired job uses it
    assert old["id"] in [item["id"] for item in client.get("/v1/jobs").json()["items"]]

    # The same slide uploaded again is stored again and its new job is served normally.
    new = wait_for(client, submit(client, CMU1, {**ORACLE, "roi": [0, 0, 300, 300]}).json()["id"])
    assert new["state"] == "succeeded" and not new["expired"]
    assert client.get(new["results"]["counts.json"]).status_code == 200
