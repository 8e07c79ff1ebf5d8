"""The job's task functions, run in-process against a real local store: plan, regions, results,
cancellation and failure, as both queues call them.

A synthetic TIFF (tests._synthetic: its colours encode known nuclei) and the oracle model that
decodes them keep every task fast; only the public task functions and the store are used, never
the names of the files a task writes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from service.catalog import Catalog
from service.errors import JobNotFound, UnknownModel
from service.jobs import JobOptions, JobRecord, JobState, SlideRef, new_job_id, transition
from service.queue.retry import WorkerDied
from service.queue.tasks import (
    TaskContext,
    cleanup_cancelled,
    fail_job,
    finalize_job,
    prepare_job,
    run_region,
    set_context,
)
from service.settings import Settings
from service.store import Store
from tests._synthetic import draw_ellipses, encode_slide, write_tiff
from tests.service._server import models_dir
from worker.errors import InferenceError, UnsupportedSlide

SIDE = 512  # px at 0.25 µm/px, the oracle's resolution
REGION = 256  # model px: a 2 x 2 grid of regions
NUCLEI = 40


@pytest.fixture(scope="module")
def drawn() -> tuple[np.ndarray, np.ndarray]:
    """The slide's nuclei: instance map and class per instance id (1 Alpha, 2 Beta)."""
    return draw_ellipses((SIDE, SIDE), NUCLEI, seed=3)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory, drawn: tuple[np.ndarray, np.ndarray]) -> Path:
    path = tmp_path_factory.mktemp("slide") / "nuclei.tiff"
    return write_tiff(path, encode_slide(*drawn), mpp=0.25)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return models_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture
def store(tmp_path: Path, models: Path) -> Store:
    """A fresh local store, installed as the tasks' context."""
    settings = Settings(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache",
                        models_dir=models, batch_size=4, api_keys=None)
    store = Store(settings.store, cache_dir=settings.cache_dir)
    set_context(TaskContext(store=store, catalog=Catalog(models), settings=settings,
                            worker_name="test-worker"))
    return store


def new_job(store: Store, slide: Path, *, model: str = "oracle") -> str:
    """A queued job on ``slide`` (stored as an upload would be), whole slide, no tissue mask."""
    sha256 = hashlib.sha256(slide.read_bytes()).hexdigest()
    store.put_slide(slide, sha256, "tiff")
    record = JobRecord(
        id=new_job_id(), owner="anonymous",
        slide=SlideRef(sha256=sha256, ext="tiff", name="nuclei.tiff", bytes=slide.stat().st_size),
        options=JobOptions(model=model, tissue_mask=False, region_size=REGION), model=model)
    store.create_record(record)
    return record.id


def job_files(store: Store, job_id: str) -> dict[str, int]:
    """Every file of the job's folder (relative path → modification time, ns)."""
    root = Path(store.path(store.job_key(job_id)))
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def cancel(store: Store, job_id: str) -> None:
    """What ``DELETE /v1/jobs/{id}`` does to a running job."""
    store.mark_cancelled(job_id)
    store.update_record(job_id, lambda rec: transition(rec, JobState.CANCELLED))


# --------------------------------------------------------------------------- prepare


