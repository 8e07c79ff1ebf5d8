"""HTTP routers, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from service.api import health, jobs, models, viewer, web

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(jobs.router)
api_router.include_router(models.router)
api_router.include_router(health.router)
api_router.include_router(viewer.router)
api_router.include_router(web.router)
