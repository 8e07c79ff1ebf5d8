"""Prometheus metrics and the request-timing middleware (plain ASGI: no per-request task overhead)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["Metrics", "TimingMiddleware"]


class Metrics:
    """The service's metrics, in their own registry (one per app, so tests can build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Histogram(
            "hoverserve_http_request_seconds", "HTTP request latency", ["method", "route", "status"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.jobs_submitted = Counter("hoverserve_jobs_submitted_total", "jobs accepted",
                                      registry=self.registry)
        self.uploads_rejected = Counter("hoverserve_uploads_rejected_total", "uploads refused",
                                        ["code"], registry=self.registry)
        self.upload_bytes = Counter("hoverserve_upload_bytes_total", "slide bytes received",
                                    registry=self.registry)
        self.slides_deduplicated = Counter("hoverserve_slides_deduplicated_total",
                                           "uploads whose content was already stored",
                                           registry=self.registry)


class TimingMiddleware:
    """Observes every HTTP request's latency, labelled by its route template."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [500]

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(scope["method"], template, str(status[0])).observe(
                time.perf_counter() - start)
