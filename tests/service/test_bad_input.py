"""Bad input to a real server with API keys: each refused with its exact status and error code,
and the server stays up with earlier results intact."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from service.deps import key_digest
from tests.service._server import CMU1, ORACLE, SLIDES, Server, service_env, submit, wait_for

pytestmark = pytest.mark.slow

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
LIMIT_MB = 3  # CMU-1-Small-Region.svs is 1.9 MB


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bad-input")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    env = service_env(home, api_keys=f"{key_digest(ALICE)},sha256:{key_digest(BOB)}",
                      max_upload_mb=str(LIMIT_MB))
    with Server(env, home / "api.log") as srv:
        yield srv


def _client(server: Server, key: str | None) -> httpx.Client:
    return server.client({"Authorization": f"Bearer {key}"} if key else None)


@pytest.fixture(scope="module")
def alice(server: Server) -> Iterator[httpx.Client]:
    with _client(server, ALICE) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server: Server) -> Iterator[httpx.Client]:
    with _client(server, BOB) as client:
        yield client


@pytest.fixture(scope="module")
def earlier(alice: httpx.Client) -> dict:
    """A job that succeeded before any bad input arrived."""
    response = submit(alice, CMU1, {**ORACLE, "roi": [200, 200, 500, 500]})
    assert response.status_code == 202, response.text
    job = wait_for(alice, response.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def _refused(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


def _upload(client: httpx.Client, name: str, data: bytes, options: dict | None = None):
    return client.post("/v1/jobs", files={"slide": (name, data)},
                       data={"options": json.dumps(options or ORACLE)})


def test_empty_upload(alice: httpx.Client, earlier: dict) -> None:
    _refused(_upload(alice, "empty.svs", b""), 400, "empty_upload")


def test_text_named_svs(alice: httpx.Client) -> None:
    _refused(_upload(alice, "notes.svs", b"these are my notes, not a slide\n" * 20),
             422, "unsupported_slide")


def test_truncated_svs(alice: httpx.Client) -> None:
    data = CMU1.read_bytes()
    _refused(_upload(alice, "cut.svs", data[: len(data) // 2]), 422, "unsupported_slide")


def test_non_rgb_slide(alice: httpx.Client) -> None:
    grey16 = SLIDES / "not_he" / "pathml_smalltif.tif"
    _refused(_upload(alice, "grey.tif", grey16.read_bytes()), 422, "not_rgb_slide")


def test_tiff_claiming_a_million_pixels_square(alice: httpx.Client, tmp_path: Path) -> None:
    path = tmp_path / "huge.tif"
    tifffile.imwrite(path, np.zeros((16, 16, 3), np.uint8), photometric="rgb",
                     resolution=(40000, 40000), resolutionunit="CENTIMETER")
    with tifffile.TiffFile(path, mode="r+b") as tif:
        tags = tif.pages[0].tags
        for name in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tags[name].overwrite(1_000_000)
    _refused(_upload(alice, "huge.tif", path.read_bytes()), 422, "unsupported_slide")


def test_path_in_filename_is_refused(alice: httpx.Client, home: Path) -> None:
    tiny = SLIDES / "synthetic" / "small.svs"
    for name in ("../x.svs", "..\\x.svs", "/etc/x.svs"):
        response = _upload(alice, name, tiny.read_bytes(), {**ORACLE, "tissue_mask": False})
        _refused(response, 400, "invalid_filename")
    assert not (home / "x.svs").exists() and not (home / "store" / "x.svs").exists()


def test_missing_api_key(server: Server) -> None:
    with _client(server, None) as anonymous:
        _refused(anonymous.get("/v1/jobs"), 401, "unauthorized")
        _refused(_upload(anonymous, "a.svs", b"x"), 401, "unauthorized")


def test_wrong_api_key(server: Server) -> None:
    with _client(server, "not-a-key") as stranger:
        response = stranger.get("/v1/jobs")
    _refused(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"


def test_another_keys_job_is_not_found(bob: httpx.Client, earlier: dict) -> None:
    _refused(bob.get(f"/v1/jobs/{earlier['id']}"), 404, "job_not_found")
    _refused(bob.get(f"/v1/jobs/{earlier['id']}/results/counts.json"), 404, "job_not_found")
    _refused(bob.delete(f"/v1/jobs/{earlier['id']}"), 404, "job_not_found")
    assert earlier["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["items"]]


def test_over_size_upload(alice: httpx.Client) -> None:
    big = np.random.default_rng(0).integers(0, 256, (LIMIT_MB + 1) * 2**20, np.uint8).tobytes()
    _refused(_upload(alice, "big.svs", big), 413, "upload_too_large")


def test_over_size_upload_without_content_length(alice: httpx.Client) -> None:
    boundary = "hoverserve-test-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"slide\"; filename=\"b.svs\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()

    def body() -> Iterator[bytes]:
        yield head
        for _ in range(LIMIT_MB + 1):
            yield b"\0" * 2**20
        yield f"\r\n--{boundary}--\r\n".encode()

    response = alice.post("/v1/jobs", content=body(),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    _refused(response, 413, "upload_too_large")


def test_unknown_model(alice: httpx.Client) -> None:
    _refused(submit(alice, CMU1, {"model": "no-such-model"}), 422, "unknown_model")


def test_bad_options(alice: httpx.Client) -> None:
    _refused(submit(alice, CMU1, {**ORACLE, "roi": [0, 0, -5, 10]}), 422, "invalid_options")
    _refused(submit(alice, CMU1, {**ORACLE, "colour": "blue"}), 422, "invalid_options")


def test_unknown_job(alice: httpx.Client) -> None:
    _refused(alice.get(f"/v1/jobs/{'0' * 32}"), 404, "job_not_found")
    _refused(alice.get("/v1/jobs/../../etc/passwd"), 404, "not_found")
    _refused(alice.get("/v1/jobs/not-a-job-id"), 404, "job_not_found")


def test_results_before_success(alice: httpx.Client) -> None:
    job = submit(alice, CMU1, {**ORACLE, "tissue_mask": False}).json()
    _refused(alice.get(f"/v1/jobs/{job['id']}/results/nuclei.geojson.gz"), 409, "job_not_finished")
    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 200


def test_unknown_result_name(alice: httpx.Client, earlier: dict) -> None:
    _refused(alice.get(f"/v1/jobs/{earlier['id']}/results/job.json"), 404, "result_not_found")


def test_server_is_up_and_earlier_results_intact(alice: httpx.Client, earlier: dict) -> None:
    assert alice.get("/healthz").json()["status"] == "ok"
    job = alice.get(f"/v1/jobs/{earlier['id']}").json()
    assert job["state"] == "succeeded" and job["results"] == earlier["results"]
    counts = alice.get(earlier["results"]["counts.json"])
    assert counts.status_code == 200 and counts.json()
    rejected = alice.get("/metrics").text
    assert 'hoverserve_uploads_rejected_total{code="unsupported_slide"} 3.0' in rejected
