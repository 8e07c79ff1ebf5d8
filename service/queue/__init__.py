"""Job queues: RQ on Redis when ``HOVERSERVE_REDIS_URL`` is set, else the embedded queue."""

from __future__ import annotations

from service.queue.tasks import TaskContext

__all__ = ["make_queue"]


def make_queue(context: TaskContext):
    """The queue the settings ask for (not started)."""
    settings = context.settings
    if settings.redis_url:
        from service.queue.rq_queue import RQQueue

        return RQQueue(context)
    from service.queue.embedded import EmbeddedQueue

    return EmbeddedQueue(context, threads=settings.embedded_threads,
                         max_attempts=settings.max_attempts)
