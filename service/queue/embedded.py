"""The embedded queue: jobs run without Redis, driven by threads of the API process.

The tasks themselves run in a child process per thread (:class:`~service.queue.child.TaskProcess`)
so that slide work never holds the API's GIL, a native crash costs one task attempt, not the API,
and a cancelled job's task is stopped at once by killing its process.

One owner per store: only the process holding the store's queue lock
(:class:`service.lock.StoreLock`) runs jobs. Any other ``serve`` on the same store is an API-only
replica: it accepts jobs and leaves a marker in ``queue/inbox/``, which the owner picks up at its
next heartbeat; it never resumes, re-runs or fails a job. When the owner stops (cleanly or not),
a replica takes the lock over and becomes the owner.

Durable through the store: the new owner takes up every job left unfinished (their finished
regions are kept, so only the rest is redone). A job whose owner died (no clean shutdown) while
it ran counts one interruption; more than the retry policy allows fails it with that reason
instead of looping forever. A clean shutdown (SIGTERM) is recorded in the lock and costs nothing.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from service.errors import JobNotFound
from service.jobs import JobRecord, JobState, is_job_id
from service.lock import StoreLock
from service.queue.child import TaskProcess
from service.queue.retry import RetryPolicy, TaskInterrupted, WorkerDied, describe_failure
from service.queue.tasks import (
    TaskContext,
    cleanup_cancelled,
    fail_job,
    finalize_job,
    prepare_job,
    run_region,
)

__all__ = ["INBOX", "EmbeddedQueue"]

logger = logging.getLogger(__name__)

INBOX = "queue/inbox"
"""Store folder of jobs submitted through a replica, waiting for the queue owner to take them."""

_STOP = object()

CANCELLED = "cancelled"
"""The reason a cancelled job's task is stopped (the other reasons only pause the job)."""


class _TaskFailed(Exception):
    def __init__(self, exc: BaseException, attempts: int, task: str) -> None:
        super().__init__(str(exc))
        self.exc, self.attempts, self.task = exc, attempts, task


