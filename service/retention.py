"""Retention: finished jobs' slides, regions and results expire after a configured time."""

from __future__ import annotations

import logging
import threading
import time

from service.slides import SlideRegistry
from service.store import Store

__all__ = ["RetentionSweeper", "sweep"]

logger = logging.getLogger(__name__)


def sweep(store: Store, *, max_age_s: float, now: float | None = None) -> list[str]:
    """Expire finished jobs older than ``max_age_s``; returns their ids.

    Every file of an expired job goes; the record stays as a tombstone (marked ``expired``, no
    results, no file name) so clients learn what happened. A slide goes with the last job that
    references it (:class:`service.slides.SlideRegistry`).
    """
    now = time.time() if now is None else now
    registry = SlideRegistry(store)
    expired: list[str] = []
    for record in store.records():
        finished_at = record.finished_at
        if record.finished and not record.expired and finished_at is not None \
                and now - finished_at > max_age_s:
            registry.expire_job(record)
            expired.append(record.id)
    return expired


class RetentionSweeper:
    """Runs :func:`sweep` every ``interval_s`` seconds on a daemon thread."""

    def __init__(self, store: Store, *, max_age_s: float, interval_s: float) -> None:
        self.store = store
        self.max_age_s = max_age_s
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="hoverserve-retention", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                sweep(self.store, max_age_s=self.max_age_s)
            except Exception:  # a failed sweep is retried at the next interval
                logger.exception("retention sweep failed")
