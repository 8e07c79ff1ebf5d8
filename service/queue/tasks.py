"""The job's task functions, shared by the embedded queue and the RQ workers.

A job runs as ``prepare_job`` (plan the regions) → ``run_region`` for each region (any worker, in
any order, possibly more than once) → ``finalize_job`` (merge, write outputs). Every task reads its
inputs from the store and writes its result there, so a retried or duplicated task is harmless.

The process-wide :class:`TaskContext` (store, model catalog, settings) is installed once at process
start with :func:`set_context`; task arguments are plain ids so they serialise for any queue.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.catalog import Catalog
from service.errors import ServiceError, error_code
from service.jobs import JobError, JobRecord, JobState, transition
from service.settings import Settings
from service.store import Store, load_table, save_table
from worker.job import RegionResult, SlidePlan
from worker.options import InferenceOptions
from worker.tile_cache import TileCache, TileUsers

__all__ = [
    "TaskContext",
    "cleanup_cancelled",
    "fail_job",
    "finalize_job",
    "get_context",
    "prepare_job",
    "run_region",
    "set_context",
]

logger = logging.getLogger(__name__)


@dataclass
class TaskContext:
    """What tasks need: where data lives, which models exist, how to run them, who runs them."""

    store: Store
    catalog: Catalog
    settings: Settings
    worker_name: str = dataclasses.field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")


_CONTEXT: TaskContext | None = None
_PLANS: dict[str, SlidePlan] = {}
_MODELS: dict[tuple[str, float], Any] = {}
_USERS: dict[tuple[str, int], TileUsers] = {}


def set_context(context: TaskContext) -> None:
    """Install the context tasks of this process use."""
    global _CONTEXT
    _CONTEXT = context
    _PLANS.clear()


def get_context() -> TaskContext:
    if _CONTEXT is None:
        raise RuntimeError("no task context: call service.queue.tasks.set_context() at start-up")
    return _CONTEXT


def _model(path: Path, ctx: TaskContext):
    """One loaded ONNX session per model file and process (loading costs more than a region)."""
    from worker.infer import load_model

    key = (str(path), path.stat().st_mtime)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(path, device=ctx.settings.device,  # type: ignore[arg-type]
                                  batch_size=ctx.settings.batch_size,
                                  trt_cache=ctx.settings.trt_cache, trt_fp16=ctx.settings.trt_fp16)
    return _MODELS[key]


def _plan(job_id: str, ctx: TaskContext) -> SlidePlan:
    """The job's stored plan, pointed at this worker's local copy of the slide (a new value:
    the stored plan is never changed)."""
    if job_id not in _PLANS:
        record = ctx.store.read_record(job_id)
        local = ctx.store.local_slide(record.slide.sha256, record.slide.ext)
        if len(_PLANS) > 8:
            _PLANS.clear()
        _PLANS[job_id] = ctx.store.read_plan(job_id).at(local)
    return _PLANS[job_id]


def _tiles(job_id: str, plan: SlidePlan, tile: int, ctx: TaskContext
           ) -> tuple[TileCache, TileUsers]:
    """The job's store of the tiles its regions share (``jobs/<id>/tiles/``) and which they are."""
    key = (job_id, tile)
    if key not in _USERS:
        if len(_USERS) > 8:
            _USERS.clear()
        _USERS[key] = TileUsers.of(plan.regions, tile)
    return TileCache(ctx.store.fs, ctx.store.tiles_root(job_id)), _USERS[key]


def _options(record: JobRecord, model_path: Path, ctx: TaskContext) -> InferenceOptions:
    opts = record.options
    return InferenceOptions(
        model=model_path, mpp=opts.mpp, roi=opts.roi,
        region_size=opts.region_size or ctx.settings.region_size,
        batch_size=ctx.settings.batch_size, workers=0, device=ctx.settings.device,  # type: ignore[arg-type]
        tissue="auto" if opts.tissue_mask else "none", objects=opts.objects,
        min_class_prob=opts.min_class_prob, trt_cache=ctx.settings.trt_cache,
        trt_fp16=ctx.settings.trt_fp16,
    )


def _active(job_id: str, ctx: TaskContext) -> JobRecord | None:
    """The job's record if it still wants work, else None (cancelled, failed or done)."""
    record = ctx.store.read_record(job_id)
    if record.finished or ctx.store.is_cancelled(job_id):
        logger.info("job %s: %s, task skipped", job_id, record.state.value)
        return None
    return record


def _set_phase(job_id: str, phase: str, ctx: TaskContext) -> None:
    def change(rec: JobRecord) -> None:
        if not rec.finished:
            rec.phase = phase

    ctx.store.update_record(job_id, change)


def cleanup_cancelled(job_id: str, ctx: TaskContext | None = None) -> bool:
    """If the job was cancelled, remove its partial files (plan, regions, results); True if so.

    Called after every write of a task: work still running when a job is cancelled cleans up
    after itself, whichever queue ran it.
    """
    ctx = ctx or get_context()
    if not ctx.store.is_cancelled(job_id):
        return False
    try:
        if ctx.store.read_record(job_id).state is not JobState.CANCELLED:
            return False  # it finished just before the cancel: its results stay
    except ServiceError:
        return True  # deleted meanwhile: nothing left to clean
    ctx.store.delete_job_data(job_id)
    _PLANS.pop(job_id, None)
    logger.info("job %s: cancelled; its partial files were removed", job_id)
    return True


