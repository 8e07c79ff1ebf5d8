"""Job records: the durable description of one slide job, and its state machine.

A record lives in the store as ``jobs/<id>/job.json``; every process (API, workers) reads and
writes it through :class:`service.store.Store`. State changes go through :func:`transition` only.
"""

from __future__ import annotations

import re
import time
import uuid
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, Field, field_validator

from worker.options import MAX_MPP, MAX_REGION_SIZE, MIN_MPP, MIN_REGION_SIZE, check_mpp, check_roi

__all__ = [
    "PHASES",
    "RETRYABLE_STATES",
    "TERMINAL_STATES",
    "JobError",
    "JobOptions",
    "JobRecord",
    "JobState",
    "SlideRef",
    "is_job_id",
    "new_job_id",
    "reopen",
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
"""States a job never leaves (except by an explicit :func:`reopen`, the retry route)."""

RETRYABLE_STATES = frozenset({JobState.FAILED, JobState.CANCELLED})
"""States ``POST /v1/jobs/{id}/retry`` accepts."""

PHASES = ("queued", "preparing", "segmenting", "finalizing", "done")
"""What a job is doing, finer than its state: ``preparing`` is the planning of the slide (state
still ``queued``), ``segmenting`` the region tasks, ``finalizing`` the merge and outputs."""

_ALLOWED = {
    JobState.QUEUED: {JobState.RUNNING, JobState.FAILED, JobState.CANCELLED},
    JobState.RUNNING: {JobState.RUNNING, JobState.QUEUED, JobState.SUCCEEDED, JobState.FAILED,
                       JobState.CANCELLED},
}


class JobOptions(BaseModel):
    """What the client asked for (the ``options`` form field)."""

    model: str | None = Field(
        default=None, description="model name (GET /v1/models); default: the bundled one")
    mpp: float | None = Field(
        default=None, description="µm per level-0 pixel override",
        json_schema_extra={"minimum": MIN_MPP, "maximum": MAX_MPP})
    roi: tuple[int, int, int, int] | None = Field(default=None, description="x, y, w, h in level-0 pixels")
    tissue_mask: bool = Field(default=True, description="skip background (false: analyse everything)")
    region_size: int | None = Field(
        default=None, ge=MIN_REGION_SIZE, le=MAX_REGION_SIZE, description="region core side, model px")
    min_class_prob: float | None = Field(
        default=None, ge=0, le=1, allow_inf_nan=False,
        description="nuclei whose class probability is below this are reported unclassified "
        "(default: the model card's)")
    objects: Literal["detections", "cells"] = Field(
        default="detections",
        description="QuPath objects to write: nuclei as detections, or cells (nucleus plus a "
                    "boundary 5 µm out, never overlapping a neighbour)")

    model_config = {"extra": "forbid"}

    @field_validator("mpp")
    @classmethod
    def _check_mpp(cls, value: float | None) -> float | None:
        # One range for every layer (worker.options): a value the slide reader would refuse is
        # refused here, in its words less the name the API's message puts in front.
        if value is None:
            return None
        try:
            return check_mpp(value)
        except ValueError as exc:
            raise ValueError(str(exc).removeprefix("mpp ")) from None

    @field_validator("roi")
    @classmethod
    def _check_roi(cls, value: tuple[int, int, int, int] | None) -> tuple[int, int, int, int] | None:
        return None if value is None else check_roi(value)


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
    retries: int = 0
    phase: str = "queued"
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


def reopen(record: JobRecord) -> bool:
    """Put a failed or cancelled job back in the queue in place (the retry route); False when its
    state does not allow it. Its stored regions are kept, so only the missing ones run again."""
    if record.state not in RETRYABLE_STATES:
        return False
    record.state = JobState.QUEUED
    record.phase = "queued"
    record.finished_at = None
    record.error = None
    record.attempts = 0
    record.retries += 1
    return True
