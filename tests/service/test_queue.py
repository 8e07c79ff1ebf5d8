"""The retry policy, the task functions' bookkeeping and the embedded queue's task process.

No server here: the policy is a value, the task wrappers run against a store folder, and the
task process is started directly.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from service.catalog import Catalog
from service.errors import JobNotFound, UnknownModel
from service.jobs import JobError, JobOptions, JobRecord, JobState, SlideRef, new_job_id, reopen
from service.queue import rq_queue, tasks
from service.queue.child import RemoteTraceback, TaskProcess
from service.queue.retry import (
    RetryPolicy,
    TaskInterrupted,
    WorkerDied,
    describe_failure,
)
from service.settings import Settings
from service.store import Store
from worker.errors import InferenceError, MissingResolution, TissueMaskError, UnsupportedSlide

# --------------------------------------------------------------------------- the policy


def test_the_retry_policy_is_a_frozen_value_with_checked_fields() -> None:
    policy = RetryPolicy(max_attempts=3)
    assert policy == RetryPolicy(max_attempts=3) and policy.retries == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 5  # type: ignore[misc]
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(TypeError, match="max_attempts"):
        RetryPolicy(max_attempts=2.5)  # type: ignore[arg-type]


def test_slide_errors_are_final_and_other_errors_retried_until_the_last_attempt() -> None:
    policy = RetryPolicy(max_attempts=3)
    for final in (UnsupportedSlide("truncated"), MissingResolution("no mpp"),
                  TissueMaskError("bad mask"), UnknownModel("no model x")):
        assert policy.is_final(final)
        assert not policy.should_retry(final, 1)
    for transient in (WorkerDied(-9), InferenceError("onnx"), OSError("disk")):
        assert not policy.is_final(transient)
        assert policy.should_retry(transient, 1) and policy.should_retry(transient, 2)
        assert not policy.should_retry(transient, 3)
    assert not policy.should_retry(TaskInterrupted("j", "cancelled"), 1)
    assert not RetryPolicy(max_attempts=1).should_retry(OSError("disk"), 1)


def test_failures_are_described_in_words() -> None:
    died = describe_failure(WorkerDied(-signal.SIGKILL), attempts=3, task="region 4")
    assert died.startswith("the worker process died — killed or out of memory — 3 times")
    assert "signal 9" in died and "region 4" in died
    assert "once" in describe_failure(WorkerDied(1), attempts=1, task="planning the slide")
    assert describe_failure(UnsupportedSlide("not a TIFF"), attempts=1, task="x") == "not a TIFF"
    assert describe_failure(OSError("disk full"), attempts=2, task="region 1") == \
        "region 1 failed 2 times: OSError: disk full"


def test_rq_tasks_carry_the_same_policy() -> None:
    options = rq_queue._policy(Settings(max_attempts=4))
    assert options["retry"].max == RetryPolicy(max_attempts=4).retries == 3
    assert rq_queue._policy(Settings(max_attempts=1))["retry"] is None


# --------------------------------------------------------------------------- task bookkeeping


@pytest.fixture
def context(tmp_path: Path) -> tasks.TaskContext:
    store = Store(str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    ctx = tasks.TaskContext(store=store, catalog=Catalog(None),
                            settings=Settings(store=str(tmp_path / "store"), max_attempts=3))
    tasks.set_context(ctx)
    return ctx


def _record(ctx: tasks.TaskContext, state: JobState = JobState.RUNNING) -> JobRecord:
    record = JobRecord(id=new_job_id(), owner="anonymous", state=state, options=JobOptions(),
                       model="oracle", slide=SlideRef(sha256="a" * 64, ext="svs", name="s.svs", bytes=1))
    ctx.store.create_record(record)
    return record


def _partial_files(ctx: tasks.TaskContext, job_id: str) -> None:
    ctx.store.write_bytes(ctx.store.job_key(job_id, "plan.json"), b"{}")
    ctx.store.write_bytes(ctx.store.job_key(job_id, "plan.npz"), b"stand-in")
    ctx.store.write_region(job_id, 0, b"npz", 7)


def test_a_slide_error_in_an_rq_region_task_fails_the_job_at_once(
    context: tasks.TaskContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = _record(context)

    def unreadable(job_id: str, index: int) -> int:
        raise UnsupportedSlide("the slide file is truncated")

    monkeypatch.setattr(tasks, "run_region", unreadable)
    assert rq_queue.region_task(record.id, 3) == 0  # returned, not raised: RQ does not retry
    failed = context.store.read_record(record.id)
    assert failed.state is JobState.FAILED and failed.phase == "done"
    assert failed.error is not None and failed.error.code == "unsupported_slide"
    assert failed.error.message == "the slide file is truncated"

    def flaky(job_id: str, index: int) -> int:
        raise OSError("network blip")

    monkeypatch.setattr(tasks, "run_region", flaky)
    with pytest.raises(OSError, match="blip"):  # transient: RQ's retry handles it
        rq_queue.region_task(_record(context).id, 0)


def test_a_cancelled_jobs_partial_files_are_removed_but_a_finished_jobs_kept(
    context: tasks.TaskContext,
) -> None:
    cancelled = _record(context)
    _partial_files(context, cancelled.id)
    assert not tasks.cleanup_cancelled(cancelled.id)  # not cancelled: nothing happens
    context.store.mark_cancelled(cancelled.id)
    context.store.update_record(cancelled.id, lambda rec: None)  # the marker wins
    assert tasks.cleanup_cancelled(cancelled.id)
    folder = Path(context.store.path("jobs", cancelled.id))
    assert sorted(p.name for p in folder.iterdir()) == ["cancelled", "job.json"]

    finished = _record(context, JobState.SUCCEEDED)
    _partial_files(context, finished.id)
    context.store.mark_cancelled(finished.id)  # a cancel that came too late
    assert not tasks.cleanup_cancelled(finished.id)
    assert context.store.has_region(finished.id, 0)


def test_a_job_that_died_with_its_worker_fails_with_the_worker_died_code(
    context: tasks.TaskContext,
) -> None:
    record = _record(context)
    tasks.fail_job(record.id, WorkerDied(-9), reason="the worker process died — killed — 3 times")
    error = context.store.read_record(record.id).error
    assert error is not None and error.code == "worker_died"
    with pytest.raises(JobNotFound):
        tasks.fail_job(new_job_id(), OSError("x"))


def test_reopen_puts_only_failed_or_cancelled_jobs_back_in_the_queue(
    context: tasks.TaskContext,
) -> None:
    record = _record(context)
    record.state, record.attempts = JobState.FAILED, 2
    record.error, record.finished_at = JobError(code="worker_died", message="died"), time.time()
    assert reopen(record)
    assert (record.state, record.error, record.finished_at, record.attempts, record.retries) == \
        (JobState.QUEUED, None, None, 0, 1)
    for state in (JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED):
        assert not reopen(_record(context, state))
    assert reopen(_record(context, JobState.CANCELLED))


# --------------------------------------------------------------------------- the task process


def _pid() -> int:
    return os.getpid()


def _raise() -> None:
    raise UnsupportedSlide("bad header")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


@pytest.mark.slow
def test_the_task_process_runs_tasks_reports_errors_and_deaths_and_stops_on_demand(
    tmp_path: Path,
) -> None:
    proc = TaskProcess(Settings(store=str(tmp_path / "store"), cache_dir=tmp_path / "cache"),
                       poll_s=0.1)
    never = lambda: None  # noqa: E731
    try:
        child = proc.run(_pid, (), job_id="j", should_stop=never)
        assert child != os.getpid() and proc.pid == child
        with pytest.raises(UnsupportedSlide, match="bad header") as raised:
            proc.run(_raise, (), job_id="j", should_stop=never)
        assert isinstance(raised.value.__cause__, RemoteTraceback)
        assert "_raise" in raised.value.__cause__.text
        assert proc.run(_pid, (), job_id="j", should_stop=never) == child  # same process

        with pytest.raises(WorkerDied, match="signal 9") as died:
            proc.run(_die, (), job_id="j", should_stop=never)
        assert died.value.exitcode == -signal.SIGKILL

        asked = time.monotonic()
        with pytest.raises(TaskInterrupted, match="cancelled"):
            proc.run(_sleep, (60,), job_id="j",
                     should_stop=lambda: "cancelled" if time.monotonic() - asked > 1 else None)
        assert time.monotonic() - asked < 5
        assert proc.pid is None
        assert proc.run(_pid, (), job_id="j", should_stop=never) not in (None, child)
    finally:
        proc.stop()
