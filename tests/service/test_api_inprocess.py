"""Every error the API answers without a running job, served in-process (no server, no queue run).

``create_app`` over a temporary local store and the embedded queue (built, never started), called
through ``httpx.ASGITransport``: each case asserts the status, ``error.code`` and that the message
names the problem, as docs/service.md's error table promises.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tifffile
from fastapi import FastAPI

from service.deps import key_digest, owner_of
from service.jobs import JobOptions, JobRecord, JobState, SlideRef, new_job_id
from service.main import create_app
from service.settings import Settings
from service.store import Store
from tests.service._server import ORACLE, SLIDES, models_dir

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
KEYS = f"{key_digest(ALICE)},{key_digest(BOB)}"
TINY = SLIDES / "synthetic" / "small.svs"  # 16 x 16 px, with its resolution
OPTIONS = {**ORACLE, "tissue_mask": False}
BOUNDARY = "in-process-boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


class Api:
    """Synchronous calls to an app in-process, as one API key (None: no Authorization header)."""

    def __init__(self, app: FastAPI, key: str | None = None) -> None:
        self.app = app
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        headers = {**self.headers, **kwargs.pop("headers", {})}

        async def call() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.request(method, url, headers=headers, **kwargs)

        return asyncio.run(call())  # ASGITransport holds no connection: a loop per call is fine

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)

    def delete(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", url, **kwargs)

    def upload(self, name: str, data: bytes, options: dict | str | None = None) -> httpx.Response:
        text = options if isinstance(options, str) else json.dumps(options or OPTIONS)
        return self.post("/v1/jobs", files={"slide": (name, data)}, data={"options": text})

    def form(self, body: bytes, content_type: str = MULTIPART) -> httpx.Response:
        return self.post("/v1/jobs", content=body, headers={"Content-Type": content_type})


def refused(response: httpx.Response, status: int, code: str, *words: str) -> str:
    """Assert an error answer: status, code, and a message holding every one of ``words``."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and body["error"]["code"] == code, body
    message = body["error"]["message"]
    for word in words:
        assert word in message, message
    return message


# --------------------------------------------------------------------------- apps


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models_dir(tmp_path_factory.mktemp("models"))


def settings_for(home: Path, models: Path, **overrides: Any) -> Settings:
    """Settings of an app under ``home`` with the two test keys and the oracle model."""
    values: dict[str, Any] = {"store": str(home / "store"), "cache_dir": home / "cache",
                              "models_dir": models, "api_keys": KEYS, "max_upload_mb": 3.0}
    return Settings(**{**values, **overrides})


def make_app(home: Path, models: Path, **overrides: Any) -> tuple[FastAPI, Store]:
    settings = settings_for(home, models, **overrides)
    store = Store(settings.store, cache_dir=settings.cache_dir)
    return create_app(settings, store=store), store


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, models: Path) -> tuple[FastAPI, Store]:
    return make_app(tmp_path_factory.mktemp("api"), models)


@pytest.fixture(scope="module")
def store(served: tuple[FastAPI, Store]) -> Store:
    return served[1]


@pytest.fixture(scope="module")
def alice(served: tuple[FastAPI, Store]) -> Api:
    return Api(served[0], ALICE)


@pytest.fixture(scope="module")
def bob(served: tuple[FastAPI, Store]) -> Api:
    return Api(served[0], BOB)


def owner(key: str) -> str:
    return owner_of(f"Bearer {key}", frozenset(KEYS.split(",")))


def stored_job(store: Store, key: str, state: JobState = JobState.QUEUED, **fields: Any) -> JobRecord:
    """A job record written straight to the store (no slide behind it: enough for the API)."""
    slide = fields.pop("slide", SlideRef(sha256="ab" * 32, ext="svs", name="a.svs", bytes=100))
    record = JobRecord(id=new_job_id(), owner=owner(key), state=state, slide=slide,
                       options=JobOptions(**ORACLE), model="oracle", **fields)
    store.create_record(record)
    return record


@pytest.fixture(scope="module")
def uploaded(alice: Api) -> dict:
    """A job of Alice's on the tiny slide, accepted and left queued."""
    response = alice.upload("small.svs", TINY.read_bytes())
    assert response.status_code == 202, response.text
    return response.json()


# --------------------------------------------------------------------------- the app itself