def prepare_job(job_id: str) -> list[int] | None:
    """Plan the job's regions (once; a retry reuses the stored plan).

    Returns the indices of the regions to run (possibly none: no tissue), or None when the job no
    longer wants work (cancelled or finished).
    """
    ctx = get_context()
    record = _active(job_id, ctx)
    if record is None:
        return None
    if not ctx.store.has_plan(job_id):
        from worker.stages import prepare

        _set_phase(job_id, "preparing", ctx)
        _, model_path = ctx.catalog.resolve(record.model)
        card = ctx.catalog.card(record.model)
        slide = ctx.store.local_slide(record.slide.sha256, record.slide.ext)
        ctx.store.write_plan(job_id, prepare(slide, card, _options(record, model_path, ctx),
                                             name=record.slide.name))
        if cleanup_cancelled(job_id, ctx):
            return None
    plan = _plan(job_id, ctx)
    total = len(plan.regions)

    def start_running(rec: JobRecord) -> None:
        if transition(rec, JobState.RUNNING):
            rec.regions_total = total
            rec.phase = "segmenting"

    ctx.store.update_record(job_id, start_running)
    logger.info("job %s: %d regions planned", job_id, total)
    return [region.index for region in plan.regions]


def run_region(job_id: str, index: int) -> int:
    """Segment one region and store its nuclei; returns how many (idempotent)."""
    from worker.stages import process_region

    ctx = get_context()
    if ctx.store.has_region(job_id, index):
        logger.info("job %s: region %d already done", job_id, index)
        return -1
    record = _active(job_id, ctx)
    if record is None:
        return -1
    plan = _plan(job_id, ctx)
    region = plan.region(index)
    _, model_path = ctx.catalog.resolve(record.model)
    model = _model(model_path, ctx)
    cache, users = _tiles(job_id, plan, model.card.output_size, ctx)
    result = process_region(plan, region, model, tiles=(cache, users))
    table, seconds = result.table, result.seconds
    data = save_table(table, worker=ctx.worker_name, seconds=seconds, patches=result.patches)
    ctx.store.write_region(job_id, index, data, len(table))
    # A shared tile goes once every region holding it has its nuclei (a region retried later
    # finds it gone and infers it again: the cache saves work, it never changes a result).
    done = {i for i in users.neighbours(region) if i == index or ctx.store.has_region(job_id, i)}
    cache.discard(users.finished(region, done))
    if cleanup_cancelled(job_id, ctx):
        return -1
    logger.info("job %s: region %d: %d nuclei in %.2f s on %s", job_id, index, len(table), seconds,
                ctx.worker_name)
    return len(table)


def finalize_job(job_id: str) -> list[str]:
    """Merge every region's nuclei, write the outputs and mark the job succeeded."""
    from worker.job import Timings
    from worker.stages import finish

    ctx = get_context()
    record = _active(job_id, ctx)
    if record is None:
        return []
    _set_phase(job_id, "finalizing", ctx)
    plan = _plan(job_id, ctx)
    tables = []
    workers: dict[str, str] = {}
    seconds = 0.0
    for region in plan.regions:
        table, meta = load_table(ctx.store.read_region(job_id, region.index))
        tables.append(RegionResult(region.index, table, patches=int(meta.get("patches", 0))))
        workers[str(region.index)] = str(meta.get("worker", "?"))
        seconds += float(meta.get("seconds", 0.0))
    _, model_path = ctx.catalog.resolve(record.model)
    card = ctx.catalog.card(record.model)
    parameters = {
        **_options(record, model_path, ctx).parameters(), "model": record.model,
        "job": job_id, "region_workers": workers, "workers": sorted(set(workers.values())),
    }
    root = ctx.store.results_root(job_id)
    done = finish(plan, tables, fs=ctx.store.fs, root=root, card=card, parameters=parameters,
                  timings=Timings(plan=plan.plan_seconds, regions_cpu=seconds))
    ctx.store.delete_tiles(job_id)  # what retried regions left behind
    _index_nuclei(root, ctx)
    names = sorted(name for name in done.outputs if name != "nuclei.zarr")

    def succeed(rec: JobRecord) -> None:
        if transition(rec, JobState.SUCCEEDED):
            rec.results = names
            rec.phase = "done"

    ctx.store.update_record(job_id, succeed)
    if cleanup_cancelled(job_id, ctx):
        return []
    logger.info("job %s: succeeded, %d nuclei %s", job_id, len(done.table), done.counts)
    _PLANS.pop(job_id, None)
    return names


def _index_nuclei(root: str, ctx: TaskContext) -> None:
    """Build the viewer's spatial index of the nuclei; a failure only defers it to first use."""
    from worker.nuclei_index import build_index_from_results

    try:
        build_index_from_results(ctx.store.fs, root)
    except (OSError, ValueError) as exc:
        logger.warning("nuclei index not built now (%s); the viewer builds it on first use", exc)


def fail_job(job_id: str, exc: BaseException | None, *, reason: str | None = None,
             code: str | None = None, ctx: TaskContext | None = None) -> None:
    """Mark the job failed with the exception's reason (and traceback) or ``reason``; ``code``
    overrides the error code the exception implies. ``ctx`` defaults to the process's task
    context (a queue running in the API process passes its own)."""
    ctx = ctx or get_context()
    code = code or error_code(exc)
    message = reason or (f"{type(exc).__name__}: {exc}" if exc is not None else "the job failed")
    trace = "".join(traceback.format_exception(exc)) if exc is not None else None
    error = JobError(code=code, message=message, traceback=trace)

    def fail(rec: JobRecord) -> None:
        if transition(rec, JobState.FAILED, error=error):
            rec.phase = "done"

    ctx.store.update_record(job_id, fail)
    ctx.store.delete_tiles(job_id)  # only regions of a live job read them
    logger.warning("job %s: failed: %s", job_id, message)
