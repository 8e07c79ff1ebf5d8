"""``/v1/jobs``: submit a slide, follow its job, download its results, cancel or delete it."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from service.deps import OwnerDep, Services, ServicesDep
from service.errors import (
    BadUpload,
    InvalidOptions,
    JobNotFinished,
    JobNotFound,
    QuotaExceeded,
    ResultNotFound,
    ResultsExpired,
    ServiceError,
    SlideNotFound,
    error_code,
    public_message,
)
from service.jobs import JobOptions, JobRecord, JobState, SlideRef, new_job_id, transition
from service.schemas import ErrorBody, ErrorDetail, JobList, JobProgress, JobStatus, SlideInfo
from service.slides import SlideRegistry, is_sha256
from service.store import Store
from service.uploads import Upload, receive_upload
from worker.errors import SlideError

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 410, 413, 422, 429, 503)}

_MEDIA_TYPES = {".json": "application/json", ".png": "image/png", ".zip": "application/zip",
                ".gz": "application/gzip"}

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "properties": {
                "slide": {"type": "string", "format": "binary",
                          "description": "the slide file (streamed; size-limited)"},
                "slide_sha256": {"type": "string",
                                 "description": "instead of a file: a slide already in the store"},
                "options": {"type": "string", "description": (
                    "JSON object: model (name from GET /v1/models), mpp (µm/px override), "
                    "roi [x, y, w, h] level-0 px, tissue_mask (bool), region_size (model px), "
                    "objects (detections or cells), min_class_prob (0-1: below it, unclassified)")},
            },
        }}},
    },
}


# --------------------------------------------------------------------------- helpers


def _status(record: JobRecord, services: Services, request: Request) -> JobStatus:
    progress = JobProgress(regions_total=record.regions_total)
    if record.state is JobState.SUCCEEDED:
        total = record.regions_total or 0
        progress = JobProgress(regions_done=total, regions_total=total, fraction=1.0, eta_seconds=0.0)
    if record.state in (JobState.RUNNING, JobState.SUCCEEDED) and not record.expired:
        done = services.store.progress(record.id)
        progress.regions_done, progress.nuclei = done.regions, done.nuclei
        if record.regions_total:
            progress.fraction = min(1.0, done.regions / record.regions_total)
            if record.state is JobState.RUNNING and record.started_at and done.regions:
                elapsed = time.time() - record.started_at
                progress.eta_seconds = elapsed / done.regions * (record.regions_total - done.regions)
    progress.phase = "done" if record.finished else record.phase
    results = {}
    if record.state is JobState.SUCCEEDED and not record.expired:
        results = {name: str(request.url_for("get_result", job_id=record.id, name=name))
                   for name in record.results}
    error = None
    if record.error:  # worker messages name server paths and CLI flags: say it as the API does
        error = ErrorDetail(code=record.error.code,
                            message=public_message(record.error.message, record.slide.name))
    return JobStatus(
        id=record.id, state=record.state, created_at=record.created_at,
        started_at=record.started_at, finished_at=record.finished_at, model=record.model,
        options=record.options, progress=progress, error=error, results=results,
        expired=record.expired, retries=record.retries,
        slide=SlideInfo(name=record.slide.name, sha256=record.slide.sha256, bytes=record.slide.bytes),
    )


def _own_record(services: Services, job_id: str, owner: str) -> JobRecord:
    """The caller's job; another owner's job is reported as missing, never as forbidden."""
    record = services.store.read_record(job_id)
    if record.owner != owner:
        raise JobNotFound(f"no job {job_id!r}")
    return record


def _options(upload: Upload) -> JobOptions:
    text = upload.fields.get("options", "").strip() or "{}"
    try:
        return JobOptions.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidOptions("; ".join(_option_problem(e) for e in exc.errors())) from None


def _option_problem(error: Any) -> str:
    """One pydantic error in words naming the API option (``"mpp" in options: ...``)."""
    where = ".".join(str(p) for p in error["loc"])
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if not where:
        return f"options: {message}"
    return f'"{where}" in options: {message}'


def _validate_slide(path: Path, options: JobOptions) -> None:
    """Open the slide with the workers' reader, as they will (raises SlideError); decodes no
    more than one tile: the planning budget is checked from the slide's levels alone."""
    from worker.slide import check_planning_budget, open_slide

    with open_slide(path, mpp=options.mpp) as slide:
        if options.roi is not None:
            x, y, _, _ = options.roi
            height, width = slide.shape[:2]
            if x >= width or y >= height:
                raise InvalidOptions(
                    f"roi {list(options.roi)} lies outside the slide ({width} x {height} px)")
        check_planning_budget(slide, options.roi)


