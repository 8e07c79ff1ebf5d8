"""Who may use a stored slide, and deletion that deletes.

A slide is stored once per content (``slides/<sha256>.<ext>``, whatever extension later uploads
carry). Every job that uses it holds a reference, an empty object in the store::

    slide-refs/<sha256>/<owner digest>-<job id>

The references answer both questions the API asks:

* may this key start a job from ``slide_sha256``? Only if one of its own jobs references the
  content (it uploaded it, or reused its own upload). Another key's slide and an unknown hash are
  the same answer: not found.
* may the slide file go? When a job is deleted or expires its reference goes; the slide file (and
  any local cached copy) goes with the last reference.

References are added before a slide file is written and removed before it is deleted, and both
happen under one lock per process, so a concurrent upload of the same content never loses its
file to a deletion in the same process.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from dataclasses import dataclass

from service.jobs import JobRecord, is_job_id
from service.store import Store, owner_digest

__all__ = ["DeletionReport", "SlideRegistry", "is_sha256"]

logger = logging.getLogger(__name__)

_REFS = "slide-refs"
_MIGRATED = f"{_REFS}/complete"

_LOCK = threading.Lock()
"""Orders reference changes and slide writes/deletes within this process."""


def is_sha256(text: str) -> bool:
    """Whether ``text`` is a lower-case SHA-256 hex digest (safe inside a store path)."""
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


@dataclass(frozen=True)
class DeletionReport:
    """What one deletion removed."""

    job_id: str
    owner_digest: str
    bytes_freed: int
    slide_removed: bool


class SlideRegistry:
    """Slide references and the deletions they allow, over one :class:`Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------------ references

    @staticmethod
    def _ref_key(sha256: str, owner: str, job_id: str) -> str:
        return f"{_REFS}/{sha256}/{owner_digest(owner)}-{job_id}"

    def _refs(self, sha256: str) -> list[str]:
        return [name for name in self.store.names(f"{_REFS}/{sha256}") if "-" in name]

    def add_ref(self, sha256: str, owner: str, job_id: str) -> None:
        """Record that ``owner``'s job ``job_id`` uses the slide ``sha256``."""
        if not is_sha256(sha256) or not is_job_id(job_id):
            raise ValueError(f"bad slide reference {sha256!r} / {job_id!r}")
        self.store.write_bytes(self._ref_key(sha256, owner, job_id), b"")

    def owns(self, sha256: str, owner: str) -> bool:
        """Whether one of ``owner``'s jobs references the slide."""
        prefix = owner_digest(owner) + "-"
        return any(name.startswith(prefix) for name in self._refs(sha256))

    def stored_ext(self, sha256: str) -> str | None:
        """Extension of the stored file holding ``sha256``'s content, None when not stored."""
        prefix = f"{sha256}."
        for name in self.store.names("slides"):
            if name.startswith(prefix) and len(name) > len(prefix):
                return name[len(prefix):]
        return None

    def build_refs(self) -> int:
        """Give every job of a store written before references existed its reference (once)."""
        if self.store.exists(_MIGRATED):
            return 0
        count = 0
        for record in self.store.records():
            if not record.expired:
                self.add_ref(record.slide.sha256, record.owner, record.id)
                count += 1
        self.store.write_bytes(_MIGRATED, b"")
        return count

    # ------------------------------------------------------------------ deletion

    def release(self, sha256: str, owner: str, job_id: str) -> tuple[bool, int]:
        """Drop a job's reference; delete the slide (and cached copies) if it was the last.

        Returns (whether the slide file was deleted, bytes freed).
        """
        store = self.store
        with _LOCK:
            store.delete(self._ref_key(sha256, owner, job_id))
            if self._refs(sha256):
                return False, 0
            freed = 0
            ext = self.stored_ext(sha256)
            if ext is not None:
                key = store.slide_key(sha256, ext)
                freed += _size(store, key)
                store.delete(key)
            for cached in store.cache_dir.glob(f"{sha256}.*"):
                with contextlib.suppress(OSError):
                    if not store.local:
                        freed += cached.stat().st_size
                    cached.unlink()
            store.delete(f"{_REFS}/{sha256}")
            return ext is not None, freed

    def delete_job(self, record: JobRecord) -> DeletionReport:
        """Remove every file of a job at once, and its slide when no other job references it."""
        store = self.store
        freed = _size(store, store.job_key(record.id))
        store.delete_job(record)
        removed, slide_bytes = self.release(record.slide.sha256, record.owner, record.id)
        report = DeletionReport(record.id, owner_digest(record.owner), freed + slide_bytes, removed)
        logger.info("job %s: deleted (owner %s), %d bytes freed%s", report.job_id,
                    report.owner_digest[:12], report.bytes_freed,
                    ", slide removed" if removed else "")
        return report

    def expire_job(self, record: JobRecord) -> DeletionReport:
        """Retention: remove a job's data and release its slide; the record stays as a tombstone
        (marked ``expired``, no results, no file name) so its owner learns what happened."""
        store = self.store
        freed = 0
        for name in store.names(store.job_key(record.id)):
            if name != "job.json":
                freed += _size(store, store.job_key(record.id, name))
                store.delete(store.job_key(record.id, name))

        def mark(rec: JobRecord) -> None:
            rec.expired = True
            rec.results = []
            rec.slide.name = ""

        store.update_record(record.id, mark)
        removed, slide_bytes = self.release(record.slide.sha256, record.owner, record.id)
        report = DeletionReport(record.id, owner_digest(record.owner), freed + slide_bytes, removed)
        logger.info("job %s: expired (owner %s), %d bytes freed%s", report.job_id,
                    report.owner_digest[:12], report.bytes_freed,
                    ", slide removed" if removed else "")
        return report


def _size(store: Store, key: str) -> int:
    """Bytes under ``key`` (a file or a folder), 0 when missing."""
    try:
        return int(store.fs.du(store.path(key), total=True))
    except (FileNotFoundError, OSError):
        return 0
