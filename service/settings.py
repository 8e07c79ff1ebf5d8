"""Service settings: one :class:`Settings`, read once from ``HOVERSERVE_*`` environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.options import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_REGION_SIZE,
    MAX_REGION_SIZE,
    MIN_REGION_SIZE,
)

__all__ = ["DEFAULT_STORE", "Settings"]

DEFAULT_STORE = "./hoverserve-data"
"""Default store: a local directory (relative to the working directory)."""

DEFAULT_MAX_UPLOAD_MB = 4096.0
"""Default upload size limit, MiB (whole-slide images are routinely several GiB)."""

DEFAULT_RETENTION_HOURS = 168.0
"""Default time, hours, a finished job's slide, regions and results are kept (one week)."""


class Settings(BaseSettings):
    """Everything the API and the workers need to know, from ``HOVERSERVE_<NAME>`` variables.

    A bad value fails at start-up with pydantic's message naming the variable.
    """

    model_config = SettingsConfigDict(env_prefix="HOVERSERVE_", extra="ignore")

    store: str = Field(
        default=DEFAULT_STORE, description="fsspec URL or directory for slides, jobs and results")
    store_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec storage options (JSON), e.g. S3 endpoint_url")
    redis_url: str | None = Field(default=None, description="Redis URL; unset = embedded in-process queue")
    api_keys: str | None = Field(
        default=None, description="SHA-256 hex digests of accepted keys, comma-separated; unset = no auth")
    models_dir: Path | None = Field(default=None, description="folder of extra *.onnx models, named by stem")
    cache_dir: Path = Field(default=Path("./hoverserve-cache"),
                            description="local folder for slides downloaded from a remote store")
    max_upload_mb: float = Field(default=DEFAULT_MAX_UPLOAD_MB, gt=0, description="upload size limit, MiB")
    retention_hours: float = Field(default=DEFAULT_RETENTION_HOURS, gt=0,
                                   description="hours a finished job's data is kept")
    sweep_interval_s: float = Field(default=300.0, gt=0, description="seconds between retention sweeps")
    region_size: int = Field(default=DEFAULT_REGION_SIZE, ge=MIN_REGION_SIZE, le=MAX_REGION_SIZE,
                             description="region core side, model pixels")
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1, description="patches per inference batch")
    device: str = Field(default="auto", pattern="^(auto|cpu|cuda)$", description="inference device")
    trt_cache: Path | None = Field(
        default=None, description="folder for TensorRT's engines, kept between worker starts")
    trt_fp16: bool = Field(
        default=False, description="let TensorRT use float16 kernels (always on for an fp16 model)")
    max_attempts: int = Field(default=3, ge=1, description="tries per task before the job fails")
    task_timeout_s: int = Field(default=1800, ge=10, description="seconds a single task may run (RQ)")
    embedded_threads: int = Field(default=1, ge=1, description="jobs run at once by the embedded queue")
    lock_heartbeat_s: float = Field(
        default=2.0, gt=0, description="seconds between heartbeats of the store's queue lock (embedded)")
    lock_stale_beats: int = Field(
        default=5, ge=2, description="missed lock heartbeats after which another serve takes the queue over")
    worker_dead_after_s: float = Field(
        default=10.0, gt=0, description="seconds without a worker heartbeat before its tasks are retried")
    queue_name: str = Field(default="hoverserve", min_length=1, description="RQ queue name")
    upload_idle_timeout_s: float = Field(
        default=60.0, gt=0, description="seconds an upload may send nothing before it is closed (408)")
    quota_active_jobs: int = Field(
        default=20, ge=1, description="queued + running jobs one key may have at once (429 beyond)")
    quota_stored_gb: float = Field(
        default=200.0, gt=0, description="GiB of slides one key may keep in the store (429 beyond)")
    quota_retry_after_s: int = Field(
        default=60, ge=1, description="Retry-After seconds sent with a 429 quota answer")

    @field_validator("api_keys")
    @classmethod
    def _check_keys(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        for digest in _split(value):
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(
                    "HOVERSERVE_API_KEYS wants comma-separated SHA-256 hex digests "
                    f"(see `hoverserve key new`), got an entry {digest[:12]!r}…")
        return value

    @property
    def key_digests(self) -> frozenset[str]:
        """The accepted keys' SHA-256 hex digests (empty: authentication off)."""
        return frozenset(_split(self.api_keys)) if self.api_keys else frozenset()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)


def _split(value: str) -> list[str]:
    return [part.strip().lower().removeprefix("sha256:") for part in value.split(",") if part.strip()]