def _store_upload(services: Services, upload: Upload, options: JobOptions, owner: str,
                  job_id: str) -> SlideRef:
    """Validate the uploaded file and put it in the store (once per content, whatever the
    extension), referenced by ``owner``'s job ``job_id``."""
    if upload.path is None:
        raise BadUpload("no file in the form field 'slide'", code="missing_slide")
    named = upload.path.with_name(f"{upload.path.name}.{upload.ext}")
    os.replace(upload.path, named)
    upload.path = named
    _validate_slide(named, options)
    registry = SlideRegistry(services.store)
    _check_stored_bytes(services, _owner_records(services, owner), upload.sha256, upload.size)
    # The reference first: a concurrent deletion of the last other reference then keeps the file.
    registry.add_ref(upload.sha256, owner, job_id)
    ext = registry.stored_ext(upload.sha256)
    if ext is None:
        ext = upload.ext
        try:
            services.store.put_slide(named, upload.sha256, ext)
        except BaseException:
            registry.release(upload.sha256, owner, job_id)
            raise
    else:
        services.metrics.slides_deduplicated.inc()
    if not services.store.local:
        # Keep the file as the local cache copy so a worker on this host need not download it.
        cached = services.store.cache_dir / f"{upload.sha256}.{ext}"
        if not cached.exists():
            os.replace(named, cached)
    return SlideRef(sha256=upload.sha256, ext=ext, name=upload.name, bytes=upload.size)


def _referenced_slide(services: Services, sha256: str, name: str, options: JobOptions,
                      owner: str, job_id: str) -> SlideRef:
    """A stored slide named by hash: only one the caller's own jobs use (or used)."""
    sha256 = sha256.strip().lower()
    if not is_sha256(sha256):
        raise BadUpload("slide_sha256 must be a SHA-256 hex digest (64 hex digits)",
                        code="invalid_sha256")
    registry = SlideRegistry(services.store)
    ext = registry.stored_ext(sha256) if registry.owns(sha256, owner) else None
    if ext is None:
        # Another key's slide and an unknown hash get the same answer: nothing about others leaks.
        raise SlideNotFound(f"no slide with sha256 {sha256} among your uploads")
    _validate_slide(services.store.local_slide(sha256, ext), options)
    registry.add_ref(sha256, owner, job_id)
    size = services.store.fs.size(services.store.path(services.store.slide_key(sha256, ext)))
    return SlideRef(sha256=sha256, ext=ext, name=name or f"{sha256[:12]}.{ext}", bytes=int(size))


def _owner_records(services: Services, owner: str) -> list[JobRecord]:
    return _read_records(services.store, services.store.owner_jobs(owner))


def _check_quotas(services: Services, owner: str) -> None:
    """429 before an upload is read: the key has its quota of queued and running jobs, or its
    stored slides already fill its byte quota (one read of the key's records for both)."""
    records = _owner_records(services, owner)
    limit = services.settings.quota_active_jobs
    active = sum(not r.finished for r in records)
    if active >= limit:
        raise QuotaExceeded(
            f"you have {active} queued or running jobs (quota {limit}); wait for one to finish "
            "or cancel one", retry_after_s=services.settings.quota_retry_after_s)
    _check_stored_bytes(services, records, None, 0)


