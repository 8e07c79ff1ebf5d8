"""A task process the embedded queue can stop at any moment.

The embedded queue runs every task in a child process, so that slide decoding, inference and
post-processing never hold the API's GIL and a native crash costs one task attempt, not the API.
Unlike a process pool, :class:`TaskProcess` belongs to one queue thread and can be killed
mid-task: a job cancelled while its slide is being planned stops within a second, and the next
task starts a fresh process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from service.queue.retry import TaskInterrupted, WorkerDied
from service.settings import Settings

__all__ = ["TASK_NICENESS", "RemoteTraceback", "TaskProcess"]

logger = logging.getLogger(__name__)

TASK_NICENESS = 10
"""Scheduling niceness added to the task process: requests to the API come first."""


class RemoteTraceback(Exception):
    """The task process's traceback, attached as the ``__cause__`` of the error it raised."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f"\n(in the task process)\n{self.text}"


def _init_child(settings: Settings) -> None:
    """Task process start-up: the same task context as the API's, built from the same settings."""
    from service.catalog import Catalog
    from service.queue.tasks import TaskContext, set_context
    from service.store import Store
    from worker.regions import exit_with_parent

    exit_with_parent()  # an API killed outright must not leave its task process behind
    # Signals to the whole process group (Ctrl-C, a service manager's SIGTERM) are for the API:
    # it shuts down cleanly and then stops this process itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    os.nice(TASK_NICENESS)
    store = Store(settings.store, cache_dir=settings.cache_dir, storage_options=settings.store_options)
    set_context(TaskContext(store=store, catalog=Catalog(settings.models_dir), settings=settings,
                            worker_name="embedded"))


def _child_main(conn: Connection, settings: Settings) -> None:
    """The task process: run ``(fn, args)`` messages one at a time until the pipe closes."""
    _init_child(settings)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        fn, args = message
        try:
            conn.send(("ok", fn(*args), None))
        except BaseException as exc:  # every error goes back to the queue thread, which decides
            text = traceback.format_exc()
            try:
                conn.send(("error", exc, text))
            except Exception:  # an exception that does not pickle: send its words instead
                conn.send(("error", RuntimeError(f"{type(exc).__name__}: {exc}"), text))


class TaskProcess:
    """One child process running tasks for one queue thread, started on first use.

    Parameters
    ----------
    settings : Settings
        Settings the child builds its task context from.
    name : str
        Process name (shown by ``ps``).
    poll_s : float
        Seconds between checks of ``should_stop`` while a task runs.
    """

    def __init__(self, settings: Settings, *, name: str = "hoverserve-task", poll_s: float = 0.5) -> None:
        self.settings, self.name, self.poll_s = settings, name, poll_s
        self._proc: Any = None
        self._conn: Connection | None = None

    def __repr__(self) -> str:
        return f"TaskProcess({self.name!r}, pid={self.pid})"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _start(self) -> tuple[Any, Connection]:
        if self._proc is None or not self._proc.is_alive() or self._conn is None:
            self.stop()
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_child_main, args=(child, self.settings), name=self.name,
                               daemon=True)
            proc.start()
            child.close()
            self._proc, self._conn = proc, parent
        return self._proc, self._conn

    def run(self, fn: Callable[..., Any], args: tuple[Any, ...], *, job_id: str,
            should_stop: Callable[[], str | None]) -> Any:
        """Run ``fn(*args)`` in the child and return its result (or raise its error).

        ``should_stop`` is asked every ``poll_s`` seconds; a reason from it kills the child and
        raises :class:`TaskInterrupted`. A child that dies raises :class:`WorkerDied`.
        """
        proc, conn = self._start()
        try:
            conn.send((fn, args))
        except (BrokenPipeError, OSError) as exc:
            self.stop()
            raise WorkerDied(proc.exitcode) from exc
        while True:
            if conn.poll(self.poll_s):
                try:
                    kind, value, text = conn.recv()
                except (EOFError, OSError) as exc:
                    proc.join(timeout=5)
                    code = proc.exitcode
                    self.stop()
                    raise WorkerDied(code) from exc
                if kind == "ok":
                    return value
                raise value from RemoteTraceback(text)
            if not proc.is_alive():
                code = proc.exitcode
                self.stop()
                raise WorkerDied(code)
            why = should_stop()
            if why:
                logger.info("job %s: stopping task process %s (%s)", job_id, proc.pid, why)
                self.stop()
                raise TaskInterrupted(job_id, why)

    def stop(self) -> None:
        """Kill the child now (a running task is abandoned; its writes are atomic)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return
        if proc.is_alive():
            proc.kill()  # SIGKILL: the child ignores SIGTERM (see _init_child)
        proc.join(timeout=5)
