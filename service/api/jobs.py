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
    ResultNotFound,
    ResultsExpired,
    ServiceError,
    slide_error_code,
)
from service.jobs import JobOptions, JobRecord, JobState, SlideRef, new_job_id, transition
from service.schemas import ErrorBody, ErrorDetail, JobList, JobProgress, JobStatus, SlideInfo
from service.store import Store
from service.uploads import Upload, receive_upload
from worker.errors import SlideError

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 404, 409, 410, 413, 422, 503)}

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
                    "roi [x, y, w, h] level-0 px, tissue_mask (bool), region_size (model px)")},
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
    results = {}
    if record.state is JobState.SUCCEEDED and not record.expired:
        results = {name: str(request.url_for("get_result", job_id=record.id, name=name))
                   for name in record.results}
    error = ErrorDetail(code=record.error.code, message=record.error.message) if record.error else None
    return JobStatus(
        id=record.id, state=record.state, created_at=record.created_at,
        started_at=record.started_at, finished_at=record.finished_at, model=record.model,
        options=record.options, progress=progress, error=error, results=results,
        expired=record.expired,
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
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}"
                           for e in exc.errors())
        raise InvalidOptions(f"bad options: {detail}") from exc


def _validate_slide(path: Path, options: JobOptions) -> None:
    """Open the slide with the workers' reader, as they will (raises SlideError)."""
    from worker.slide import open_slide

    with open_slide(path, mpp=options.mpp) as slide:
        if options.roi is not None:
            x, y, _, _ = options.roi
            height, width = slide.shape[:2]
            if x >= width or y >= height:
                raise InvalidOptions(
                    f"roi {list(options.roi)} lies outside the slide ({width} x {height} px)")


def _store_upload(services: Services, upload: Upload, options: JobOptions) -> SlideRef:
    """Validate the uploaded file and put it in the store (once per content)."""
    if upload.path is None:
        raise BadUpload("no file in the form field 'slide'", code="missing_slide")
    named = upload.path.with_name(f"{upload.path.name}.{upload.ext}")
    os.replace(upload.path, named)
    upload.path = named
    _validate_slide(named, options)
    added = services.store.put_slide(named, upload.sha256, upload.ext)
    if not services.store.local:
        # Keep the file as the local cache copy so a worker on this host need not download it.
        cached = services.store.cache_dir / f"{upload.sha256}.{upload.ext}"
        if not cached.exists():
            os.replace(named, cached)
    if not added:
        services.metrics.slides_deduplicated.inc()
    return SlideRef(sha256=upload.sha256, ext=upload.ext, name=upload.name, bytes=upload.size)


def _referenced_slide(services: Services, sha256: str, name: str) -> SlideRef:
    sha256 = sha256.strip().lower()
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise BadUpload("slide_sha256 must be a SHA-256 hex digest", code="bad_request")
    for entry in services.store.names("slides"):
        stem, _, ext = entry.partition(".")
        if stem == sha256 and ext:
            size = services.store.fs.size(services.store.path(services.store.slide_key(stem, ext)))
            return SlideRef(sha256=stem, ext=ext, name=name or f"{stem[:12]}.{ext}", bytes=int(size))
    raise BadUpload(f"no slide with sha256 {sha256} in the store", code="slide_not_found")


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
    upload = await receive_upload(request, tmp_dir=services.store.cache_dir / "uploads",
                                  limit=settings.max_upload_bytes, allow_missing=True)
    try:
        options = _options(upload)
        model, _ = services.catalog.resolve(options.model)
        if upload.path is None:
            slide = await run_in_threadpool(
                _referenced_slide, services, upload.fields.get("slide_sha256", ""),
                upload.fields.get("name", ""))
            await run_in_threadpool(
                _validate_slide, services.store.local_slide(slide.sha256, slide.ext), options)
        else:
            slide = await run_in_threadpool(_store_upload, services, upload, options)
            services.metrics.upload_bytes.inc(upload.size)
    except (ServiceError, SlideError) as exc:
        code = exc.code if isinstance(exc, ServiceError) else slide_error_code(exc)
        services.metrics.uploads_rejected.labels(code).inc()
        raise
    finally:
        upload.discard()
    record = JobRecord(id=new_job_id(), owner=owner, slide=slide, options=options, model=model)
    await run_in_threadpool(services.store.create_record, record)
    await run_in_threadpool(services.queue.submit, record.id)
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
    """One output of a succeeded job: ``nuclei.geojson.gz`` (or its parts), ``counts.json``,
    ``manifest.json``, ``overlay.png``, ``nuclei.zarr.zip``, ``nuclei-index.json``."""
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
    store.delete_job(record)
    logger.info("job %s: deleted by %s", job_id, owner)
    return Response(status_code=204)
