"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from service.deps import Services, ServicesDep
from service.schemas import HealthStatus

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=HealthStatus, summary="Liveness")
def healthz() -> HealthStatus:
    """The process answers."""
    return HealthStatus(status="ok")


def _checks(services: Services) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        services.store.exists("jobs")
        checks["store"] = "ok"
    except Exception as exc:  # any backend failure means not ready; the reason is reported
        checks["store"] = f"error: {exc}"
    try:
        checks["queue"] = "ok" if services.queue.ready() else "error: not running"
    except Exception as exc:
        checks["queue"] = f"error: {exc}"
    return checks


@router.get("/readyz", response_model=HealthStatus, responses={503: {"model": HealthStatus}},
            summary="Readiness")
async def readyz(services: ServicesDep, response: Response) -> HealthStatus:
    """The store and the queue answer (503 otherwise, with the failing check)."""
    checks = await run_in_threadpool(_checks, services)
    ok = all(value == "ok" for value in checks.values())
    if not ok:
        response.status_code = 503
    return HealthStatus(status="ok" if ok else "unavailable", checks=checks)


@router.get("/metrics", summary="Prometheus metrics",
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
def metrics(services: ServicesDep) -> Response:
    """Request latencies, jobs submitted, uploads refused and bytes received."""
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
