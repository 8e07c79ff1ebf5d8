"""Bad input to a real server with API keys: each refused with its exact status and error code,
and the server stays up with earlier results intact."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Callable, Iterator
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
    with tifffile.TiffFile(path, mode="r+") as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        tags = page.tags
        for name in ("ImageWidth", "ImageLength", "RowsPerStrip"):
            tags[name].overwrite(1_000_000)
    _refused(_upload(alice, "huge.tif", path.read_bytes()), 422, "unsupported_slide")


def test_dicom_that_trips_its_parser(alice: httpx.Client) -> None:
    # The file-meta group length (0002,0000) is a 4-byte UL sent with 5 bytes: pydicom raises its
    # own exception type, which must still come back as an unreadable slide, not a 500.
    meta = struct.pack("<HH", 2, 0) + b"UL" + struct.pack("<H", 5) + b"\x01\x02\x03\x04\x05"
    data = b"\0" * 128 + b"DICM" + meta + b"\0" * 64
    _refused(_upload(alice, "meta.dcm", data), 422, "unsupported_slide")


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


# --------------------------------------------------------------------------- malformed forms

BOUNDARY = "bad-input-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"
TINY = SLIDES / "synthetic" / "small.svs"


def _part(name: str, data: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + data \
        + b"\r\n"


def _form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _slide(filename: str = "small.svs") -> bytes:
    return _part("slide", TINY.read_bytes(), filename)


def _options(options: dict | None = None) -> bytes:
    return _part("options", json.dumps(options or {**ORACLE, "tissue_mask": False}).encode())


def _post(client: httpx.Client, body: bytes, content_type: str = MULTIPART) -> httpx.Response:
    return client.post("/v1/jobs", content=body, headers={"Content-Type": content_type})


MALFORMED = {
    "no boundary": ("multipart/form-data", lambda: _form(_options(), _slide()), "invalid_boundary"),
    "empty boundary": ("multipart/form-data; boundary=", lambda: _form(_slide()), "invalid_boundary"),
    "garbage body": (MULTIPART, lambda: b"\x00\xffgarbage" * 500, "malformed_multipart"),
    "no closing boundary": (MULTIPART, lambda: _form(_options(), _slide())[:-30],
                            "incomplete_multipart"),
    "cut in the headers": (MULTIPART, lambda: _form(_options(), _slide())[:60],
                           "incomplete_multipart"),
    "200 kB part header": (MULTIPART, lambda: _form(
        _part("options", b"{}", extra="X-Junk: " + "j" * 200_000 + "\r\n"), _slide()),
        "part_headers_too_large"),
    "5,000-character file name": (MULTIPART, lambda: _form(_options(), _slide("n" * 5000 + ".svs")),
                                  "invalid_filename"),
    "two slide fields": (MULTIPART, lambda: _form(_options(), _slide(), _slide("b.svs")),
                         "duplicate_field"),
    "a file in another field": (MULTIPART, lambda: _form(_part("file", b"x", "x.svs")),
                                "unexpected_file"),
    "no slide and no slide_sha256": (MULTIPART, lambda: _form(_options()), "missing_slide"),
    "a part without a name": (MULTIPART, lambda: f"--{BOUNDARY}\r\n\r\nx\r\n--{BOUNDARY}--\r\n"
                              .encode(), "malformed_multipart"),
    "a 100 KiB options field": (MULTIPART, lambda: _form(_part("options", b" " * 100_000), _slide()),
                                "field_too_large"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_form(alice: httpx.Client, case: str) -> None:
    content_type, body, code = MALFORMED[case]
    _refused(_post(alice, body(), content_type), 413 if code == "field_too_large" else 400, code)


def test_not_multipart(alice: httpx.Client) -> None:
    _refused(alice.post("/v1/jobs", data={"options": "{}"}), 400, "not_multipart")
    _refused(alice.post("/v1/jobs", json={"slide": "x"}), 400, "not_multipart")


@pytest.mark.parametrize("name", ["C:\\x.svs", "C:x.svs", "../x", "a/b.svs", "x\x00.svs"])
def test_path_like_file_names(alice: httpx.Client, name: str) -> None:
    _refused(_post(alice, _form(_options(), _slide(name))), 400, "invalid_filename")


def test_file_and_slide_sha256_together(alice: httpx.Client, earlier: dict) -> None:
    body = _form(_options(), _part("slide_sha256", earlier["slide"]["sha256"].encode()), _slide())
    _refused(_post(alice, body), 400, "ambiguous_slide")


def test_twenty_thousand_form_fields_are_refused_within_seconds(alice: httpx.Client) -> None:
    body = _form(*(_part(f"f{i}", b"x") for i in range(20_000)), _slide())
    start = time.monotonic()
    _refused(_post(alice, body), 400, "too_many_fields")
    assert time.monotonic() - start < 10


@pytest.mark.parametrize(("options", "words"), [
    ('{"model": "oracle", "mpp": 0.02}', "between 0.05 and 10"),
    ('{"model": "oracle", "mpp": 50}', "between 0.05 and 10"),
    ('{"model": "oracle", "mpp": NaN}', "finite number of µm per pixel, got NaN"),
    ('{"model": "oracle", "mpp": Infinity}', "finite number of µm per pixel, got Infinity"),
])
def test_mpp_outside_the_one_shared_range(alice: httpx.Client, options: str, words: str) -> None:
    response = _post(alice, _form(_part("options", options.encode()), _slide()))
    _refused(response, 422, "invalid_options")
    message = response.json()["error"]["message"]
    assert '"mpp" in options' in message and words in message and "--mpp" not in message


# --------------------------------------------------------------------------- stalls and disconnects

IDLE_S = 2


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server that closes an upload idle for IDLE_S seconds."""
    home = tmp_path_factory.mktemp("impatient")
    with Server(service_env(home, upload_idle_timeout_s=str(IDLE_S)), home / "api.log") as srv:
        yield srv


