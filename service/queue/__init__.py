"""Job queues: RQ on Redis when ``HOVERSERVE_REDIS_URL`` is set, else the embedded queue."""

from __future__ import annotations

from typing import Any

from service.queue.retry import RetryPolicy
from service.queue.tasks import TaskContext

__all__ = ["RetryPolicy", "make_queue"]


def make_queue(context: TaskContext, *, port: int | None = None) -> Any:
    """The queue the settings ask for (not started); ``port``: this server's HTTP port."""
    settings = context.settings
    policy = RetryPolicy(max_attempts=settings.max_attempts)
    if settings.redis_url:
        from service.queue.rq_queue import RQQueue

        return RQQueue(context, policy=policy)
    from service.queue.embedded import EmbeddedQueue

    return EmbeddedQueue(context, threads=settings.embedded_threads, policy=policy, port=port)
