"""RQ on Redis: the job's tasks spread over any number of ``hoverserve worker`` processes.

``prepare`` fans out one RQ job per region and a ``finalize`` job that depends on all of them.
Every RQ job carries the retry policy (:class:`~service.queue.retry.RetryPolicy`: ``max_attempts``)
and a timeout; errors the policy calls final (bad slides) fail the job at once, without a retry;
when a task's last attempt fails, the failure callback marks the HoVerServe job failed with the
reason. A job retried through the API gets fresh RQ job ids (``hs-<id>-<retries>-...``).

The RQ workers own the tasks: no queue lock is needed, and the API never resumes jobs itself.

Workers beat a short-lived Redis key; each worker's reaper hands the started tasks of a worker
whose beat stopped (SIGKILL, lost host) back to RQ's abandoned-job handling, which retries them
elsewhere. RQ alone would notice only after the task's whole timeout.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from redis import Redis
from rq import Callback, Queue, Retry, SimpleWorker, get_current_job
from rq.exceptions import AbandonedJobError, InvalidJobOperation, NoSuchJobError
from rq.job import Job

from service.catalog import Catalog
from service.errors import JobNotFound
from service.queue import tasks
from service.queue.retry import RetryPolicy, WorkerDied, describe_failure
from service.queue.tasks import TaskContext
from service.settings import Settings
from service.store import Store

__all__ = ["RQQueue", "reap_abandoned", "run_worker"]

logger = logging.getLogger(__name__)

ALIVE_KEY = "hoverserve:alive:{0}"
"""Redis key a live worker keeps refreshing (value: its pid); expires when the worker dies."""


_TASK_NAMES = {"prepare_task": "planning the slide", "finalize_task": "writing the results"}


def _policy(settings: Settings) -> dict[str, Any]:
    """RQ enqueue options carrying the retry policy."""
    retries = RetryPolicy(max_attempts=settings.max_attempts).retries
    return {
        "retry": Retry(max=retries) if retries > 0 else None,
        "job_timeout": settings.task_timeout_s,
        "result_ttl": 24 * 3600,
        "failure_ttl": 7 * 24 * 3600,
        "on_failure": Callback(on_task_failure),
    }


def on_task_failure(job: Job, connection: Redis, exc_type: Any, exc: Any, tb: Any) -> None:
    """RQ failure callback: once a task has no retry left, its HoVerServe job fails."""
    if job.should_retry:
        logger.warning("job %s: task %s failed (%s), %s retries left", job.args[0], job.id,
                       exc_type.__name__ if exc_type else "?", job.retries_left)
        return
    if exc_type is AbandonedJobError or isinstance(exc, AbandonedJobError) or exc is None:
        exc = WorkerDied(detail="its worker stopped beating")
    name = (job.func_name or "?").rsplit(".", 1)[-1]
    task = _TASK_NAMES.get(name, f"region {job.args[1]}" if len(job.args) > 1 else name)
    attempts = RetryPolicy(max_attempts=tasks.get_context().settings.max_attempts).max_attempts
    reason = describe_failure(exc, attempts=attempts, task=task)
    tasks.fail_job(job.args[0], exc if isinstance(exc, BaseException) else None, reason=reason)


# --------------------------------------------------------------------------- RQ task functions


def _final_errors_fail_now(fn: Callable[..., Any], job_id: str, *args: Any) -> Any:
    """Run a task; an error the retry policy calls final fails the job now (RQ would retry it)."""
    policy = RetryPolicy(max_attempts=tasks.get_context().settings.max_attempts)
    try:
        return fn(job_id, *args)
    except JobNotFound:
        logger.info("job %s: deleted; task %s dropped", job_id, fn.__name__)
        return None
    except Exception as exc:
        if not policy.is_final(exc):
            raise
        logger.warning("job %s: %s: %s (final, no retry)", job_id, fn.__name__, exc)
        tasks.fail_job(job_id, exc, reason=describe_failure(exc, attempts=1, task=fn.__name__))
        return None


def _rq_id(job_id: str, retries: int, part: str) -> str:
    """The RQ job id of one task of a HoVerServe job (fresh ids for each API retry)."""
    return f"hs-{job_id}-{part}" if retries == 0 else f"hs-{job_id}-{retries}-{part}"


def prepare_task(job_id: str) -> int:
    """Plan the slide, then enqueue its region tasks and the finalize task."""
    indices = _final_errors_fail_now(tasks.prepare_job, job_id)
    if indices is None:
        return 0
    current = get_current_job()
    if current is None:
        raise RuntimeError("prepare_task must run inside an RQ worker")
    queue = Queue(current.origin, connection=current.connection)
    ctx = tasks.get_context()
    policy = _policy(ctx.settings)
    retries = ctx.store.read_record(job_id).retries
    regions = [queue.enqueue(region_task, job_id, index, job_id=_rq_id(job_id, retries, f"r{index}"),
                             **policy)
               for index in indices]
    queue.enqueue(finalize_task, job_id, job_id=_rq_id(job_id, retries, "finalize"),
                  depends_on=regions or None, **policy)
    return len(indices)


def region_task(job_id: str, index: int) -> int:
    return _final_errors_fail_now(tasks.run_region, job_id, index) or 0


def finalize_task(job_id: str) -> int:
    return len(_final_errors_fail_now(tasks.finalize_job, job_id) or [])


# --------------------------------------------------------------------------- API side


class RQQueue:
    """The API's handle on the RQ queue."""

    kind = "redis"

    def __init__(self, context: TaskContext, *, policy: RetryPolicy | None = None) -> None:
        self.settings = context.settings
        self.store = context.store
        self.policy = policy or RetryPolicy(max_attempts=self.settings.max_attempts)
        self.redis = Redis.from_url(self.settings.redis_url or "")
        self.queue = Queue(self.settings.queue_name, connection=self.redis)

    def __repr__(self) -> str:
        return f"RQQueue({self.settings.queue_name!r})"

    def start(self) -> None:
        self.redis.ping()

    def submit(self, job_id: str) -> None:
        retries = self.store.read_record(job_id).retries
        self.queue.enqueue(prepare_task, job_id, job_id=_rq_id(job_id, retries, "prepare"),
                           **_policy(self.settings))

    def ready(self) -> bool:
        return bool(self.redis.ping())

    def cancel(self, job_id: str) -> int:
        """Withdraw the job's tasks that no worker has started (queued, or waiting on others).

        A task already running sees the store's cancel marker and stops at its next check.
        Returns the number of RQ jobs withdrawn.
        """
        prefix = f"hs-{job_id}-"
        waiting = [*self.queue.get_job_ids(), *self.queue.deferred_job_registry.get_job_ids()]
        withdrawn = 0
        for rq_id in waiting:
            if not rq_id.startswith(prefix):
                continue
            try:
                Job.fetch(rq_id, connection=self.redis).cancel()
            except (NoSuchJobError, InvalidJobOperation):
                continue  # started or gone meanwhile
            withdrawn += 1
        logger.info("job %s: %d queued tasks withdrawn", job_id, withdrawn)
        return withdrawn

    def close(self) -> None:
        self.redis.close()


