"""The FastAPI application: assembles settings, store, catalog, queue and routers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import api_router
from service.api.docs import install_docs
from service.catalog import Catalog
from service.deps import Services
from service.errors import install_handlers
from service.metrics import Metrics, TimingMiddleware
from service.queue import make_queue
from service.queue.tasks import TaskContext, set_context
from service.retention import RetentionSweeper
from service.settings import Settings
from service.slides import SlideRegistry
from service.store import Store

__all__ = ["create_app"]

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"


def create_app(settings: Settings | None = None, *, port: int | None = None) -> FastAPI:
    """The HTTP API over ``settings`` (default: read from the environment).

    ``port`` is the HTTP port the server listens on, recorded in the store's queue lock so that a
    second server on the same store can name this one.
    """
    settings = settings or Settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.store, cache_dir=settings.cache_dir,
                      storage_options=settings.store_options)
        if indexed := store.build_owner_index():
            logger.info("indexed %d job records written before the owner index existed", indexed)
        if referenced := SlideRegistry(store).build_refs():
            logger.info("recorded slide references of %d jobs written before they existed", referenced)
        context = TaskContext(store=store, catalog=Catalog(settings.models_dir), settings=settings,
                              worker_name="api")
        set_context(context)
        queue = make_queue(context, port=port)
        queue.start()
        sweeper = RetentionSweeper(store, max_age_s=settings.retention_hours * 3600,
                                   interval_s=settings.sweep_interval_s)
        sweeper.start()
        app.state.services = Services(settings=settings, store=store, catalog=context.catalog,
                                      queue=queue, metrics=metrics)
        role = f" ({queue.role})" if hasattr(queue, "role") else ""
        logger.info("serving: store %s, %s queue%s, %s", settings.store, queue.kind, role,
                    "API keys required" if settings.key_digests else "no authentication")
        try:
            yield
        finally:
            sweeper.close()
            queue.close()

    app = FastAPI(
        title="HoVerServe",
        version=API_VERSION,
        description="Nuclear instance segmentation and classification of whole-slide images. "
        "Submit a slide, follow the job, download QuPath GeoJSON, counts, a zarr table, an "
        "overlay and a manifest. Errors are JSON `{\"error\": {\"code\", \"message\"}}`.",
        lifespan=lifespan,
        docs_url=None,  # install_docs serves /docs and /redoc from local assets, no CDN
        redoc_url=None,
    )
    install_handlers(app)
    install_docs(app)
    app.include_router(api_router)
    app.add_middleware(TimingMiddleware, metrics=metrics)
    return app
