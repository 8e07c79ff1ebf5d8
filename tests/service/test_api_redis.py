"""Redis mode: a real redis-server, one API process and two ``hoverserve worker`` processes.

Jobs fan out into region tasks that both workers take; a worker SIGKILLed mid-job costs only its
in-flight region, which the other worker redoes, and the job's nuclei are exactly those of an
undisturbed run.
"""

from __future__ import annotations

import gzip
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests._synthetic import write_tiff
from tests.service._server import CMU1, ORACLE, Process, Server, service_env, submit, wait_for

pytestmark = pytest.mark.slow

REDIS_URL = "redis://127.0.0.1:6379/0"
ROI = [400, 400, 1200, 1200]
"""Level-0 box of CMU-1 analysed here: about 2400² model pixels, 36 regions of 512² or fewer."""
OPTIONS = {**ORACLE, "roi": ROI, "region_size": 512, "tissue_mask": False}


def _redis_up() -> bool:
    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _redis_up():
        pytest.fail(f"no redis-server answers at {REDIS_URL} (.ci/run starts one)")
    return tmp_path_factory.mktemp("redis")


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    return service_env(home, redis_url=REDIS_URL, queue_name=f"test-{uuid.uuid4().hex[:8]}",
                       worker_dead_after_s="3", max_attempts="3")


@pytest.fixture(scope="module")
def workers(env: dict[str, str], home: Path) -> Iterator[dict[str, Process]]:
    procs = {name: Process(["worker", "--name", name], env, home / f"{name}.log")
             for name in ("w1", "w2")}
    yield procs
    for proc in procs.values():
        proc.stop()


@pytest.fixture(scope="module")
def client(env: dict[str, str], home: Path, workers: dict[str, Process]) -> Iterator[httpx.Client]:
    with Server(env, home / "api.log") as server, server.client() as c:
        yield c


@pytest.fixture(scope="module")
def second_slide(home: Path) -> Path:
    """A different real slide: a crop of CMU-1 saved as a tiled TIFF."""
    import numpy as np
    import openslide

    with openslide.OpenSlide(str(CMU1)) as raw:
        mpp = float(raw.properties[openslide.PROPERTY_NAME_MPP_X])
        rgb = np.asarray(raw.read_region((600, 800), 0, (1200, 1000)))[..., :3].copy()
    return write_tiff(home / "crop.tif", rgb, mpp=mpp)


def _features(client: httpx.Client, job: dict) -> list[dict]:
    data = client.get(job["results"]["nuclei.geojson.gz"]).content
    return json.loads(gzip.decompress(data))["features"]


def _region_workers(client: httpx.Client, job: dict) -> dict[str, str]:
    return client.get(job["results"]["manifest.json"]).json()["parameters"]["region_workers"]


@pytest.fixture(scope="module")
def reference(client: httpx.Client, second_slide: Path) -> dict:
    """Two slides submitted at once, both run to completion by the two workers."""
    first = submit(client, CMU1, OPTIONS)
    second = submit(client, second_slide, {**ORACLE, "region_size": 512, "tissue_mask": False})
    assert first.status_code == 202 and second.status_code == 202, (first.text, second.text)
    jobs = [wait_for(client, r.json()["id"]) for r in (first, second)]
    return {"cmu1": jobs[0], "crop": jobs[1]}


def test_two_slides_at_once_both_succeed_on_both_workers(client: httpx.Client,
                                                         reference: dict) -> None:
    for job in reference.values():
        assert job["state"] == "succeeded", job
        assert job["progress"]["regions_done"] == job["progress"]["regions_total"] > 1
    assert reference["cmu1"]["progress"]["regions_total"] == 36
    used = set()
    for job in reference.values():
        used |= set(_region_workers(client, job).values())
    assert used == {"w1", "w2"}
    assert len(_features(client, reference["cmu1"])) > 0