# --------------------------------------------------------------------------- worker side


def reap_abandoned(redis: Redis, queue: Queue) -> list[str]:
    """Hand tasks started by dead workers (no alive key) to RQ's abandoned-job handling.

    Returns the RQ job ids handed over; RQ retries them (or fails them, calling the failure
    callback) exactly as for a job whose heartbeat expired.
    """
    registry = queue.started_job_registry
    abandoned: list[str] = []
    for entry in redis.zrange(registry.key, 0, -1):
        text = entry.decode() if isinstance(entry, bytes) else str(entry)
        member: str = text
        job_id = text.split(":", 1)[0]
        job = Job.fetch(job_id, connection=redis) if redis.exists(Job.key_for(job_id)) else None
        if job is None or not job.worker_name:
            continue
        if not redis.exists(ALIVE_KEY.format(job.worker_name)):
            redis.zadd(registry.key, {member: 0})
            abandoned.append(job_id)
    if abandoned:
        logger.warning("tasks of dead workers handed back for retry: %s", ", ".join(abandoned))
        registry.cleanup()
    return abandoned


class _Beat(threading.Thread):
    """Keeps this worker's alive key fresh and reaps dead workers' tasks."""

    def __init__(self, redis: Redis, queue: Queue, name: str, dead_after_s: float) -> None:
        super().__init__(name="hoverserve-beat", daemon=True)
        self.redis, self.queue, self.worker_name = redis, queue, name
        self.dead_after_s = dead_after_s
        self.stop = threading.Event()

    def beat(self) -> None:
        self.redis.set(ALIVE_KEY.format(self.worker_name), os.getpid(),
                       px=int(self.dead_after_s * 1000))

    def run(self) -> None:
        while not self.stop.wait(self.dead_after_s / 4):
            try:
                self.beat()
                reap_abandoned(self.redis, self.queue)
            except Exception:  # Redis hiccups: try again at the next beat
                logger.exception("worker %s: heartbeat/reaper failed", self.worker_name)


def _forget_dead_namesake(redis: Redis, name: str) -> None:
    """Drop the RQ registration of a killed worker of the same name (it never deregistered)."""
    if redis.exists(ALIVE_KEY.format(name)):
        return  # a live worker has this name: RQ refuses the new one with its own message
    stale = SimpleWorker.find_by_key(SimpleWorker.redis_worker_namespace_prefix + name,
                                     connection=redis)
    if stale is not None:
        logger.warning("worker %s: forgetting the registration of a dead worker of that name", name)
        stale.register_death()


def run_worker(settings: Settings, *, name: str | None = None, burst: bool = False) -> None:
    """Run a worker until stopped (or, with ``burst``, until the queue is empty)."""
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    store = Store(settings.store, cache_dir=settings.cache_dir, storage_options=settings.store_options)
    tasks.set_context(TaskContext(store=store, catalog=Catalog(settings.models_dir),
                                  settings=settings, worker_name=name))
    redis = Redis.from_url(settings.redis_url or "")
    queue = Queue(settings.queue_name, connection=redis)
    _forget_dead_namesake(redis, name)
    beat = _Beat(redis, queue, name, settings.worker_dead_after_s)
    beat.beat()
    beat.start()
    # SimpleWorker runs tasks in this process: the ONNX session and the opened slide stay cached
    # between regions (a forking worker would reload the model for every task).
    worker = SimpleWorker([queue], connection=redis, name=name)
    logger.info("worker %s: queue %s on %s, store %s", name, settings.queue_name, settings.redis_url,
                settings.store)
    try:
        worker.work(burst=burst, logging_level="WARNING")
    finally:
        beat.stop.set()
        redis.delete(ALIVE_KEY.format(name))
