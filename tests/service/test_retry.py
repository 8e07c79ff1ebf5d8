"""The retry policy both queues follow: what is final, what is tried again and how often, and the
failure reasons a job record keeps, in words."""

from __future__ import annotations

import dataclasses

import pytest

from service.errors import JobNotFound, ServiceError, UnknownModel
from service.queue.retry import (
    FINAL_ERRORS,
    RetryPolicy,
    TaskInterrupted,
    WorkerDied,
    describe_failure,
)
from worker.errors import (
    InferenceError,
    MissingResolution,
    NotRGBSlide,
    SlideError,
    SlideTooLarge,
    TissueMaskError,
    UnsupportedSlide,
    WorkerError,
)

FINAL = [
    UnsupportedSlide("the slide: truncated file"),
    NotRGBSlide("the slide: 16-bit grey"),
    MissingResolution("the slide has no resolution"),
    SlideTooLarge("the slide is too large to plan"),
    TissueMaskError("the tissue mask does not fit the slide"),
    UnknownModel("unknown model 'gone'"),
    JobNotFound("no job 'x'"),
]
"""Errors no retry can cure: the slide, the tissue mask or the job itself is wrong."""

RETRIED = [
    RuntimeError("flaky"),
    OSError("connection reset by peer"),
    MemoryError(),
    InferenceError("CUDA error: unspecified launch failure"),
    WorkerError("post-processing failed"),
    WorkerDied(-9),
]
"""Errors another try may not meet again: a crash, a network or device hiccup, memory."""


def _name(exc: BaseException) -> str:
    return type(exc).__name__


# --------------------------------------------------------------------------- the policy value


def test_the_default_is_three_tries_with_slide_tissue_and_service_errors_final() -> None:
    policy = RetryPolicy()
    assert policy.max_attempts == 3 and policy.retries == 2
    assert policy.final_errors == FINAL_ERRORS == (SlideError, TissueMaskError, ServiceError)


def test_one_attempt_means_no_retry() -> None:
    policy = RetryPolicy(max_attempts=1)
    assert policy.retries == 0
    assert not policy.should_retry(RuntimeError("flaky"), attempt=1)


@pytest.mark.parametrize("bad", [0, -1])
def test_fewer_than_one_attempt_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match=f"max_attempts must be >= 1, got {bad}"):
        RetryPolicy(max_attempts=bad)


@pytest.mark.parametrize("bad", [True, 2.0, "3", None])
def test_a_count_that_is_no_int_is_refused(bad: object) -> None:
    with pytest.raises(TypeError, match=f"max_attempts must be an int, got {type(bad).__name__}"):
        RetryPolicy(max_attempts=bad)  # type: ignore[arg-type]


def test_the_policy_is_a_frozen_value_shared_by_both_queues() -> None:
    policy = RetryPolicy(max_attempts=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 9  # type: ignore[misc]
    assert policy == RetryPolicy(max_attempts=4) and hash(policy) == hash(RetryPolicy(max_attempts=4))


# --------------------------------------------------------------------------- final or retried


@pytest.mark.parametrize("exc", FINAL, ids=_name)
def test_slide_tissue_mask_and_service_errors_are_final_at_the_first_try(exc: Exception) -> None:
    policy = RetryPolicy(max_attempts=5)
    assert policy.is_final(exc)
    assert not policy.should_retry(exc, attempt=1)


@pytest.mark.parametrize("exc", RETRIED, ids=_name)
def test_other_errors_are_tried_max_attempts_times(exc: BaseException) -> None:
    policy = RetryPolicy(max_attempts=3)
    assert not policy.is_final(exc)
    assert [policy.should_retry(exc, attempt) for attempt in (1, 2, 3, 4)] == [
        True, True, False, False]


def test_a_task_stopped_on_purpose_is_never_retried() -> None:
    stopped = TaskInterrupted("0" * 32, "cancelled")
    policy = RetryPolicy(max_attempts=10)
    assert not policy.is_final(stopped)  # not a failure of the job either
    assert not policy.should_retry(stopped, attempt=1)


def test_the_final_errors_can_be_chosen() -> None:
    policy = RetryPolicy(final_errors=(KeyError,))
    assert policy.is_final(KeyError("x")) and not policy.should_retry(KeyError("x"), attempt=1)
    assert not policy.is_final(UnsupportedSlide("now retried"))
    assert policy.should_retry(UnsupportedSlide("now retried"), attempt=1)


# --------------------------------------------------------------------------- reasons in words


def test_a_killed_worker_names_the_signal() -> None:
    died = WorkerDied(-9)
    assert isinstance(died, RuntimeError)
    assert died.exitcode == -9 and died.detail == "signal 9"
    assert str(died) == "the worker process died (signal 9)"


def test_a_worker_that_exited_names_its_exit_code() -> None:
    died = WorkerDied(137)
    assert died.detail == "exit code 137" and str(died) == "the worker process died (exit code 137)"


def test_a_worker_death_can_say_what_was_seen() -> None:
    died = WorkerDied(None, detail="no heartbeat for 10 s")
    assert died.exitcode is None
    assert str(died) == "the worker process died (no heartbeat for 10 s)"


def test_a_worker_that_died_every_time_says_so_with_the_last_cause_and_task() -> None:
    reason = describe_failure(WorkerDied(-9), attempts=3, task="region 12")
    assert reason == ("the worker process died — killed or out of memory — 3 times "
                      "(last: signal 9, during region 12)")


def test_a_single_try_is_said_once() -> None:
    assert describe_failure(WorkerDied(-11), attempts=1, task="planning the slide") == (
        "the worker process died — killed or out of memory — once "
        "(last: signal 11, during planning the slide)")
    assert describe_failure(ValueError("bad table"), attempts=1, task="writing the results") == (
        "writing the results failed once: ValueError: bad table")


def test_other_errors_name_the_task_the_tries_and_the_exception() -> None:
    reason = describe_failure(OSError("disk full"), attempts=3, task="region 4")
    assert reason == "region 4 failed 3 times: OSError: disk full"


@pytest.mark.parametrize("exc", FINAL, ids=_name)
def test_final_errors_are_their_own_message(exc: Exception) -> None:
    assert describe_failure(exc, attempts=1, task="planning the slide") == str(exc)


def test_an_interrupted_task_names_its_job_and_why() -> None:
    stopped = TaskInterrupted("ab" * 16, "the server is shutting down")
    assert stopped.job_id == "ab" * 16 and stopped.why == "the server is shutting down"
    assert str(stopped) == f"job {'ab' * 16}: task stopped (the server is shutting down)"