def test_the_app_serves_requests_without_a_lifespan(alice: Api, uploaded: dict) -> None:
    assert alice.get("/healthz").json() == {"status": "ok", "checks": {}}
    assert uploaded["state"] == "queued" and uploaded["model"] == "oracle"
    assert alice.get(f"/v1/jobs/{uploaded['id']}").json()["id"] == uploaded["id"]
    assert "oracle" in [m["name"] for m in alice.get("/v1/models").json()["models"]]


def test_readyz_is_503_while_the_queue_is_not_running(alice: Api) -> None:
    response = alice.get("/readyz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable",
                               "checks": {"store": "ok", "queue": "error: not running"}}


def test_two_apps_in_one_process_share_nothing(tmp_path: Path, models: Path, alice: Api,
                                               uploaded: dict) -> None:
    app, _ = make_app(tmp_path, models, api_keys=None)
    anonymous = Api(app)
    assert anonymous.get("/v1/jobs").json()["total"] == 0  # no keys here, and not the other store
    refused(anonymous.get(f"/v1/jobs/{uploaded['id']}"), 404, "job_not_found")
    refused(Api(alice.app).get("/v1/jobs"), 401, "unauthorized")


def test_a_given_queue_is_the_one_jobs_go_to(tmp_path: Path, models: Path) -> None:
    class Recorder:
        kind = "recording"

        def __init__(self) -> None:
            self.submitted: list[str] = []
            self.cancelled: list[str] = []

        def submit(self, job_id: str) -> None:
            self.submitted.append(job_id)

        def cancel(self, job_id: str) -> int:
            self.cancelled.append(job_id)
            return 0

        def ready(self) -> bool:
            return True

    settings = settings_for(tmp_path, models)
    queue = Recorder()
    api = Api(create_app(settings, queue=queue), ALICE)
    job = api.upload("small.svs", TINY.read_bytes()).json()
    assert api.delete(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
    assert api.post(f"/v1/jobs/{job['id']}/retry").status_code == 202
    assert queue.submitted == [job["id"], job["id"]] and queue.cancelled == [job["id"]]
    assert api.get("/readyz").json()["status"] == "ok"


def test_the_lifespan_runs_the_queue_while_the_app_serves(tmp_path: Path, models: Path) -> None:
    app, store = make_app(tmp_path, models)
    queue = app.state.services.queue

    async def serve() -> tuple[dict, str]:
        async with app.router.lifespan_context(app):  # what uvicorn runs at start and stop
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                ready = (await client.get("/readyz")).json()
            return ready, queue.role

    ready, role = asyncio.run(serve())
    assert ready == {"status": "ok", "checks": {"store": "ok", "queue": "ok"}}
    assert role == "owner"  # it ran the store's queue while serving
    assert store.exists("owners/complete")  # the start-up migration ran
    assert not queue.ready() and queue.role == "replica"  # stopped, its lock released


def test_settings_must_be_settings(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="Settings"):
        create_app({"store": str(tmp_path)})  # type: ignore[arg-type]


def test_a_store_other_than_the_settings_one_is_refused(tmp_path: Path, models: Path) -> None:
    other = Store(str(tmp_path / "elsewhere"), cache_dir=tmp_path / "cache")
    with pytest.raises(ValueError, match=r"elsewhere.* is not the settings' store"):
        create_app(settings_for(tmp_path, models), store=other)


# --------------------------------------------------------------------------- 401, 404


def test_a_missing_key_is_401(served: tuple[FastAPI, Store]) -> None:
    response = Api(served[0]).get("/v1/jobs")
    refused(response, 401, "unauthorized", "API key is required", "Bearer")
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_malformed_authorization_header_is_401(served: tuple[FastAPI, Store]) -> None:
    api = Api(served[0])
    refused(api.get("/v1/jobs", headers={"Authorization": f"Basic {ALICE}"}), 401, "unauthorized",
            "must be 'Bearer <key>'")
    refused(api.get("/v1/jobs", headers={"Authorization": "Bearer "}), 401, "unauthorized",
            "must be 'Bearer <key>'")


def test_an_unknown_key_is_401_even_for_uploads(served: tuple[FastAPI, Store]) -> None:
    stranger = Api(served[0], "not-a-key")
    refused(stranger.get("/v1/jobs"), 401, "unauthorized", "unknown API key")
    refused(stranger.upload("small.svs", TINY.read_bytes()), 401, "unauthorized", "unknown API key")


def test_an_unknown_job_is_404(alice: Api) -> None:
    missing = "0" * 32
    refused(alice.get(f"/v1/jobs/{missing}"), 404, "job_not_found", missing)
    refused(alice.get("/v1/jobs/not-a-job-id"), 404, "job_not_found", "not-a-job-id")
    refused(alice.delete(f"/v1/jobs/{missing}"), 404, "job_not_found", missing)
    refused(alice.post(f"/v1/jobs/{missing}/retry"), 404, "job_not_found", missing)


def test_another_keys_job_is_404_on_every_route(bob: Api, uploaded: dict) -> None:
    job = uploaded["id"]
    for method, url in [("GET", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/results/counts.json"),
                        ("DELETE", f"/v1/jobs/{job}"), ("POST", f"/v1/jobs/{job}/retry"),
                        ("GET", f"/v1/jobs/{job}/slide.dzi"),
                        ("GET", f"/v1/jobs/{job}/slide_files/0/0_0.jpeg"),
                        ("GET", f"/v1/jobs/{job}/nuclei?bbox=0,0,10,10"),
                        ("GET", f"/v1/jobs/{job}/nuclei/density")]:
        refused(bob.request(method, url), 404, "job_not_found", job)
    assert bob.get("/v1/jobs").json()["total"] == 0


def test_an_unknown_route_is_404_not_found(alice: Api) -> None:
    refused(alice.get("/v1/nothing-here"), 404, "not_found", "Not Found")
    refused(alice.get("/web/evil.js"), 404, "not_found", "evil.js")
    refused(alice.get("/jobs/not-a-job"), 404, "job_not_found", "not-a-job")


def test_a_method_a_route_does_not_have_is_405(alice: Api) -> None:
    refused(alice.request("PUT", "/v1/jobs"), 405, "method_not_allowed", "Method Not Allowed")


# --------------------------------------------------------------------------- results and retries


def test_results_of_an_unfinished_job_are_409(alice: Api, uploaded: dict) -> None:
    job = uploaded["id"]
    refused(alice.get(f"/v1/jobs/{job}/results/counts.json"), 409, "job_not_finished", job, "queued")
    refused(alice.get(f"/v1/jobs/{job}/nuclei?bbox=0,0,10,10"), 409, "job_not_finished", job)
    refused(alice.get(f"/v1/jobs/{job}/nuclei/density"), 409, "job_not_finished", job)


def test_a_result_the_job_does_not_have_is_404(alice: Api, store: Store) -> None:
    job = stored_job(store, ALICE, JobState.SUCCEEDED, results=["counts.json", "overlay.png"])
    refused(alice.get(f"/v1/jobs/{job.id}/results/job.json"), 404, "result_not_found",
            "'job.json'", "counts.json, overlay.png")


def test_expired_results_are_410(alice: Api, store: Store) -> None:
    job = stored_job(store, ALICE, JobState.SUCCEEDED, results=["counts.json"], expired=True)
    refused(alice.get(f"/v1/jobs/{job.id}/results/counts.json"), 410, "results_expired", job.id,
            "expired")
    refused(alice.get(f"/v1/jobs/{job.id}/nuclei/density"), 410, "results_expired", job.id)


@pytest.mark.parametrize("state", [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED])
def test_only_failed_or_cancelled_jobs_can_be_retried(alice: Api, store: Store,
                                                      state: JobState) -> None:
    job = stored_job(store, ALICE, state)
    refused(alice.post(f"/v1/jobs/{job.id}/retry"), 409, "job_not_retryable", job.id, state.value,
            "failed or cancelled")


def test_a_failed_job_is_retried(alice: Api, store: Store) -> None:
    job = stored_job(store, ALICE, JobState.FAILED)
    response = alice.post(f"/v1/jobs/{job.id}/retry")
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "queued" and response.json()["retries"] == 1


# --------------------------------------------------------------------------- query parameters


@pytest.mark.parametrize(("query", "words"), [
    ("limit=0", ["limit", "greater than or equal to 1"]),
    ("limit=501", ["limit", "less than or equal to 500"]),
    ("offset=-1", ["offset"]),
    ("state=sleeping", ["state", "'queued'"]),
])
def test_bad_list_parameters_are_422(alice: Api, query: str, words: list[str]) -> None:
    refused(alice.get(f"/v1/jobs?{query}"), 422, "invalid_request", *words)


@pytest.mark.parametrize("bbox", ["1,2,3", "a,b,c,d", "0,0,nan,10", "10,0,5,10", "0,10,10,10"])
def test_a_bad_bbox_is_422(alice: Api, uploaded: dict, bbox: str) -> None:
    refused(alice.get(f"/v1/jobs/{uploaded['id']}/nuclei", params={"bbox": bbox}), 422,
            "invalid_bbox", bbox)


def test_a_tile_outside_the_pyramid_or_in_another_format_is_404(alice: Api, uploaded: dict) -> None:
    job = uploaded["id"]
    assert alice.get(f"/v1/jobs/{job}/slide.dzi").status_code == 200
    refused(alice.get(f"/v1/jobs/{job}/slide_files/0/0_0.gif"), 404, "tile_not_found", "'gif'")
    refused(alice.get(f"/v1/jobs/{job}/slide_files/99/0_0.png"), 404, "tile_not_found", "99")


# --------------------------------------------------------------------------- options


OPTION_CASES = {
    "not JSON": ("{model: oracle}", "options: Invalid JSON"),
    "a JSON list": ("[1, 2]", "options: Input should be an object"),
    "an unknown option": ('{"colour": "blue"}', '"colour" in options: Extra inputs are not permitted'),
    "mpp NaN": ('{"mpp": NaN}', '"mpp" in options: must be a finite number of µm per pixel, got NaN'),
    "mpp Infinity": ('{"mpp": Infinity}', "got Infinity"),
    "mpp 0.01": ('{"mpp": 0.01}', '"mpp" in options: must be between 0.05 and 10', "got 0.01"),
    "mpp 100": ('{"mpp": 100}', '"mpp" in options: must be between 0.05 and 10', "got 100"),
    "mpp a word": ('{"mpp": "fine"}', '"mpp" in options: Input should be a valid number'),
    "roi negative width": ('{"roi": [0, 0, -5, 10]}', "roi wants x, y >= 0 and w, h > 0, got [0, 0, -5, 10]"),
    "roi negative x": ('{"roi": [-1, 0, 5, 10]}', "roi wants x, y >= 0"),
    "roi three numbers": ('{"roi": [0, 0, 10]}', '"roi.3" in options: Field required'),
    "roi beyond 2**31": ('{"roi": [0, 0, 4294967296, 10]}', "at most 2147483647 px"),
    "region_size 32": ('{"region_size": 32}', '"region_size" in options', "64"),
    "region_size 10000": ('{"region_size": 10000}', "8192"),
    "min_class_prob 1.5": ('{"min_class_prob": 1.5}', '"min_class_prob" in options', "or equal to 1"),
    "min_class_prob -0.1": ('{"min_class_prob": -0.1}', '"min_class_prob" in options', "or equal to 0"),
    "min_class_prob NaN": ('{"min_class_prob": NaN}', '"min_class_prob" in options', "finite number"),
    "objects polygons": ('{"objects": "polygons"}', '"objects" in options', "'detections' or 'cells'"),
    "tissue_mask maybe": ('{"tissue_mask": "maybe"}', '"tissue_mask" in options', "valid boolean"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_each_bad_option_is_422_naming_it(alice: Api, case: str) -> None:
    text, *words = OPTION_CASES[case]
    refused(alice.upload("small.svs", TINY.read_bytes(), text), 422, "invalid_options", *words)


def test_an_roi_outside_the_slide_is_422(alice: Api) -> None:
    refused(alice.upload("small.svs", TINY.read_bytes(), {**OPTIONS, "roi": [100, 0, 10, 10]}),
            422, "invalid_options", "roi [100, 0, 10, 10] lies outside the slide (16 x 16 px)")


def test_an_unknown_model_is_422_listing_the_installed_ones(alice: Api) -> None:
    refused(alice.upload("small.svs", TINY.read_bytes(), {"model": "no-such-model"}), 422,
            "unknown_model", "'no-such-model'", "oracle")


# --------------------------------------------------------------------------- the slide


def test_no_slide_is_400(alice: Api) -> None:
    refused(alice.post("/v1/jobs", files={"options": (None, json.dumps(OPTIONS))}), 400,
            "missing_slide", "'slide'")


def test_a_file_and_a_hash_together_are_400(alice: Api, uploaded: dict) -> None:
    body = _form(_part("options", json.dumps(OPTIONS).encode()),
                 _part("slide_sha256", uploaded["slide"]["sha256"].encode()),
                 _part("slide", TINY.read_bytes(), "small.svs"))
    refused(alice.form(body), 400, "ambiguous_slide", "slide_sha256")


def test_a_hash_that_is_no_sha256_is_400(alice: Api) -> None:
    response = alice.post("/v1/jobs", data={"slide_sha256": "abc123", "options": json.dumps(OPTIONS)},
                          files={"unused": (None, "")})
    refused(response, 400, "invalid_sha256", "64 hex digits")


def test_an_unknown_or_another_keys_hash_is_404(alice: Api, bob: Api, uploaded: dict) -> None:
    data = {"options": json.dumps(OPTIONS)}
    unknown = "cd" * 32
    refused(alice.post("/v1/jobs", data={**data, "slide_sha256": unknown}, files={"x": (None, "")}),
            404, "slide_not_found", unknown)
    alices = uploaded["slide"]["sha256"]
    refused(bob.post("/v1/jobs", data={**data, "slide_sha256": alices}, files={"x": (None, "")}),
            404, "slide_not_found", alices, "among your uploads")
    reused = alice.post("/v1/jobs", data={**data, "slide_sha256": alices}, files={"x": (None, "")})
    assert reused.status_code == 202, reused.text


def test_an_empty_file_is_400(alice: Api) -> None:
    refused(alice.upload("empty.svs", b""), 400, "empty_upload", "empty (0 bytes)")


def test_text_is_no_slide(alice: Api) -> None:
    refused(alice.upload("notes.svs", b"these are my notes, not a slide\n" * 20), 422,
            "unsupported_slide", "not a slide format", "text file")


def test_a_grey_16_bit_image_is_no_rgb_slide(alice: Api) -> None:
    grey16 = SLIDES / "not_he" / "pathml_smalltif.tif"
    refused(alice.upload("grey.tif", grey16.read_bytes()), 422, "not_rgb_slide", "uint16",
            "8-bit RGB")


def test_an_image_without_resolution_needs_mpp(alice: Api) -> None:
    png = SLIDES / "tiles" / "no-tissue.png"
    message = refused(alice.upload("tile.png", png.read_bytes()), 422, "missing_resolution",
                      '"mpp"')
    assert "--mpp" not in message and "/" not in message.replace("µm/px", "")


def test_a_slide_too_large_to_plan_is_422(alice: Api, tmp_path: Path) -> None:
    side, tile = 16_896, 1024  # one level of 285 Mpx: over the 268 Mpx planning budget
    path = tmp_path / "flat.tif"
    blank = np.full((tile, tile, 3), 255, np.uint8)
    tifffile.imwrite(path, (blank for _ in range((side // tile + 1) ** 2)), shape=(side, side, 3),
                     dtype=np.uint8, tile=(tile, tile), compression="zlib", photometric="rgb",
                     resolution=(20_000, 20_000), resolutionunit="CENTIMETER")
    refused(alice.upload("flat.tif", path.read_bytes()), 422, "slide_too_large", "16,896×16,896",
            "roi")


@pytest.mark.parametrize(("name", "words"), [
    ("../x.svs", "contains a path"), ("a/b.svs", "contains a path"), ("C:\\x.svs", "contains a path"),
    ("x\x00.svs", "control character"), ("n" * 300 + ".svs", "304 characters long"),
])
def test_a_file_name_that_could_be_a_path_is_400(alice: Api, name: str, words: str) -> None:
    refused(alice.form(_form(_part("slide", TINY.read_bytes(), name))), 400, "invalid_filename",
            words)


# --------------------------------------------------------------------------- malformed forms


def _part(name: str, data: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n".encode() + data \
        + b"\r\n"


def _form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def _slide_form() -> bytes:
    return _form(_part("options", json.dumps(OPTIONS).encode()),
                 _part("slide", TINY.read_bytes(), "small.svs"))


def test_a_body_that_is_not_multipart_is_400(alice: Api) -> None:
    refused(alice.post("/v1/jobs", json={"slide": "x"}), 400, "not_multipart", "multipart/form-data")


@pytest.mark.parametrize("content_type", ["multipart/form-data", "multipart/form-data; boundary=",
                                          f"multipart/form-data; boundary={'b' * 71}"])
def test_a_missing_empty_or_long_boundary_is_400(alice: Api, content_type: str) -> None:
    refused(alice.form(_slide_form(), content_type), 400, "invalid_boundary", "boundary")


def test_a_body_that_does_not_parse_is_400(alice: Api) -> None:
    refused(alice.form(b"\x00\xffgarbage" * 500), 400, "malformed_multipart",
            "malformed multipart/form-data body")


def test_a_body_cut_before_its_closing_boundary_is_400(alice: Api) -> None:
    refused(alice.form(_slide_form()[:-30]), 400, "incomplete_multipart", "before its closing boundary")


def test_huge_part_headers_are_400(alice: Api) -> None:
    body = _form(_part("options", b"{}", extra="X-Junk: " + "j" * 20_000 + "\r\n"))
    refused(alice.form(body), 400, "part_headers_too_large", "headers")


def test_seventeen_parts_are_400(alice: Api) -> None:
    body = _form(*(_part(f"f{i}", b"x") for i in range(17)))
    refused(alice.form(body), 400, "too_many_fields", "more than 16 fields")


def test_a_field_sent_twice_is_400(alice: Api) -> None:
    body = _form(_part("slide", TINY.read_bytes(), "a.svs"), _part("slide", TINY.read_bytes(), "b.svs"))
    refused(alice.form(body), 400, "duplicate_field", "slide")


def test_a_file_in_another_field_is_400(alice: Api) -> None:
    refused(alice.form(_form(_part("file", b"x", "x.svs"))), 400, "unexpected_file", "file")


def test_a_field_over_64_kib_is_413(alice: Api) -> None:
    refused(alice.form(_form(_part("options", b" " * 100_000))), 413, "field_too_large",
            "'options'", "64 KiB")


def test_fields_over_256_kib_in_all_are_413(alice: Api) -> None:
    body = _form(*(_part(f"f{i}", b"x" * 60_000) for i in range(5)))
    refused(alice.form(body), 413, "form_too_large", "256 KiB")


# --------------------------------------------------------------------------- limits and quotas


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, models: Path) -> tuple[FastAPI, Store]:
    """An app with a 2 KiB upload limit, one active job per key and a 0.5 s idle timeout."""
    return make_app(tmp_path_factory.mktemp("tight"), models, max_upload_mb=2 / 1024,
                    quota_active_jobs=1, upload_idle_timeout_s=0.5, quota_retry_after_s=7)


def test_an_upload_over_the_limit_is_413(tight: tuple[FastAPI, Store]) -> None:
    refused(Api(tight[0], ALICE).upload("small.svs", TINY.read_bytes()), 413, "upload_too_large",
            "exceeds the limit")


def test_an_upload_over_the_limit_without_length_is_413(tight: tuple[FastAPI, Store]) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield _part("slide", b"", "big.svs")[:-2]
        for _ in range(8):
            yield b"\0" * 1024
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    refused(Api(tight[0], ALICE).form(body()), 413, "upload_too_large",  # type: ignore[arg-type]
            "exceeds the limit")


def test_an_upload_that_stalls_is_408(tight: tuple[FastAPI, Store]) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield _part("options", json.dumps(OPTIONS).encode())
        await asyncio.sleep(10)
        yield _form()

    refused(Api(tight[0], ALICE).form(body()), 408, "upload_timeout",  # type: ignore[arg-type]
            "0.5 s")


def test_the_active_job_quota_is_429_with_retry_after(tight: tuple[FastAPI, Store]) -> None:
    app, tight_store = tight
    stored_job(tight_store, BOB, JobState.RUNNING)
    response = Api(app, BOB).upload("small.svs", TINY.read_bytes())
    refused(response, 429, "quota_exceeded", "1 queued or running jobs (quota 1)")
    assert response.headers["retry-after"] == "7"


def test_the_stored_bytes_quota_is_429(tmp_path: Path, models: Path) -> None:
    app, full = make_app(tmp_path, models, quota_stored_gb=1e-6)  # about 1 KiB
    big = SlideRef(sha256="ef" * 32, ext="svs", name="big.svs", bytes=10_000)
    stored_job(full, ALICE, JobState.SUCCEEDED, slide=big)
    refused(Api(app, ALICE).upload("small.svs", TINY.read_bytes()), 429, "quota_exceeded",
            "your stored slides take", "delete finished jobs")
