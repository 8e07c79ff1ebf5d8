"""Job records: the durable description of one slide job, and its state machine.

A record lives in the store as ``jobs/<id>/job.json``; every process (API, workers) reads and
writes it through :class:`service.store.Store`. State changes go through :func:`transition` only.
"""

from __future__ import annotations

import re
import time
import uuid
from enum import StrEnum

from pydantic import BaseModel, Field, field_validator

__all__ = [
    "TERMINAL_STATES",
    "JobError",
    "JobOptions",
    "JobRecord",
    "JobState",
    "SlideRef",
    "is_job_id",
    "new_job_id",
    "transition",
]

_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


class JobState(StrEnum):
    """Where a job is: queued → running → succeeded | failed | cancelled."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
"""States a job never leaves."""

_ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED,
                       JobState.CANCELLED},
}


class JobOptions(BaseModel):
    """What the client asked for (the ``options`` form field)."""

    model: str | None = Field(
        default=None, description="model name (GET /v1/models); default: the bundled one")
    mpp: float | None = Field(default=None, ge=0.01, le=100, description="µm per level-0 pixel override")
    roi: tuple[int, int, int, int] | None = Field(default=None, description="x, y, w, h in level-0 pixels")
    tissue_mask: bool = Field(default=True, description="skip background (false: analyse everything)")
    region_size: int | None = Field(default=None, ge=64, le=8192, description="region core side, model px")

    model_config = {"extra": "forbid"}

    @field_validator("roi")
    @classmethod
    def _check_roi(cls, value: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        if value is not None:
            x, y, w, h = value
            if x < 0 or y < 0 or w <= 0 or h <= 0:
                raise ValueError(f"roi wants x, y >= 0 and w, h > 0, got {list(value)}")
        return value


class SlideRef(BaseModel):
    """A slide in the store, by content: ``slides/<sha256>.<ext>``."""

    sha256: str
    ext: str
    name: str = Field(description="the client's file name, for display only (never a path)")
    bytes: int


class JobError(BaseModel):
    """Why a job failed."""

    code: str
    message: str
    traceback: str | None = None


class JobRecord(BaseModel):
    """The stored state of one job."""

    id: str
    owner: str
    state: JobState = JobState.QUEUED
    slide: SlideRef
    options: JobOptions
    model: str
    created_at: float = Field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    regions_total: int | None = None
    attempts: int = 0
    error: JobError | None = None
    results: list[str] = Field(default_factory=list)
    expired: bool = False

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL_STATES


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    """Whether ``text`` has the shape of a job id (so it is safe inside a store path)."""
    return bool(_JOB_ID.match(text))


def transition(record: JobRecord, state: JobState, *, error: JobError | None = None) -> bool:
    """Move ``record`` to ``state`` in place; False (record unchanged) when the move is not allowed.

    Terminal states are final: a late task never resurrects a cancelled or failed job.
    """
    if state not in _ALLOWED.get(record.state, set()):
        return False
    now = time.time()
    if state is JobState.RUNNING and record.started_at is None:
        record.started_at = now
    if state in TERMINAL_STATES:
        record.finished_at = now
    if state is JobState.FAILED:
        record.error = error or JobError(code="failed", message="the job failed")
    record.state = state
    return True
