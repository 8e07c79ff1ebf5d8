"""One owner per store: the lock that says which process runs a store's embedded queue.

The lock is one small JSON object in the store (``locks/queue.json``), written through the
store's fsspec filesystem so that it works the same on a local folder and on S3. Its holder
(host, pid, port, start time) refreshes a heartbeat every ``heartbeat_s`` seconds. Another process
may take the lock only when it is free: released by a clean shutdown, or stale (no heartbeat for
``stale_beats`` heartbeats, or, on the same host, its process no longer exists).

There is no compare-and-swap on an object store, so taking the lock is write, wait, read back:
of two processes that write at once, both read the last write and only its writer goes on. A
holder that finds someone else's token at its next heartbeat has lost the lock and must stop.
Heartbeats compare wall clocks, so hosts sharing a store need synchronised clocks (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import psutil  # type: ignore[import-untyped]

from service.store import Store

__all__ = ["QUEUE_LOCK_KEY", "LockHolder", "StoreLock"]

logger = logging.getLogger(__name__)

QUEUE_LOCK_KEY = "locks/queue.json"
"""Store key of the embedded queue's lock."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds (or last held) a lock, as stored in the lock object."""

    token: str
    host: str
    pid: int
    port: int | None
    process_started_at: float
    acquired_at: float
    heartbeat_at: float
    released: bool = False

    def describe(self) -> str:
        """The holder in words, for log lines and messages."""
        since = datetime.fromtimestamp(self.acquired_at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        port = f", port {self.port}" if self.port is not None else ""
        return f"{self.host} pid {self.pid}{port}, since {since}"

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LockHolder:
        """Parse a stored lock (raises ValueError on anything malformed)."""
        try:
            fields = json.loads(data)
            return cls(**fields)
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"malformed lock object: {exc}") from exc


def _process_started_at(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


class StoreLock:
    """A heartbeat lock held in a store.

    Parameters
    ----------
    store : Store
        Where the lock object lives.
    key : str
        Its key in the store.
    port : int, optional
        This process's HTTP port (recorded so the holder can be named precisely).
    heartbeat_s : float
        Seconds between heartbeats.
    stale_beats : int
        Heartbeats a holder may miss before its lock is taken over.
    settle_s : float
        Wait between writing the lock and reading it back when taking it.
    """

    def __init__(self, store: Store, key: str = QUEUE_LOCK_KEY, *, port: int | None = None,
                 heartbeat_s: float = 2.0, stale_beats: int = 5, settle_s: float = 0.3) -> None:
        if heartbeat_s <= 0:
            raise ValueError(f"heartbeat_s must be > 0, got {heartbeat_s}")
        if stale_beats < 2:
            raise ValueError(f"stale_beats must be >= 2, got {stale_beats}")
        self.store, self.key = store, key
        self.heartbeat_s, self.stale_beats, self.settle_s = heartbeat_s, stale_beats, settle_s
        pid = os.getpid()
        now = time.time()
        self.mine = LockHolder(
            token=uuid.uuid4().hex, host=socket.gethostname(), pid=pid, port=port,
            process_started_at=_process_started_at(pid) or now, acquired_at=now, heartbeat_at=now)
        self.held = False
        self.previous: LockHolder | None = None
        """The holder found when the lock was last taken (None: it never existed)."""

    def __repr__(self) -> str:
        return f"StoreLock({self.store.url!r}, {self.key!r}, held={self.held})"

    @property
    def stale_after_s(self) -> float:
        return self.heartbeat_s * self.stale_beats

    def read(self) -> LockHolder | None:
        """The stored holder, or None when there is no (readable) lock object."""
        try:
            return LockHolder.from_json(self.store.read_bytes(self.key))
        except FileNotFoundError:
            return None
        except ValueError:
            logger.warning("lock %s is malformed; treating it as free", self.key)
            return None

    def is_free(self, holder: LockHolder | None) -> bool:
        """Whether ``holder``'s lock may be taken: absent, released, silent too long or dead."""
        if holder is None or holder.released or holder.token == self.mine.token:
            return True
        if time.time() - holder.heartbeat_at > self.stale_after_s:
            return True
        if holder.host == self.mine.host:
            started = _process_started_at(holder.pid)
            # A pid that exists but started at another time is a reused pid: the holder is gone.
            return started is None or abs(started - holder.process_started_at) > 1.0
        return False

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process holds it afterwards."""
        if self.held:
            return self.refresh()
        found = self.read()
        if not self.is_free(found):
            return False
        now = time.time()
        self.mine = replace(self.mine, acquired_at=now, heartbeat_at=now, released=False)
        self.store.write_bytes(self.key, self.mine.to_json())
        time.sleep(self.settle_s)
        winner = self.read()
        if winner is None or winner.token != self.mine.token:
            logger.info("lock %s: another process took it at the same time (%s)", self.key,
                        winner.describe() if winner else "gone")
            return False
        self.previous, self.held = found, True
        return True

    def refresh(self) -> bool:
        """Beat the heartbeat; False (and no longer held) when another process has the lock."""
        if not self.held:
            return False
        current = self.read()
        if current is not None and current.token != self.mine.token:
            logger.error("lock %s lost to %s (this process missed its heartbeats)", self.key,
                         current.describe())
            self.held = False
            return False
        self.mine = replace(self.mine, heartbeat_at=time.time())
        self.store.write_bytes(self.key, self.mine.to_json())
        return True

    def release(self) -> None:
        """Give the lock up, recording a clean shutdown (the next holder resumes jobs as they were)."""
        if not self.held:
            return
        self.held = False
        current = self.read()
        if current is not None and current.token != self.mine.token:
            return  # taken over meanwhile: not ours to write
        self.store.write_bytes(self.key, replace(self.mine, heartbeat_at=time.time(),
                                                 released=True).to_json())

    def holder(self) -> LockHolder | None:
        """The current live holder (None when the lock is free)."""
        found = self.read()
        if found is None or found.released:
            return None
        if found.token == self.mine.token or not self.is_free(found):
            return found
        return None
