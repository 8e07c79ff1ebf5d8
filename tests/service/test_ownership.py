"""Slides belong to their uploaders, over HTTP with two API keys: another key's hash is the same
404 as an unknown hash, every job resource is its owner's only, DELETE removes every file of a job
and of a slide no job uses any more, and per-key quotas answer 429 with Retry-After."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.deps import key_digest
from tests.service._server import CMU1, ORACLE, SLIDES, Server, service_env, submit, wait_for

pytestmark = pytest.mark.slow

ALICE, BOB = "alice-key-0123456789", "bob-key-9876543210"
SMALL_ROI = {**ORACLE, "roi": [300, 300, 400, 400]}


def _keys() -> str:
    return f"{key_digest(ALICE)},{key_digest(BOB)}"


def _by_hash(client: httpx.Client, sha256: str, options: dict | None = None) -> httpx.Response:
    return client.post("/v1/jobs", files={"slide_sha256": (None, sha256)},
                       data={"options": json.dumps(options or SMALL_ROI)})


def _store_files(home: Path) -> list[Path]:
    return [p for p in (home / "store").rglob("*") if p.is_file()]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ownership")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with Server(service_env(home, api_keys=_keys()), home / "api.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def alice(server: Server) -> Iterator[httpx.Client]:
    with server.client({"Authorization": f"Bearer {ALICE}"}) as client:
        yield client


@pytest.fixture(scope="module")
def bob(server: Server) -> Iterator[httpx.Client]:
    with server.client({"Authorization": f"Bearer {BOB}"}) as client:
        yield client


@pytest.fixture(scope="module")
def alices_job(alice: httpx.Client) -> dict:
    response = submit(alice, CMU1, SMALL_ROI)
    assert response.status_code == 202, response.text
    job = wait_for(alice, response.json()["id"])
    assert job["state"] == "succeeded", job
    return job


def test_another_keys_hash_is_the_same_404_as_an_unknown_hash(
        alice: httpx.Client, bob: httpx.Client, alices_job: dict) -> None:
    sha = alices_job["slide"]["sha256"]
    unknown = "0" * 64
    theirs, nobody = _by_hash(bob, sha), _by_hash(bob, unknown)
    assert theirs.status_code == nobody.status_code == 404
    assert theirs.json()["error"]["code"] == nobody.json()["error"]["code"] == "slide_not_found"
    assert theirs.json()["error"]["message"].replace(sha, "H") == \
        nobody.json()["error"]["message"].replace(unknown, "H")
    # The uploader may reuse her own slide by hash.
    mine = _by_hash(alice, sha)
    assert mine.status_code == 202, mine.text
    assert wait_for(alice, mine.json()["id"])["state"] == "succeeded"


def test_every_job_resource_is_the_owners_only(bob: httpx.Client, alices_job: dict) -> None:
    job_id = alices_job["id"]
    for url in [f"/v1/jobs/{job_id}", *alices_job["results"].values()]:
        response = bob.get(url)
        assert response.status_code == 404, url
        assert response.json()["error"]["code"] == "job_not_found"
    assert bob.delete(f"/v1/jobs/{job_id}").status_code == 404
    assert job_id not in [item["id"] for item in bob.get("/v1/jobs").json()["items"]]


def test_the_same_content_is_stored_once_whatever_its_extension(
        alice: httpx.Client, alices_job: dict, home: Path) -> None:
    with CMU1.open("rb") as fh:
        response = alice.post("/v1/jobs", files={"slide": ("renamed.tiff", fh)},
                              data={"options": json.dumps(SMALL_ROI)})
    assert response.status_code == 202, response.text
    assert response.json()["slide"]["sha256"] == alices_job["slide"]["sha256"]
    assert wait_for(alice, response.json()["id"])["state"] == "succeeded"
    assert len(list((home / "store" / "slides").iterdir())) == 1


def test_delete_removes_every_file_and_the_unreferenced_slide(
        alice: httpx.Client, bob: httpx.Client, alices_job: dict, home: Path) -> None:
    sha = alices_job["slide"]["sha256"]
    # Bob uploads the same content: one stored file, two owners' references.
    bobs = wait_for(bob, submit(bob, CMU1, SMALL_ROI).json()["id"])
    assert bobs["state"] == "succeeded"
    for item in alice.get("/v1/jobs").json()["items"]:
        assert alice.delete(f"/v1/jobs/{item['id']}").status_code == 204
        assert not any(item["id"] in str(p) for p in _store_files(home))
    assert alice.get("/v1/jobs").json()["total"] == 0
    assert _by_hash(alice, sha).json()["error"]["code"] == "slide_not_found"
    assert any(sha in p.name for p in _store_files(home)), "bob's job still uses the slide"

    assert bob.delete(f"/v1/jobs/{bobs['id']}").status_code == 204
    assert not any(sha in str(p) or bobs["id"] in str(p) for p in _store_files(home))
    assert not any(sha in p.name for p in (home / "cache").rglob("*"))
    for client in (alice, bob):
        assert _by_hash(client, sha).status_code == 404


def test_quotas_answer_429_with_retry_after(tmp_path: Path) -> None:
    env = service_env(tmp_path, api_keys=_keys(), quota_active_jobs="1",
                      quota_stored_gb=str(3 * 2**20 / 2**30), quota_retry_after_s="7")
    with Server(env, tmp_path / "api.log") as server, \
            server.client({"Authorization": f"Bearer {ALICE}"}) as alice, \
            server.client({"Authorization": f"Bearer {BOB}"}) as bob:
        running = submit(alice, CMU1, ORACLE)  # the whole slide: still active a moment later
        assert running.status_code == 202, running.text
        second = submit(alice, CMU1, SMALL_ROI)
        assert second.status_code == 429, second.text
        assert second.json()["error"]["code"] == "quota_exceeded"
        assert second.headers["Retry-After"] == "7"
        assert submit(bob, CMU1, SMALL_ROI).status_code == 202  # quotas are per key
        assert alice.delete(f"/v1/jobs/{running.json()['id']}").status_code == 200  # cancel
        wait_for(alice, running.json()["id"])

        # 1.9 MB stored of a 3 MiB quota: a second, different 1.5 MB slide does not fit.
        dicom = submit(alice, SLIDES / "pathml_small_dicom.dcm", {**SMALL_ROI, "mpp": 0.25})
        assert dicom.status_code == 429, dicom.text
        assert dicom.json()["error"]["code"] == "quota_exceeded"
        assert dicom.headers["Retry-After"] == "7"
