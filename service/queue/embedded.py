"""The embedded queue: the job tasks run on threads inside the API process (no Redis needed).

Durable through the store: on start it takes up every job a previous process left unfinished
(their finished regions are kept, so only the rest is redone). A job interrupted more than the
retry policy allows fails with that reason instead of looping forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from service.jobs import JobRecord, JobState
from service.queue.tasks import TaskContext, fail_job, finalize_job, prepare_job, run_region
from worker.errors import SlideError

__all__ = ["EmbeddedQueue"]

logger = logging.getLogger(__name__)

_STOP = object()


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

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=5)

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
                return fn(*args)
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
