"""One owner per store: the queue lock, and a second ``hoverserve serve`` on a store in use.

The lock's rules are checked on a store folder directly; the done-when behaviour over HTTP: a
second server on the same store (busy port, then a free port) while a job runs leaves the job to
its owner, which finishes it with exactly the nuclei of an undisturbed run.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from service.lock import LockHolder, StoreLock
from service.store import Store
from tests.service._server import CMU1, ORACLE, ROOT, Server, service_env, submit, wait_for

OPTIONS = {**ORACLE, "roi": [0, 0, 500, 500], "region_size": 256, "tissue_mask": False}
"""A job of 16 regions: long enough to be running while other servers start."""


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def _lock(store: Store, **kwargs: float) -> StoreLock:
    return StoreLock(store, port=8123, settle_s=0.01, **kwargs)  # type: ignore[arg-type]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --------------------------------------------------------------------------- the lock


def test_the_first_process_holds_the_lock_and_a_second_is_told_who(store: Store) -> None:
    first, second = _lock(store), _lock(store)
    assert first.try_acquire() and first.held
    assert first.previous is None
    assert not second.try_acquire() and not second.held
    holder = second.holder()
    assert holder is not None and holder.token == first.mine.token
    assert holder.port == 8123 and f"pid {holder.pid}" in holder.describe()
    assert "port 8123" in holder.describe()


def test_a_released_lock_passes_on_and_says_the_shutdown_was_clean(store: Store) -> None:
    first, second = _lock(store), _lock(store)
    assert first.try_acquire()
    first.release()
    assert not first.held and second.holder() is None
    assert second.try_acquire()
    assert second.previous is not None and second.previous.released
    assert second.previous.token == first.mine.token


def test_a_holder_whose_heartbeat_stopped_is_taken_over(store: Store) -> None:
    first = _lock(store, heartbeat_s=0.05, stale_beats=2)
    assert first.try_acquire()
    other_host = replace(first.mine, token="x" * 32, host="elsewhere", heartbeat_at=time.time())
    store.write_bytes("locks/queue.json", other_host.to_json())
    second = _lock(store, heartbeat_s=0.05, stale_beats=2)
    assert not second.try_acquire()  # fresh heartbeat from another host: alive
    time.sleep(0.15)
    assert second.try_acquire()
    assert second.previous is not None and second.previous.host == "elsewhere"
    assert not second.previous.released  # it died: its running jobs were interrupted


def test_a_dead_process_on_this_host_frees_the_lock_at_once(store: Store) -> None:
    first = _lock(store)
    assert first.try_acquire()
    dead = replace(first.mine, token="d" * 32, pid=_dead_pid(), heartbeat_at=time.time())
    store.write_bytes("locks/queue.json", dead.to_json())
    second = _lock(store)
    assert second.try_acquire()


def test_a_holder_that_lost_the_lock_notices_at_its_next_heartbeat(store: Store) -> None:
    first = _lock(store)
    assert first.try_acquire() and first.refresh()
    thief = replace(first.mine, token="t" * 32, host="elsewhere", heartbeat_at=time.time())
    store.write_bytes("locks/queue.json", thief.to_json())
    assert not first.refresh()
    assert not first.held
    first.release()  # not ours any more: the thief's lock stays
    assert LockHolder.from_json(store.read_bytes("locks/queue.json")).token == "t" * 32


def test_a_malformed_lock_is_free_and_bad_settings_are_refused(store: Store) -> None:
    store.write_bytes("locks/queue.json", b"{not json")
    assert _lock(store).try_acquire()
    with pytest.raises(ValueError, match="stale_beats"):
        StoreLock(store, stale_beats=1)
    with pytest.raises(ValueError, match="heartbeat_s"):
        StoreLock(store, heartbeat_s=0)


# --------------------------------------------------------------------------- over HTTP


def _features(client: httpx.Client, job: dict) -> list[dict]:
    return json.loads(gzip.decompress(client.get(job["results"]["nuclei.geojson.gz"]).content))[
        "features"]


def _serve(env: dict[str, str], port: int) -> subprocess.CompletedProcess:
    main = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", main, "serve", "--port", str(port)], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def _holder(home: Path) -> LockHolder:
    return LockHolder.from_json((home / "store" / "locks" / "queue.json").read_bytes())


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("owner")


@pytest.fixture(scope="module")
def env(home: Path) -> dict[str, str]:
    # One attempt: a single interruption counted by mistake would fail the job.
    return service_env(home, lock_heartbeat_s="0.5", max_attempts="1")


@pytest.fixture(scope="module")
def owner(home: Path, env: dict[str, str]) -> Iterator[Server]:
    with Server(env, home / "owner.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(owner: Server) -> dict:
    """The job run undisturbed."""
    with owner.client() as client:
        job = wait_for(client, submit(client, CMU1, OPTIONS).json()["id"])
    assert job["state"] == "succeeded", job
    return job


def _wait_for_regions(client: httpx.Client, job_id: str, count: int) -> None:
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{job_id}").json()["progress"]["regions_done"] < count:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_second_serve_never_touches_the_owners_jobs(owner: Server, home: Path, env: dict[str, str],
                                                      reference: dict) -> None:
    with owner.client() as client:
        job = submit(client, CMU1, OPTIONS).json()
        wait_for(client, job["id"], states=("running",))

        # Busy port: one line, non-zero exit, and the store is never opened.
        unused = home / "never-created"
        busy = _serve({**env, "HOVERSERVE_STORE": str(unused)}, owner.port)
        assert busy.returncode != 0
        assert busy.stderr.strip().count("\n") == 0, busy.stderr
        assert f"cannot listen on 127.0.0.1:{owner.port}" in busy.stderr
        assert not unused.exists()
        busy = _serve(env, owner.port)
        assert busy.returncode != 0 and "Traceback" not in busy.stderr
        assert client.get(f"/v1/jobs/{job['id']}").json()["state"] in ("running", "succeeded")

        # Free port: an API-only replica; what it accepts, the owner runs.
        with Server(env, home / "replica.log") as replica, replica.client() as via_replica:
            assert via_replica.get("/readyz").status_code == 200
            small = submit(via_replica, CMU1, {**ORACLE, "roi": [0, 0, 300, 300]}).json()
            assert wait_for(via_replica, small["id"])["state"] == "succeeded"
            assert client.get(f"/v1/jobs/{job['id']}").json()["state"] in ("running", "succeeded")
            assert _holder(home).pid == owner.pid
        assert "API-only replica" in (home / "replica.log").read_text()
        assert _holder(home).pid == owner.pid

        final = wait_for(client, job["id"])
    assert final["state"] == "succeeded", final
    assert final["progress"] == reference["progress"]
    with owner.client() as client:
        assert [f["geometry"] for f in _features(client, final)] == \
            [f["geometry"] for f in _features(client, reference)]


@pytest.mark.slow
def test_a_graceful_restart_costs_nothing_and_a_killed_server_fails_the_job_in_words(
    owner: Server, home: Path, env: dict[str, str], reference: dict
) -> None:
    with owner.client() as client:
        expected = [f["geometry"] for f in _features(client, reference)]
        job = submit(client, CMU1, OPTIONS).json()
        _wait_for_regions(client, job["id"], 1)
    with Server(env, home / "standby.log") as again, again.client() as client:
        assert "API-only replica" in (home / "standby.log").read_text()
        owner.stop()  # SIGTERM, as a service manager's restart: the standby replica takes over
        deadline = time.monotonic() + 10
        while _holder(home).pid != again.pid:
            assert time.monotonic() < deadline, _holder(home)
            time.sleep(0.2)
        resumed = wait_for(client, job["id"])
        assert resumed["state"] == "succeeded", resumed  # with MAX_ATTEMPTS=1: nothing was counted
        assert [f["geometry"] for f in _features(client, resumed)] == expected
        second = submit(client, CMU1, OPTIONS).json()
        _wait_for_regions(client, second["id"], 1)
        again.kill()  # no shutdown of any kind
    with Server(env, home / "after-kill.log") as third, third.client() as client:
        failed = wait_for(client, second["id"])
        assert failed["state"] == "failed" and failed["error"]["code"] == "server_died"
        assert "died — killed or out of memory — once" in failed["error"]["message"]
        retried = client.post(f"/v1/jobs/{second['id']}/retry")
        assert retried.status_code == 202 and retried.json()["state"] == "queued"
        final = wait_for(client, second["id"])
        assert final["state"] == "succeeded", final
        assert final["retries"] == 1
        assert [f["geometry"] for f in _features(client, final)] == expected