class EmbeddedQueue:
    """Runs jobs on ``threads`` threads of this process, one task at a time per job.

    Parameters
    ----------
    context : TaskContext
        Store, catalog and settings.
    threads : int
        Jobs run at once.
    policy : RetryPolicy, optional
        Default: ``RetryPolicy(settings.max_attempts)``.
    port : int, optional
        This server's HTTP port, recorded in the queue lock.
    """

    kind = "embedded"

    def __init__(self, context: TaskContext, *, threads: int = 1, policy: RetryPolicy | None = None,
                 port: int | None = None) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        settings = context.settings
        self.context = context
        self.policy = policy or RetryPolicy(max_attempts=settings.max_attempts)
        self.lock = StoreLock(context.store, port=port, heartbeat_s=settings.lock_heartbeat_s,
                              stale_beats=settings.lock_stale_beats)
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._known: set[str] = set()  # ids waiting or running here
        self._cancelled: set[str] = set()
        self._again: set[str] = set()  # submitted again (retried) while still here
        self._guard = threading.Lock()
        self._closing = threading.Event()
        self._procs = [TaskProcess(settings, name=f"hoverserve-task-{i}") for i in range(threads)]
        self._threads = [threading.Thread(target=self._loop, args=(i,), name=f"hoverserve-job-{i}",
                                          daemon=True) for i in range(threads)]
        self._keeper = threading.Thread(target=self._keep, name="hoverserve-queue-lock", daemon=True)

    def __repr__(self) -> str:
        return f"EmbeddedQueue(threads={len(self._threads)}, role={self.role})"

    @property
    def role(self) -> str:
        """``owner`` (runs the store's jobs) or ``replica`` (API only)."""
        return "owner" if self.lock.held else "replica"

    # ------------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Take the store's queue lock if it is free (and up unfinished jobs), then start."""
        if self.lock.try_acquire():
            self._take_over()
        else:
            holder = self.lock.holder()
            logger.warning(
                "store %s: its queue is run by %s; this server is an API-only replica (it accepts "
                "jobs for that server to run and takes over if it stops)", self.context.store.url,
                holder.describe() if holder else "another process")
        # Task processes ignore SIGTERM; multiprocessing's own exit hook would wait for them.
        atexit.register(self._stop_processes)
        for thread in self._threads:
            thread.start()
        self._keeper.start()

    def close(self) -> None:
        """Stop: running tasks are killed (their jobs stay as they are), the lock is released."""
        self._closing.set()
        for _ in self._threads:
            self._jobs.put(_STOP)
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout=10)
        self._keeper.join(timeout=5)
        self._stop_processes()
        atexit.unregister(self._stop_processes)
        self.lock.release()
        logger.info("embedded queue stopped cleanly (store %s)", self.context.store.url)

    def _stop_processes(self) -> None:
        for proc in self._procs:
            proc.stop()

    def ready(self) -> bool:
        return self._keeper.is_alive() and all(thread.is_alive() for thread in self._threads)

    def submit(self, job_id: str) -> None:
        if self.lock.held:
            self._enqueue(job_id)
        else:
            self.context.store.write_bytes(f"{INBOX}/{job_id}", b"")
            logger.info("job %s: left for the store's queue owner", job_id)

    def cancel(self, job_id: str) -> int:
        """Stop the job's running task now (a replica's cancel reaches it via the store marker)."""
        with self._guard:
            if job_id in self._known:
                self._cancelled.add(job_id)
        return 0

    # ------------------------------------------------------------------ ownership

    def _take_over(self) -> None:
        previous = self.lock.previous
        crashed = previous is not None and not previous.released
        if previous is None:
            how = "the first owner"
        elif crashed:
            how = f"taken over from {previous.describe()}, which stopped without a clean shutdown"
        else:
            how = "the previous owner stopped cleanly"
        logger.info("store %s: this server runs its queue (%s)", self.context.store.url, how)
        for name in self.context.store.names(INBOX):
            self.context.store.delete(f"{INBOX}/{name}")  # the scan below covers them
        for record in sorted(self.context.store.records(), key=lambda r: r.created_at):
            if not record.finished:
                self._resume(record, crashed=crashed)

    def _resume(self, record: JobRecord, *, crashed: bool) -> None:
        if crashed and (record.state is JobState.RUNNING or record.phase == "preparing"):
            def count(rec: JobRecord) -> None:
                rec.attempts += 1

            record = self.context.store.update_record(record.id, count)
            if record.attempts >= self.policy.max_attempts:
                times = "once" if record.attempts == 1 else f"{record.attempts} times"
                fail_job(record.id, None, code="server_died", ctx=self.context, reason=(
                    f"the server running this job died — killed or out of memory — {times}; "
                    "giving up (POST /v1/jobs/<id>/retry runs it again)"))
                return
        logger.info("job %s: taken up (%s)", record.id, record.state.value)
        self._enqueue(record.id)

    def _enqueue(self, job_id: str) -> None:
        with self._guard:
            if job_id in self._known:
                self._again.add(job_id)  # e.g. retried before its cancel was handled: run once more
                return
            self._known.add(job_id)
        self._jobs.put(job_id)

    def _keep(self) -> None:
        """Heartbeat the lock and pick up the inbox (owner), or wait to take over (replica)."""
        while not self._closing.wait(self.lock.heartbeat_s):
            try:
                if self.lock.held:
                    if self.lock.refresh():
                        self._scan_inbox()
                    else:
                        self._drop_all()
                elif self.lock.try_acquire():
                    self._take_over()
            except Exception:  # a store hiccup: try again at the next beat
                logger.exception("store %s: queue lock heartbeat failed", self.context.store.url)

    def _scan_inbox(self) -> None:
        store = self.context.store
        for name in store.names(INBOX):
            if is_job_id(name):
                self._enqueue(name)
            store.delete(f"{INBOX}/{name}")

    def _drop_all(self) -> None:
        """Lost the lock: forget waiting jobs (the new owner runs them); running ones stop."""
        with self._guard:
            while True:
                try:
                    item = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._jobs.put(item)
                    break
                self._known.discard(item)
                self._again.discard(item)

    # ------------------------------------------------------------------ running jobs

    def _stop_reason(self, job_id: str, check_store: bool) -> str | None:
        if self._closing.is_set():
            return "the server is shutting down"
        if not self.lock.held:
            return "this server no longer runs the store's queue"
        if job_id in self._cancelled or (check_store and self.context.store.is_cancelled(job_id)):
            return CANCELLED
        return None

    def _watcher(self, job_id: str) -> Callable[[], str | None]:
        """``should_stop`` for a task: local signals at every poll, the store's marker every second."""
        last = [0.0]

        def should_stop() -> str | None:
            now = time.monotonic()
            check_store = now - last[0] >= 1.0
            if check_store:
                last[0] = now
            return self._stop_reason(job_id, check_store)

        return should_stop

    def _loop(self, index: int) -> None:
        proc = self._procs[index]
        while True:
            job_id = self._jobs.get()
            if job_id is _STOP:
                proc.stop()
                return
            try:
                self._run(job_id, proc)
            except TaskInterrupted as stop:
                if stop.why == CANCELLED:
                    # The cancel may land between two tasks: the child is then idle but was the
                    # job's; stop it too, so a cancel always ends the job's process (the next job
                    # starts a fresh one).
                    proc.stop()
                    self._cleanup(job_id)
                else:
                    logger.info("job %s: paused (%s); it resumes where it stopped", job_id, stop.why)
            except JobNotFound:
                logger.info("job %s: deleted while queued", job_id)
            except _TaskFailed as failed:
                reason = describe_failure(failed.exc, attempts=failed.attempts, task=failed.task)
                self._fail(job_id, failed.exc, reason)
            except Exception as exc:  # the job is failed with its reason; the thread carries on
                logger.exception("job %s: failed", job_id)
                self._fail(job_id, exc, None)
            finally:
                self._done(job_id)

    def _done(self, job_id: str) -> None:
        with self._guard:
            self._cancelled.discard(job_id)
            again = job_id in self._again and not self._closing.is_set()
            self._again.discard(job_id)
            if not again:
                self._known.discard(job_id)
        if again:
            self._jobs.put(job_id)

    def _fail(self, job_id: str, exc: BaseException, reason: str | None) -> None:
        try:
            fail_job(job_id, exc, reason=reason, ctx=self.context)
        except JobNotFound:
            logger.info("job %s: deleted before its failure could be recorded", job_id)
        except Exception:
            logger.exception("job %s: cannot record the failure", job_id)

    def _cleanup(self, job_id: str) -> None:
        try:
            cleanup_cancelled(job_id, self.context)
        except Exception:
            logger.exception("job %s: cannot remove the partial files of the cancelled job", job_id)

    def _attempt(self, proc: TaskProcess, task: str, fn: Callable[..., Any], job_id: str,
                 *args: Any) -> Any:
        """Call a task under the retry policy (raises _TaskFailed once the policy gives up)."""
        should_stop = self._watcher(job_id)
        attempt = 0
        while True:
            attempt += 1
            if why := self._stop_reason(job_id, check_store=True):
                raise TaskInterrupted(job_id, why)
            try:
                return proc.run(fn, (job_id, *args), job_id=job_id, should_stop=should_stop)
            except TaskInterrupted:
                raise
            except Exception as exc:
                if isinstance(exc, WorkerDied) and (why := self._stop_reason(job_id, True)):
                    raise TaskInterrupted(job_id, why) from exc  # killed by our own shutdown
                if not self.policy.should_retry(exc, attempt):
                    raise _TaskFailed(exc, attempt, task) from exc
                logger.warning("job %s: %s failed (attempt %d of %d), retrying: %s", job_id, task,
                               attempt, self.policy.max_attempts, exc)

    def _run(self, job_id: str, proc: TaskProcess) -> None:
        indices = self._attempt(proc, "planning the slide", prepare_job, job_id)
        if indices is None:
            self._cleanup(job_id)
            return
        for index in indices:
            self._attempt(proc, f"region {index}", run_region, job_id, index)
        self._attempt(proc, "writing the results", finalize_job, job_id)
