"""Retention: finished jobs' slides, regions and results expire after a configured time."""

from __future__ import annotations

import logging
import threading
import time

from service.jobs import JobRecord
from service.store import Store

__all__ = ["RetentionSweeper", "sweep"]

logger = logging.getLogger(__name__)


def sweep(store: Store, *, max_age_s: float, now: float | None = None) -> list[str]:
    """Expire finished jobs older than ``max_age_s``; returns their ids.

    The record stays (marked ``expired``) so clients learn what happened; a slide is deleted once
    no unexpired job uses it.
    """
    now = time.time() if now is None else now
    expired: list[str] = []
    keep_slides: set[str] = set()
    records = list(store.records())
    for record in records:
        finished_at = record.finished_at
        if record.finished and not record.expired and finished_at is not None \
                and now - finished_at > max_age_s:
            store.delete_job_data(record.id)

            def mark(rec: JobRecord) -> None:
                rec.expired = True
                rec.results = []
            store.update_record(record.id, mark)
            expired.append(record.id)
            logger.info("job %s: expired after %.0f s", record.id, now - finished_at)
        elif not record.expired:
            keep_slides.add(store.slide_key(record.slide.sha256, record.slide.ext))
    for record in records:
        key = store.slide_key(record.slide.sha256, record.slide.ext)
        if record.id in expired and key not in keep_slides and store.exists(key):
            store.delete(key)
            keep_slides.add(key)  # deleted once
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
