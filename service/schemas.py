"""HTTP request and response bodies (what the OpenAPI document shows)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from service.jobs import JobOptions, JobState

__all__ = [
    "ErrorBody",
    "ErrorDetail",
    "HealthStatus",
    "JobList",
    "JobProgress",
    "JobStatus",
    "ModelInfo",
    "ModelList",
    "SlideInfo",
]


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. job_not_found")
    message: str = Field(description="human-readable explanation")


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer."""

    error: ErrorDetail


class JobProgress(BaseModel):
    regions_done: int = Field(default=0, description="regions segmented so far")
    regions_total: int | None = Field(default=None, description="regions planned (null until planned)")
    nuclei: int = Field(default=0, description="nuclei found so far (before seam merging)")
    fraction: float = Field(default=0.0, ge=0, le=1, description="regions_done / regions_total")
    eta_seconds: float | None = Field(default=None, description="estimated seconds to completion")
    phase: str = Field(default="queued", description=(
        "what the job is doing: queued, preparing (planning the slide; state still queued), "
        "segmenting (regions), finalizing (merging, writing outputs), done (a final state)"))


class SlideInfo(BaseModel):
    name: str = Field(description="the uploaded file name (display only)")
    sha256: str
    bytes: int


class JobStatus(BaseModel):
    id: str
    state: JobState
    created_at: float = Field(description="Unix time")
    started_at: float | None = None
    finished_at: float | None = None
    model: str
    options: JobOptions
    slide: SlideInfo
    progress: JobProgress
    error: ErrorDetail | None = Field(default=None, description="why the job failed (state failed)")
    results: dict[str, str] = Field(default_factory=dict, description="output name → download URL")
    expired: bool = Field(default=False, description="the retention time passed; results were deleted")
    retries: int = Field(default=0, description="times the job was retried (POST /v1/jobs/{id}/retry)")


class JobList(BaseModel):
    items: list[JobStatus]
    total: int
    offset: int
    limit: int


class ModelInfo(BaseModel):
    name: str
    default: bool
    card: dict[str, Any] = Field(description="the model card embedded in the ONNX file")


class ModelList(BaseModel):
    models: list[ModelInfo]


class HealthStatus(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)
