"""Slide references (local store, in process): a key may start jobs only from slides its own jobs
use, a slide is stored once per content, and deleting or expiring the last job that uses a slide
removes every file of the job and the slide with it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from service.jobs import JobOptions, JobRecord, JobState, SlideRef, new_job_id
from service.slides import SlideRegistry, is_sha256
from service.store import Store

SHA = "ab" * 32


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")


@pytest.fixture
def registry(store: Store) -> SlideRegistry:
    return SlideRegistry(store)


def _job(store: Store, registry: SlideRegistry, owner: str, sha: str = SHA,
         state: JobState = JobState.SUCCEEDED) -> JobRecord:
    record = JobRecord(id=new_job_id(), owner=owner, model="oracle", options=JobOptions(), state=state,
                       slide=SlideRef(sha256=sha, ext="svs", name="patient-42.svs", bytes=5))
    store.create_record(record)
    registry.add_ref(sha, owner, record.id)
    store.write_bytes(store.result_key(record.id, "counts.json"), b"{}")
    store.write_bytes(store.job_key(record.id, "plan.npz"), b"x" * 1000)
    return record


def _put_slide(store: Store, tmp_path: Path, sha: str = SHA) -> None:
    source = tmp_path / "upload.svs"
    source.write_bytes(b"slide")
    store.put_slide(source, sha, "svs")


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_sha256_shape() -> None:
    assert is_sha256(SHA)
    assert not is_sha256(SHA.upper()) and not is_sha256(SHA[:-1]) and not is_sha256("../" + SHA[3:])


def test_only_a_key_whose_jobs_use_a_slide_owns_it(store: Store, registry: SlideRegistry,
                                                    tmp_path: Path) -> None:
    _put_slide(store, tmp_path)
    _job(store, registry, "alice")
    assert registry.owns(SHA, "alice")
    assert not registry.owns(SHA, "bob")
    assert not registry.owns("cd" * 32, "alice")
    assert registry.stored_ext(SHA) == "svs"
    assert registry.stored_ext("cd" * 32) is None


def test_deleting_the_last_job_removes_every_file_and_the_slide(
        store: Store, registry: SlideRegistry, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _put_slide(store, tmp_path)
    first, second = _job(store, registry, "alice"), _job(store, registry, "bob")
    root = tmp_path / "store"

    with caplog.at_level(logging.INFO, logger="service.slides"):
        report = registry.delete_job(first)
    assert not report.slide_removed  # bob's job still uses it
    assert report.bytes_freed >= 1000
    assert store.exists(store.slide_key(SHA, "svs"))
    assert not any(first.id in name for name in _files(root))
    assert not registry.owns(SHA, "alice")
    line = next(r.getMessage() for r in caplog.records if first.id in r.getMessage())
    assert "bytes freed" in line and "owner" in line

    report = registry.delete_job(second)
    assert report.slide_removed and report.bytes_freed >= 1000 + len(b"slide")
    assert not store.exists(store.slide_key(SHA, "svs"))
    assert not registry.owns(SHA, "bob")
    # Nothing of either job or of the slide remains, only the store's own bookkeeping.
    assert [f for f in _files(root) if SHA in f or first.id in f or second.id in f] == []


def test_cached_copies_go_with_the_slide(store: Store, registry: SlideRegistry, tmp_path: Path) -> None:
    _put_slide(store, tmp_path)
    store.cache_dir.mkdir(parents=True)
    (store.cache_dir / f"{SHA}.svs").write_bytes(b"slide")
    registry.delete_job(_job(store, registry, "alice"))
    assert list(store.cache_dir.iterdir()) == []


def test_expiry_keeps_a_nameless_tombstone_and_releases_the_slide(
        store: Store, registry: SlideRegistry, tmp_path: Path) -> None:
    _put_slide(store, tmp_path)
    record = _job(store, registry, "alice")
    registry.expire_job(record)
    tombstone = store.read_record(record.id)
    assert tombstone.expired and tombstone.results == [] and tombstone.slide.name == ""
    assert store.names(store.job_key(record.id)) == ["job.json"]
    assert not store.exists(store.slide_key(SHA, "svs"))
    assert not registry.owns(SHA, "alice")


def test_references_are_built_once_for_stores_written_before_them(
        store: Store, registry: SlideRegistry) -> None:
    old = [JobRecord(id=new_job_id(), owner=owner, model="oracle", options=JobOptions(),
                     slide=SlideRef(sha256=SHA, ext="svs", name="s.svs", bytes=5))
           for owner in ("alice", "bob")]
    for record in old:
        store.create_record(record)
    assert registry.build_refs() == 2
    assert registry.owns(SHA, "alice") and registry.owns(SHA, "bob")
    assert registry.build_refs() == 0