def _check_stored_bytes(services: Services, records: list[JobRecord], sha256: str | None,
                        size: int) -> None:
    """429 when the key's stored slides (of ``records``) exceed its byte quota: already
    (``sha256`` None), or once a new slide ``sha256`` of ``size`` bytes is added."""
    limit = int(services.settings.quota_stored_gb * 2**30)
    slides = {r.slide.sha256: r.slide.bytes for r in records if not r.expired}
    used = sum(slides.values())
    over = used >= limit if sha256 is None else used + (0 if sha256 in slides else size) > limit
    if over:
        raise QuotaExceeded(
            f"your stored slides take {used / 2**30:.2f} GiB (quota "
            f"{services.settings.quota_stored_gb:g} GiB); delete finished jobs to free space",
            retry_after_s=services.settings.quota_retry_after_s)


# --------------------------------------------------------------------------- routes


@router.post(
    "", status_code=202, response_model=JobStatus, responses=_ERRORS, openapi_extra=_UPLOAD_DOC,
    summary="Submit a slide",
)
async def create_job(request: Request, response: Response, services: ServicesDep,
                     owner: OwnerDep) -> JobStatus:
    """Upload a slide (multipart field ``slide``) or name a stored one (``slide_sha256``), with
    optional ``options`` JSON. The slide is opened once with the workers' reader before the job is
    queued, so unreadable, non-RGB or absurd files are refused here (422)."""
    settings = services.settings
    await run_in_threadpool(_check_quotas, services, owner)
    job_id = new_job_id()
    upload = await receive_upload(request, tmp_dir=services.store.cache_dir / "uploads",
                                  limit=settings.max_upload_bytes,
                                  idle_timeout=settings.upload_idle_timeout_s,
                                  alternative="slide_sha256")
    try:
        options = _options(upload)
        model, _ = services.catalog.resolve(options.model)
        if upload.path is None:
            slide = await run_in_threadpool(
                _referenced_slide, services, upload.fields.get("slide_sha256", ""),
                upload.fields.get("name", ""), options, owner, job_id)
        else:
            slide = await run_in_threadpool(_store_upload, services, upload, options, owner, job_id)
            services.metrics.upload_bytes.inc(upload.size)
    except (ServiceError, SlideError) as exc:
        code = error_code(exc)
        services.metrics.uploads_rejected.labels(code).inc()
        raise
    finally:
        upload.discard()
    record = JobRecord(id=job_id, owner=owner, slide=slide, options=options, model=model)
    try:
        await run_in_threadpool(services.store.create_record, record)
        await run_in_threadpool(services.queue.submit, record.id)
    except BaseException:
        # Not queued: leave nothing behind (record, owner entry, slide reference, unused slide).
        await run_in_threadpool(SlideRegistry(services.store).delete_job, record)
        raise
    services.metrics.jobs_submitted.inc()
    logger.info("job %s: queued (slide %s %s, model %s, owner %s)", record.id, slide.name,
                slide.sha256[:12], model, owner)
    response.headers["Location"] = str(request.url_for("get_job", job_id=record.id))
    return _status(record, services, request)


@router.get("", response_model=JobList, responses=_ERRORS, summary="List your jobs")
def list_jobs(
    request: Request, services: ServicesDep, owner: OwnerDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    state: JobState | None = None,
) -> JobList:
    """Your jobs, newest first, ``limit`` at a time from ``offset``."""
    store = services.store
    ids = store.owner_jobs(owner)
    if state is None:
        # The owner index gives order and total: only the page's records are read.
        page = _read_records(store, ids[offset : offset + limit])
        total = len(ids)
    else:
        matching = [r for r in _read_records(store, ids) if r.state is state]
        page, total = matching[offset : offset + limit], len(matching)
    return JobList(items=[_status(r, services, request) for r in page], total=total,
                   offset=offset, limit=limit)


def _read_records(store: Store, ids: list[str]) -> list[JobRecord]:
    """The records of ``ids`` in order, skipping any deleted since the index was listed."""
    records = []
    for job_id in ids:
        with contextlib.suppress(JobNotFound):
            records.append(store.read_record(job_id))
    return records