def test_prepare_plans_the_regions_and_starts_the_job(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    indices = prepare_job(job)
    assert indices is not None and sorted(indices) == list(range(4))  # 2 x 2 regions
    record = store.read_record(job)
    assert record.state is JobState.RUNNING and record.phase == "segmenting"
    assert record.regions_total == len(indices) and record.started_at is not None
    assert store.progress(job).regions == 0


def test_a_second_prepare_reuses_the_stored_plan(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    first = prepare_job(job)
    written = {name: t for name, t in job_files(store, job).items() if name != "job.json"}
    assert written  # the plan is in the store, for every worker to read
    assert prepare_job(job) == first
    assert {n: t for n, t in job_files(store, job).items() if n != "job.json"} == written


def test_prepare_of_an_unknown_model_fails_finally(store: Store, slide: Path) -> None:
    job = new_job(store, slide, model="gone")
    with pytest.raises(UnknownModel, match="'gone'"):
        prepare_job(job)


def test_tasks_of_an_unknown_job_raise_job_not_found(store: Store) -> None:
    missing = "0" * 32
    with pytest.raises(JobNotFound):
        prepare_job(missing)
    with pytest.raises(JobNotFound):
        run_region(missing, 0)


# --------------------------------------------------------------------------- regions


def test_a_region_is_segmented_once_and_a_second_run_rewrites_nothing(store: Store,
                                                                       slide: Path) -> None:
    job = new_job(store, slide)
    first = (prepare_job(job) or [])[0]
    nuclei = run_region(job, first)
    assert nuclei > 0
    progress = store.progress(job)
    assert progress.regions == 1 and progress.nuclei == nuclei
    assert store.has_region(job, first)
    before = job_files(store, job)
    assert run_region(job, first) == -1  # already done: a duplicated or retried task is harmless
    assert job_files(store, job) == before


def test_a_region_the_plan_does_not_have_is_an_error(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    indices = prepare_job(job) or []
    with pytest.raises(ValueError, match=f"no region {len(indices) + 5}"):
        run_region(job, len(indices) + 5)
    with pytest.raises(ValueError, match="no region -1"):
        run_region(job, -1)
    assert store.progress(job).regions == 0


# --------------------------------------------------------------------------- finalize


def test_finalize_writes_the_results_and_the_job_succeeds(
        store: Store, slide: Path, drawn: tuple[np.ndarray, np.ndarray]) -> None:
    job = new_job(store, slide)
    indices = prepare_job(job) or []
    found = sum(run_region(job, index) for index in indices)
    names = finalize_job(job)
    assert {"counts.json", "manifest.json", "overlay.png", "nuclei.zarr.zip"} <= set(names)
    assert any(name.startswith("nuclei.") and name.endswith((".geojson.gz", ".zip"))
               for name in names if name != "nuclei.zarr.zip")
    record = store.read_record(job)
    assert record.state is JobState.SUCCEEDED and record.phase == "done"
    assert record.results == names and record.finished_at is not None
    for name in names:
        assert store.exists(store.result_key(job, name)), name
    manifest = json.loads(store.read_bytes(store.result_key(job, "manifest.json")))
    assert manifest["parameters"]["job"] == job
    assert set(manifest["parameters"]["workers"]) == {"test-worker"}
    # The oracle reads the drawn maps exactly: every nucleus once, a seam's twin merged away.
    inst, classes = drawn
    counts = json.loads(store.read_bytes(store.result_key(job, "counts.json")))
    assert counts["total"] == int(inst.max()) <= found
    assert counts["classes"] == {"Alpha": int((classes[1:] == 1).sum()),
                                 "Beta": int((classes[1:] == 2).sum())}


def test_regions_share_their_halo_tiles_through_the_store_and_none_is_left(
        store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    indices = prepare_job(job) or []
    assert len(indices) == 4
    for index in indices:
        run_region(job, index)
    assert not any(name.startswith("tiles/") and name.endswith(".npz")
                   for name in job_files(store, job))  # each tile dropped after its last region
    finalize_job(job)
    manifest = json.loads(store.read_bytes(store.result_key(job, "manifest.json")))
    patches = manifest["parameters"]["patches"]
    # Every region's maps hold its neighbours' tiles too; each ran once, on the one region
    # that needed it first.
    assert patches["inferred"] == patches["covering_minimum"] > 0


def test_a_finished_job_takes_no_more_work(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    for index in prepare_job(job) or []:
        run_region(job, index)
    names = finalize_job(job)
    before = job_files(store, job)
    assert prepare_job(job) is None
    assert finalize_job(job) == []
    assert store.read_record(job).results == names
    assert job_files(store, job) == before


# --------------------------------------------------------------------------- cancel


def test_a_cancelled_job_does_nothing_and_its_partial_files_are_removed(store: Store,
                                                                        slide: Path) -> None:
    job = new_job(store, slide)
    indices = prepare_job(job) or []
    run_region(job, indices[0])
    cancel(store, job)
    assert run_region(job, indices[1]) == -1
    assert not store.has_region(job, indices[1])
    assert prepare_job(job) is None and finalize_job(job) == []
    assert cleanup_cancelled(job) is True
    assert set(job_files(store, job)) == {"job.json", "cancelled"}  # the record and the marker
    assert store.progress(job).regions == 0
    assert store.read_record(job).state is JobState.CANCELLED


def test_a_cancel_of_a_queued_job_stops_it_before_planning(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    cancel(store, job)
    assert prepare_job(job) is None
    assert set(job_files(store, job)) == {"job.json", "cancelled"}


def test_cleanup_leaves_jobs_that_were_not_cancelled_alone(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    indices = prepare_job(job) or []
    run_region(job, indices[0])
    before = job_files(store, job)
    assert cleanup_cancelled(job) is False
    assert job_files(store, job) == before


def test_a_cancel_that_lands_after_success_keeps_the_results(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    for index in prepare_job(job) or []:
        run_region(job, index)
    names = finalize_job(job)
    cancel(store, job)  # too late: a succeeded job stays succeeded
    assert cleanup_cancelled(job) is False
    assert store.read_record(job).state is JobState.SUCCEEDED
    assert all(store.exists(store.result_key(job, name)) for name in names)


# --------------------------------------------------------------------------- fail


@pytest.mark.parametrize(("exc", "code"), [
    (UnsupportedSlide("the slide: truncated file"), "unsupported_slide"),
    (UnknownModel("unknown model 'gone'"), "unknown_model"),
    (InferenceError("the model cannot be run"), "processing_error"),
    (WorkerDied(-9), "worker_died"),
    (RuntimeError("boom"), "task_failed"),
])
def test_a_failed_job_records_the_code_and_reason(store: Store, slide: Path, exc: Exception,
                                                  code: str) -> None:
    job = new_job(store, slide)
    fail_job(job, exc)
    record = store.read_record(job)
    assert record.state is JobState.FAILED and record.phase == "done"
    assert record.error is not None and record.error.code == code
    assert record.error.message == f"{type(exc).__name__}: {exc}"
    assert record.error.traceback is not None and type(exc).__name__ in record.error.traceback


def test_a_failure_can_be_given_its_code_and_reason_in_words(store: Store, slide: Path) -> None:
    job = new_job(store, slide)
    prepare_job(job)
    reason = "the worker process died — killed or out of memory — 3 times (last: signal 9)"
    fail_job(job, WorkerDied(-9), reason=reason)
    error = store.read_record(job).error
    assert error is not None and error.code == "worker_died" and error.message == reason
    other = new_job(store, slide)
    fail_job(other, None, code="server_died", reason="the server died 3 times")
    error = store.read_record(other).error
    assert error is not None and (error.code, error.message) == ("server_died", "the server died 3 times")
    assert error.traceback is None


def test_a_failed_job_takes_no_more_work_and_a_late_failure_changes_no_success(
        store: Store, slide: Path) -> None:
    failed = new_job(store, slide)
    fail_job(failed, RuntimeError("boom"))
    assert prepare_job(failed) is None
    done = new_job(store, slide)
    for index in prepare_job(done) or []:
        run_region(done, index)
    finalize_job(done)
    fail_job(done, RuntimeError("a late duplicate task"))
    record = store.read_record(done)
    assert record.state is JobState.SUCCEEDED and record.error is None
