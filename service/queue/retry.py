"""The retry policy both queues follow, and failure reasons people can read.

One :class:`RetryPolicy` value decides, for the embedded queue and for the RQ workers alike, how
many times a task is tried and which errors end the job at once: a slide that cannot be read
stays unreadable however often it is tried, so slide errors are final everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.errors import ServiceError
from worker.errors import SlideError, TissueMaskError

__all__ = [
    "FINAL_ERRORS",
    "RetryPolicy",
    "TaskInterrupted",
    "WorkerDied",
    "describe_failure",
]

FINAL_ERRORS: tuple[type[BaseException], ...] = (SlideError, TissueMaskError, ServiceError)
"""Errors no retry can cure: the slide or tissue mask is unusable, or the job itself is wrong
(a model that no longer exists, a job deleted meanwhile)."""


class WorkerDied(RuntimeError):
    """The process running a task ended without an answer (killed, out of memory, native crash)."""

    def __init__(self, exitcode: int | None = None, *, detail: str | None = None) -> None:
        self.exitcode = exitcode
        if detail is None:
            detail = (f"signal {-exitcode}" if exitcode is not None and exitcode < 0
                      else f"exit code {exitcode}")
        self.detail = detail
        super().__init__(f"the worker process died ({detail})")


class TaskInterrupted(Exception):
    """A task was stopped on purpose (job cancelled, server shutting down): never a job failure."""

    def __init__(self, job_id: str, why: str) -> None:
        super().__init__(f"job {job_id}: task stopped ({why})")
        self.job_id = job_id
        self.why = why


@dataclass(frozen=True)
class RetryPolicy:
    """How often a task is tried and which errors are final.

    Parameters
    ----------
    max_attempts : int
        Tries per task (and server crashes per job) before the job fails; at least 1.
    final_errors : tuple of exception types
        Errors that fail the job at the first occurrence, without a retry.
    """

    max_attempts: int = 3
    final_errors: tuple[type[BaseException], ...] = FINAL_ERRORS

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int):
            raise TypeError(f"max_attempts must be an int, got {type(self.max_attempts).__name__}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    @property
    def retries(self) -> int:
        """Tries after the first one."""
        return self.max_attempts - 1

    def is_final(self, exc: BaseException) -> bool:
        """Whether ``exc`` fails the job at once (no retry can help)."""
        return isinstance(exc, self.final_errors)

    def should_retry(self, exc: BaseException, attempt: int) -> bool:
        """Whether a task that raised ``exc`` on try number ``attempt`` (1-based) is tried again."""
        if isinstance(exc, TaskInterrupted):
            return False
        return not self.is_final(exc) and attempt < self.max_attempts


def describe_failure(exc: BaseException, *, attempts: int, task: str) -> str:
    """A failure reason in words for the job record (``attempts``: how many tries were made)."""
    times = "once" if attempts == 1 else f"{attempts} times"
    if isinstance(exc, WorkerDied):
        return (f"the worker process died — killed or out of memory — {times} "
                f"(last: {exc.detail}, during {task})")
    if isinstance(exc, SlideError | TissueMaskError | ServiceError):
        return str(exc)
    return f"{task} failed {times}: {type(exc).__name__}: {exc}"