@router.get("/{job_id}", response_model=JobStatus, responses=_ERRORS, summary="A job's state")
def get_job(job_id: str, request: Request, services: ServicesDep, owner: OwnerDep) -> JobStatus:
    """State, progress (regions done/total, nuclei so far, ETA), error and result links."""
    return _status(_own_record(services, job_id, owner), services, request)


@router.get(
    "/{job_id}/results/{name}", responses={
        **_ERRORS, 200: {"content": {"application/octet-stream": {}},
                         "description": "the file"}},
    summary="Download a result",
)
def get_result(job_id: str, name: str, services: ServicesDep, owner: OwnerDep) -> Response:
    """One output of a succeeded job: ``nuclei.geojson.gz`` (or ``nuclei.zip`` of entries with
    ``nuclei-index.json``, for large slides), ``counts.json``, ``manifest.json``, ``overlay.png``,
    ``nuclei.zarr.zip``."""
    record = _own_record(services, job_id, owner)
    if record.expired:
        raise ResultsExpired(f"job {job_id}'s results expired and were deleted")
    if record.state is not JobState.SUCCEEDED:
        raise JobNotFinished(f"job {job_id} is {record.state.value}; results exist once it succeeded")
    if name not in record.results:
        raise ResultNotFound(f"job {job_id} has no result {name!r}; it has: "
                             + ", ".join(record.results))
    store = services.store
    path = store.path(store.result_key(job_id, name))
    media = _MEDIA_TYPES.get(Path(name).suffix, "application/octet-stream")
    if store.local:
        return FileResponse(path, media_type=media, filename=name)

    def chunks():
        with store.fs.open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                yield block

    return StreamingResponse(chunks(), media_type=media,
                             headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.delete(
    "/{job_id}", responses={**_ERRORS, 200: {"model": JobStatus}, 204: {"description": "deleted"}},
    summary="Cancel or delete a job",
)
def delete_job(job_id: str, request: Request, services: ServicesDep, owner: OwnerDep) -> Response:
    """A queued or running job is cancelled (200, its status); a finished one is deleted with
    its results (204)."""
    record = _own_record(services, job_id, owner)
    store = services.store
    if not record.finished:
        store.mark_cancelled(job_id)
        record = store.update_record(job_id, lambda rec: transition(rec, JobState.CANCELLED))
        services.queue.cancel(job_id)
        logger.info("job %s: cancelled by %s", job_id, owner)
        return Response(_status(record, services, request).model_dump_json(),
                        media_type="application/json")
    SlideRegistry(store).delete_job(record)
    return Response(status_code=204)


@router.post("/{job_id}/retry", status_code=202, response_model=JobStatus, responses=_ERRORS,
             summary="Retry a failed or cancelled job")
def retry_job(job_id: str, request: Request, services: ServicesDep, owner: OwnerDep) -> JobStatus:
    """Queue a failed or cancelled job again: the regions it already finished are kept, only
    the missing ones run (a cancelled job's partial files are gone, so it starts over).
    409 ``job_not_retryable`` for a job that is queued, running or succeeded."""
    from service.errors import JobNotRetryable
    from service.jobs import RETRYABLE_STATES, reopen

    record = _own_record(services, job_id, owner)
    if record.state not in RETRYABLE_STATES:
        raise JobNotRetryable(f"job {job_id} is {record.state.value}; only a failed or cancelled "
                              "job can be retried")
    store = services.store
    store.delete(store.job_key(job_id, "cancelled"))  # before the update: the marker always wins
    record = store.update_record(job_id, reopen)
    if record.state is not JobState.QUEUED:
        raise JobNotRetryable(f"job {job_id} is {record.state.value}; only a failed or cancelled "
                              "job can be retried")
    services.queue.submit(job_id)
    logger.info("job %s: retried by %s (retry %d)", job_id, owner, record.retries)
    return _status(record, services, request)
