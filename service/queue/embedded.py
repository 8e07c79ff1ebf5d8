"""The embedded queue: jobs run without Redis, driven by threads of the API process.

The tasks themselves run in a child process (one per thread) so that slide decoding, inference and
post-processing never hold the API's GIL: status requests stay fast while a slide is processed,
and a crash in a native library costs one task attempt, not the API.

Durable through the store: on start it takes up every job a previous process left unfinished
(their finished regions are kept, so only the rest is redone). A job interrupted more than the
retry policy allows fails with that reason instead of looping forever.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from service.catalog import Catalog
from service.jobs import JobRecord, JobState
from service.queue.tasks import (
    TaskContext,
    fail_job,
    finalize_job,
    prepare_job,
    run_region,
    set_context,
)
from service.settings import Settings
from service.store import Store
from worker.errors import SlideError

__all__ = ["EmbeddedQueue"]

logger = logging.getLogger(__name__)

_STOP = object()


TASK_NICENESS = 10
"""Scheduling niceness added to the task process: requests to the API come first."""


def _init_child(settings: Settings) -> None:
    """Task process start-up: the same context as the API's, built from the same settings."""
    from worker.pipeline import exit_with_parent

    exit_with_parent()  # an API killed outright must not leave its task process behind
    os.nice(TASK_NICENESS)
    store = Store(settings.store, cache_dir=settings.cache_dir, storage_options=settings.store_options)
    set_context(TaskContext(store=store, catalog=Catalog(settings.models_dir), settings=settings,
                            worker_name="embedded"))


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


class EmbeddedQueue:
    """Runs jobs on ``threads`` threads of this process, one task at a time per job."""

    kind = "embedded"

    def __init__(self, context: TaskContext, *, threads: int = 1, max_attempts: int = 3) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.context = context
        self.max_attempts = max_attempts
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._threads = [threading.Thread(target=self._loop, name=f"hoverserve-job-{i}", daemon=True)
                         for i in range(threads)]
        self._pool: ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EmbeddedQueue(threads={len(self._threads)})"

    def start(self) -> None:
        """Take up unfinished jobs of earlier runs, then start the threads."""
        store = self.context.store
        for record in sorted(store.records(), key=lambda r: r.created_at):
            if record.finished:
                continue
            self._resume(record)
        for thread in self._threads:
            thread.start()

    def _resume(self, record: JobRecord) -> None:
        store = self.context.store
        if record.state is JobState.RUNNING:
            def count(rec: JobRecord) -> None:
                rec.attempts += 1
            record = store.update_record(record.id, count)
            if record.attempts >= self.max_attempts:
                fail_job(record.id, None, reason=(
                    f"interrupted {record.attempts} times (server restarts); giving up"))
                return
        logger.info("job %s: resumed after restart (%s)", record.id, record.state.value)
        self._jobs.put(record.id)

    def submit(self, job_id: str) -> None:
        self._jobs.put(job_id)

    def ready(self) -> bool:
        return all(thread.is_alive() for thread in self._threads)

    def cancel(self, job_id: str) -> int:
        """Nothing to withdraw: the job's thread checks the cancel marker before every task."""
        return 0

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=5)
        with self._pool_lock:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def _in_child(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a task in the task process (started on first use, restarted after a crash)."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    len(self._threads), mp_context=multiprocessing.get_context("spawn"),
                    initializer=_init_child, initargs=(self.context.settings,))
            pool = self._pool
        try:
            return pool.submit(_call, fn, *args).result()
        except BrokenProcessPool:
            with self._pool_lock:
                if self._pool is pool:
                    self._pool = None
            raise

    def _loop(self) -> None:
        while True:
            job_id = self._jobs.get()
            if job_id is _STOP:
                return
            try:
                self._run(job_id)
            except Exception as exc:  # the job is failed with its reason; the thread carries on
                logger.exception("job %s: failed", job_id)
                try:
                    fail_job(job_id, exc)
                except Exception:
                    logger.exception("job %s: cannot record the failure", job_id)

    def _attempt(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call a task under the retry policy: slide errors are final, others retried."""
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._in_child(fn, *args)
            except SlideError:
                raise
            except Exception:
                if attempt == self.max_attempts:
                    raise
                logger.warning("task %s%r failed (attempt %d of %d), retrying", fn.__name__, args,
                               attempt, self.max_attempts, exc_info=True)
        raise RuntimeError("unreachable")

    def _run(self, job_id: str) -> None:
        indices = self._attempt(prepare_job, job_id)
        if indices is None:
            return
        for index in indices:
            if self.context.store.is_cancelled(job_id):
                return
            self._attempt(run_region, job_id, index)
        self._attempt(finalize_job, job_id)