def _temp_files(server: Server) -> list[Path]:
    return list(server.log.parent.rglob(".upload-*"))


def _start_upload(server: Server) -> socket.socket:
    """A raw connection that sent the headers and the first part of a 1 MB upload."""
    body = _form(_options(), _slide())
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: test\r\nContent-Type: {MULTIPART}\r\n"
                  f"Content-Length: {len(body) + 1_000_000}\r\n\r\n").encode() + body[:3000])
    return sock


def _eventually(check: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_stalled_upload_is_closed_and_its_file_removed(impatient: Server) -> None:
    with _start_upload(impatient) as sock:
        assert _eventually(lambda: bool(_temp_files(impatient)))
        start = time.monotonic()
        sock.settimeout(IDLE_S + 5)
        answer = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            answer += chunk
        assert time.monotonic() - start < IDLE_S + 5
    assert answer.startswith(b"HTTP/1.1 408") and b'"upload_timeout"' in answer
    assert _temp_files(impatient) == []


def test_a_client_that_disconnects_is_not_an_error(impatient: Server) -> None:
    with _start_upload(impatient):
        assert _eventually(lambda: bool(_temp_files(impatient)))
    assert _eventually(lambda: not _temp_files(impatient))
    with impatient.client() as client:
        assert client.get("/healthz").status_code == 200
    log = impatient.log.read_text()
    assert "ERROR" not in log and "Traceback" not in log, log[-2000:]


def test_server_is_up_and_earlier_results_intact(alice: httpx.Client, earlier: dict) -> None:
    assert alice.get("/healthz").json()["status"] == "ok"
    job = alice.get(f"/v1/jobs/{earlier['id']}").json()
    assert job["state"] == "succeeded" and job["results"] == earlier["results"]
    counts = alice.get(earlier["results"]["counts.json"])
    assert counts.status_code == 200 and counts.json()
    rejected = alice.get("/metrics").text
    assert 'hoverserve_uploads_rejected_total{code="unsupported_slide"} 4.0' in rejected


def test_no_request_was_answered_with_a_5xx(alice: httpx.Client) -> None:
    metrics = alice.get("/metrics").text
    answered = [line for line in metrics.splitlines()
                if line.startswith("hoverserve_http_request_seconds_count")]
    assert answered and not [line for line in answered if 'status="5' in line], answered
