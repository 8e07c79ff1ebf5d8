"""A 100,000 × 100,000 px single-level TIFF (1 MB: every tile offset points at one tile) against a
real server: planned from its ROI in seconds, or refused with 422 ``slide_too_large``; never a
whole-slide read that holds the only worker for minutes."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from tests.service._server import CMU1, ORACLE, Server, service_env, submit, wait_for
from tests.worker._huge_tiff import write_repeated_tile_tiff
from worker.slide import open_slide

pytestmark = pytest.mark.slow

SIDE = 100_000
ROI = [97 * 512 + 100, 78 * 512 + 100, 300, 300]  # x, y, w, h (level 0): tile pixels 100..400
LIMIT_S = 60
MODEST_BYTES = 2 * 2**30
"""Peak resident memory allowed to any server process: a slide-sized read would need 30 GB."""


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("large-slide")


@pytest.fixture(scope="module")
def huge(home: Path) -> Path:
    with open_slide(CMU1) as slide:
        # Real H&E in which the test model finds nuclei, at its own resolution (20×).
        tile = slide.read(0, row=2200, col=1400, height=512, width=512)
    return write_repeated_tile_tiff(home / "huge.tif", tile, height=SIDE, width=SIDE, mpp=0.5)


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with Server(service_env(home), home / "api.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http


@pytest.fixture(scope="module")
def roi_job(client: httpx.Client, huge: Path) -> tuple[dict, float]:
    """The huge slide submitted with a 300 px roi, followed to its end: (job, seconds taken)."""
    start = time.monotonic()
    response = submit(client, huge, {**ORACLE, "roi": ROI})
    assert response.status_code == 202, response.text
    job = wait_for(client, response.json()["id"], timeout=LIMIT_S)
    return job, time.monotonic() - start


def _peak_rss(session: int) -> int:
    """Largest peak resident size (VmHWM) of the live processes in a process session, bytes."""
    peak = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            status = (entry / "status").read_text()
        except (OSError, ProcessLookupError):
            continue  # it exited meanwhile
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


def _refused_too_large(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "slide_too_large"
    return str(error["message"])


def test_the_fixture_is_a_valid_huge_slide_in_a_small_file(huge: Path) -> None:
    assert huge.stat().st_size < 2_000_000
    with open_slide(huge) as slide:
        assert slide.shape == (SIDE, SIDE)
        assert len(slide.level_shapes) == 1
        assert slide.mpp == pytest.approx(0.5)


def test_with_a_small_roi_the_job_succeeds_within_a_minute(
    client: httpx.Client, server: Server, roi_job: tuple[dict, float]
) -> None:
    job, seconds = roi_job
    assert job["state"] == "succeeded", job
    assert seconds < LIMIT_S
    assert job["progress"]["regions_total"] == 1
    counts = client.get(job["results"]["counts.json"]).json()
    assert counts["total"] > 0, counts  # the tile is real H&E with nuclei
    overlay = client.get(job["results"]["overlay.png"])
    assert overlay.status_code == 200
    image = cv2.imdecode(np.frombuffer(overlay.content, np.uint8), cv2.IMREAD_COLOR)
    # The whole slide's geometry, white but for the roi.
    assert image is not None and image.shape[:2] == (2048, 2048)
    assert _peak_rss(server.pid) < MODEST_BYTES


def test_without_an_roi_the_slide_is_refused_at_submission(client: httpx.Client, huge: Path) -> None:
    start = time.monotonic()
    message = _refused_too_large(submit(client, huge, ORACLE))
    assert time.monotonic() - start < LIMIT_S
    for words in ("100,000×100,000 px", "planning budget", "roi", "pyramidal"):
        assert words in message
    assert "/" not in message.split(" is ")[0]  # the file's name, not a server path


def test_an_roi_too_large_to_plan_is_refused_at_submission(client: httpx.Client, huge: Path) -> None:
    message = _refused_too_large(submit(client, huge, {**ORACLE, "roi": [0, 0, 20_000, 20_000]}))
    assert "smaller roi" in message


def test_the_stored_slide_named_by_hash_without_an_roi_is_refused_too(
    client: httpx.Client, roi_job: tuple[dict, float]
) -> None:
    fields = {"slide_sha256": roi_job[0]["slide"]["sha256"], "options": json.dumps(ORACLE)}
    # Plain form fields, sent as multipart parts (no file name).
    response = client.post("/v1/jobs", files={k: (None, v) for k, v in fields.items()})
    _refused_too_large(response)


def test_cancel_of_a_running_job_on_it_takes_effect_within_five_seconds(
    client: httpx.Client, huge: Path, home: Path
) -> None:
    # A 6000 px roi of the huge slide: dozens of regions, minutes of work for the only worker.
    job_id = submit(client, huge, {**ORACLE, "roi": [0, 0, 6000, 6000]}).json()["id"]
    wait_for(client, job_id, timeout=LIMIT_S, states=("running",))
    start = time.monotonic()
    assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    job = wait_for(client, job_id, timeout=5, states=("cancelled", "succeeded", "failed"))
    assert job["state"] == "cancelled"
    folder = home / "store" / "jobs" / job_id
    left = ["cancelled", "job.json"]

    def files() -> list[str]:
        return sorted(p.name for p in folder.iterdir())

    while time.monotonic() - start < 5 and files() != left:
        time.sleep(0.2)
    # The task stopped and cleaned up after itself: no plan, no regions, and nothing comes back.
    assert files() == left
    time.sleep(1.5)
    assert files() == left
