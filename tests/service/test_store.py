"""The store (local directory): region tables round-trip, slides are stored once, progress comes
from markers, records change only through allowed transitions, retention expires old jobs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from service.errors import JobNotFound
from service.jobs import JobOptions, JobRecord, JobState, SlideRef, new_job_id, transition
from service.retention import sweep
from service.slides import SlideRegistry
from service.store import Store, load_table, save_table
from worker.nuclei import NucleusTable


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


def _record(store: Store, sha: str = "a" * 64, **fields) -> JobRecord:
    record = JobRecord(id=new_job_id(), owner="anonymous", model="oracle", options=JobOptions(),
                       slide=SlideRef(sha256=sha, ext="svs", name="s.svs", bytes=3), **fields)
    store.write_record(record)
    SlideRegistry(store).add_ref(sha, record.owner, record.id)  # as the API does for every job
    return record


def _table(n: int) -> NucleusTable:
    rng = np.random.default_rng(n)
    lengths = np.full(n, 4)
    return NucleusTable(
        centroid=rng.random((n, 2)), bbox=rng.random((n, 4)),
        area_um2=rng.random(n).astype(np.float32), perimeter_um=rng.random(n).astype(np.float32),
        solidity=np.ones(n, np.float32), eccentricity=np.zeros(n, np.float32),
        type=np.arange(n, dtype=np.int16) % 3, type_prob=np.ones(n, np.float32),
        np_prob=np.ones(n, np.float32), vertices=rng.random((4 * n, 2)).astype(np.float32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        region=np.full(n, 7, np.int32))


@pytest.mark.parametrize("n", [0, 1, 5])
def test_region_tables_round_trip_with_metadata(n: int) -> None:
    table = _table(n) if n else NucleusTable()
    back, meta = load_table(save_table(table, worker="w1", seconds=1.5))
    assert meta == {"worker": "w1", "seconds": 1.5}
    for name in ("centroid", "vertices", "offsets", "type", "region", "area_um2"):
        np.testing.assert_array_equal(getattr(back, name), getattr(table, name))
        assert getattr(back, name).dtype == getattr(table, name).dtype


def test_region_writes_are_idempotent_and_feed_progress(store: Store) -> None:
    record = _record(store)
    data = save_table(_table(3))
    for _ in range(2):  # a duplicated task writes the same thing again
        store.write_region(record.id, 0, data, 3)
    store.write_region(record.id, 4, save_table(_table(2)), 2)
    progress = store.progress(record.id)
    assert progress.regions == 2 and progress.nuclei == 5
    assert store.has_region(record.id, 4) and not store.has_region(record.id, 1)


def test_slides_are_stored_once_per_content(store: Store, tmp_path: Path) -> None:
    slide = tmp_path / "upload.bin"
    slide.write_bytes(b"abc")
    assert store.put_slide(slide, "b" * 64, "svs") is True
    assert store.put_slide(slide, "b" * 64, "svs") is False
    assert store.names("slides") == [f"{'b' * 64}.svs"]
    assert store.local_slide("b" * 64, "svs").read_bytes() == b"abc"


def test_unknown_and_malformed_job_ids_are_not_found(store: Store) -> None:
    with pytest.raises(JobNotFound):
        store.read_record("0" * 32)
    with pytest.raises(JobNotFound):
        store.read_record("../../etc")


def test_owner_index_lists_an_owners_jobs_newest_first(store: Store) -> None:
    jobs = [JobRecord(id=new_job_id(), owner=owner, model="oracle", options=JobOptions(),
                      created_at=1_700_000_000 + age, slide=SlideRef(sha256="a" * 64, ext="svs",
                                                                     name="s.svs", bytes=3))
            for age, owner in enumerate(["alice", "bob", "alice", "alice"])]
    for record in jobs:
        store.create_record(record)
    assert store.owner_jobs("alice") == [jobs[3].id, jobs[2].id, jobs[0].id]
    assert store.owner_jobs("bob") == [jobs[1].id]
    assert store.owner_jobs("carol") == []
    store.delete_job(jobs[2])
    assert store.owner_jobs("alice") == [jobs[3].id, jobs[0].id]


def test_owner_index_is_built_once_for_records_written_before_it(store: Store) -> None:
    old = [_record(store) for _ in range(3)]  # records only, as stores before the index held
    assert store.owner_jobs("anonymous") == []
    assert store.build_owner_index() == 3
    assert sorted(store.owner_jobs("anonymous")) == sorted(r.id for r in old)
    assert store.build_owner_index() == 0  # marked complete: later start-ups list nothing


def test_terminal_states_are_final_and_cancel_wins(store: Store) -> None:
    record = _record(store)
    assert transition(record, JobState.RUNNING) and record.started_at is not None
    assert transition(record, JobState.SUCCEEDED) and record.finished_at is not None
    assert not transition(record, JobState.RUNNING)
    assert record.state is JobState.SUCCEEDED
    other = _record(store)
    store.mark_cancelled(other.id)
    after = store.update_record(other.id, lambda rec: transition(rec, JobState.RUNNING))
    assert after.state is JobState.CANCELLED


def test_retention_expires_old_finished_jobs_and_their_slides(store: Store, tmp_path: Path) -> None:
    slide = tmp_path / "s.bin"
    slide.write_bytes(b"xyz")
    store.put_slide(slide, "c" * 64, "svs")
    old = _record(store, "c" * 64, state=JobState.SUCCEEDED, finished_at=time.time() - 7200,
                  results=["counts.json"])
    store.write_bytes(store.result_key(old.id, "counts.json"), b"{}")
    fresh = _record(store, "d" * 64, state=JobState.SUCCEEDED, finished_at=time.time())
    running = _record(store, "c" * 64, state=JobState.RUNNING)
    assert sweep(store, max_age_s=3600) == [old.id]
    expired = store.read_record(old.id)
    assert expired.expired and expired.results == []
    assert not store.exists(store.result_key(old.id, "counts.json"))
    assert store.exists(store.slide_key("c" * 64, "svs"))  # still used by the running job
    assert not store.read_record(fresh.id).expired
    store.update_record(running.id, lambda rec: transition(rec, JobState.FAILED))
    store.update_record(running.id, lambda rec: setattr(rec, "finished_at", time.time() - 7200))
    assert sweep(store, max_age_s=3600) == [running.id]
    assert not store.exists(store.slide_key("c" * 64, "svs"))