def test_a_worker_killed_mid_job_costs_only_its_regions(
    client: httpx.Client, workers: dict[str, Process], reference: dict
) -> None:
    job = submit(client, CMU1, OPTIONS).json()
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job['id']}").json()["progress"]["regions_done"] < 4:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    workers["w1"].kill()
    final = wait_for(client, job["id"])
    assert final["state"] == "succeeded", final
    region_workers = _region_workers(client, final)
    assert len(region_workers) == 36
    assert set(region_workers.values()) <= {"w1", "w2"}
    features = _features(client, final)
    expected = _features(client, reference["cmu1"])
    assert len(features) == len(expected)
    assert [f["geometry"] for f in features] == [f["geometry"] for f in expected]
    ids = [f["id"] for f in features]
    assert len(set(ids)) == len(ids)


def test_cancel_withdraws_the_jobs_queued_tasks(home: Path) -> None:
    # An API whose queue no worker serves, so every task stays queued; region and finalize tasks
    # are enqueued by hand as the prepare task would have fanned them out.
    from rq import Queue

    from service.queue.rq_queue import finalize_task, region_task

    queue_name = f"test-cancel-{uuid.uuid4().hex[:8]}"
    env = service_env(home / "cancel", redis_url=REDIS_URL, queue_name=queue_name)
    with Server(env, home / "cancel-api.log") as server, server.client() as client:
        mine, other = (submit(client, CMU1, OPTIONS).json()["id"] for _ in range(2))
        queue = Queue(queue_name, connection=redis.Redis.from_url(REDIS_URL))
        regions = [queue.enqueue(region_task, mine, i, job_id=f"hs-{mine}-r{i}") for i in range(2)]
        queue.enqueue(finalize_task, mine, job_id=f"hs-{mine}-finalize", depends_on=regions)
        assert set(queue.get_job_ids()) == {f"hs-{mine}-prepare", f"hs-{other}-prepare",
                                            f"hs-{mine}-r0", f"hs-{mine}-r1"}
        assert queue.deferred_job_registry.get_job_ids() == [f"hs-{mine}-finalize"]

        assert client.delete(f"/v1/jobs/{mine}").json()["state"] == "cancelled"

        assert queue.get_job_ids() == [f"hs-{other}-prepare"]
        assert queue.deferred_job_registry.get_job_ids() == []
        assert len(queue.canceled_job_registry.get_job_ids()) == 4
        assert client.get(f"/v1/jobs/{other}").json()["state"] == "queued"


def test_a_retried_job_gets_fresh_tasks_and_an_api_restart_runs_nothing(home: Path) -> None:
    # No worker serves this queue: what the API enqueues stays visible.
    from rq import Queue

    queue_name = f"test-retry-{uuid.uuid4().hex[:8]}"
    env = service_env(home / "retry", redis_url=REDIS_URL, queue_name=queue_name)
    queue = Queue(queue_name, connection=redis.Redis.from_url(REDIS_URL))
    with Server(env, home / "retry-api.log") as server, server.client() as client:
        job = submit(client, CMU1, OPTIONS).json()["id"]
        assert queue.get_job_ids() == [f"hs-{job}-prepare"]
        assert client.delete(f"/v1/jobs/{job}").json()["state"] == "cancelled"
        assert queue.get_job_ids() == []

        retried = client.post(f"/v1/jobs/{job}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["state"] == "queued" and retried.json()["retries"] == 1
        assert retried.json()["progress"]["phase"] == "queued"
        assert queue.get_job_ids() == [f"hs-{job}-1-prepare"]
        again = client.post(f"/v1/jobs/{job}/retry")
        assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_retryable"
    with Server(env, home / "retry-api-2.log") as server, server.client() as client:
        assert client.get(f"/v1/jobs/{job}").json()["state"] == "queued"
        assert queue.get_job_ids() == [f"hs-{job}-1-prepare"]  # RQ owns the tasks: no resume
    assert not (home / "retry" / "store" / "locks").exists()  # and no store lock
