"""The FastAPI application: one :class:`Settings` passed down to the store, catalog, queue and routers.

:func:`create_app` builds everything a request needs before it returns and keeps it on
``app.state.services``: a request reads nothing but what the app was given or built from its
settings (no environment, no module-level store or queue), so tests can build many apps in one
process and call them in-process (``httpx.ASGITransport``) without a server. What runs in the
background (the queue's threads, the retention sweeper) starts with the app's lifespan and stops
with it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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

__all__ = ["API_VERSION", "build_services", "create_app"]

logger = logging.getLogger(__name__)

API_VERSION = "1.0.0"

_DESCRIPTION = (
    "Nuclear instance segmentation and classification of whole-slide images. Submit a slide, "
    "follow the job, download QuPath GeoJSON, counts, a zarr table, an overlay and a manifest. "
    "Errors are JSON `{\"error\": {\"code\", \"message\"}}`."
)


def build_services(settings: Settings, *, store: Store | None = None, queue: Any = None,
                   port: int | None = None) -> tuple[Services, TaskContext | None]:
    """The collaborators of one app: ``store`` and ``queue`` as given, or built from ``settings``.

    Parameters
    ----------
    settings : Settings
        The only configuration read (API keys, quotas, limits, where the store is).
    store : Store, optional
        An already-open store of ``settings.store`` (task processes and workers open that URL
        themselves, so another one is refused); default: ``Store(settings.store, ...)``.
    queue : optional
        An already-built, not yet started queue (``submit``, ``cancel``, ``ready``, ``start``,
        ``close``); default: the one ``settings`` ask for, over ``store``.
    port : int, optional
        This server's HTTP port, recorded in the embedded queue's store lock.

    Returns
    -------
    services : Services
        What every request is served with.
    context : TaskContext or None
        The task context of the queue built here (to be installed for this process when the app
        starts); None when ``queue`` was given (its maker owns its context).
    """
    if not isinstance(settings, Settings):
        raise TypeError(f"settings must be a service.settings.Settings, got {type(settings).__name__}")
    if store is None:
        store = Store(settings.store, cache_dir=settings.cache_dir,
                      storage_options=settings.store_options)
    elif store.url != settings.store:
        raise ValueError(f"the store {store.url!r} is not the settings' store {settings.store!r}: "
                         "task processes and workers would open another one")
    catalog = Catalog(settings.models_dir)
    context = None
    if queue is None:
        context = TaskContext(store=store, catalog=catalog, settings=settings, worker_name="api")
        queue = make_queue(context, port=port)
    services = Services(settings=settings, store=store, catalog=catalog, queue=queue,
                        metrics=Metrics())
    return services, context


def _migrate(store: Store) -> None:
    """Bring a store written by an earlier version up to date (each step runs once per store)."""
    if indexed := store.build_owner_index():
        logger.info("indexed %d job records written before the owner index existed", indexed)
    if referenced := SlideRegistry(store).build_refs():
        logger.info("recorded slide references of %d jobs written before they existed", referenced)


def create_app(settings: Settings, *, store: Store | None = None, queue: Any = None,
               port: int | None = None) -> FastAPI:
    """The HTTP API over ``settings``, serving from ``store`` and ``queue`` when given.

    Parameters
    ----------
    settings : Settings
        Everything the app is configured with (``Settings()`` reads ``HOVERSERVE_*``: the caller
        does that, the app never reads the environment).
    store : Store, optional
        An already-open store of ``settings.store`` (default: built from ``settings``).
    queue : optional
        An already-built queue, not yet started (default: built from ``settings`` over the store).
        Either way the app's lifespan starts it and closes it. A queue given here brings its own
        task context: if its code in this process calls the task functions (the embedded queue
        does, to record failures), its maker installs that context with ``set_context``.
    port : int, optional
        The HTTP port the server listens on, recorded in the store's queue lock so that a second
        server on the same store can name this one.

    Returns
    -------
    FastAPI
        Ready to serve requests at once (in-process tests need no lifespan); the lifespan adds
        the store's one-time migrations, the queue's work and the retention sweeps.
    """
    services, context = build_services(settings, store=store, queue=queue, port=port)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        _migrate(services.store)
        if context is not None:
            set_context(context)
        services.queue.start()
        sweeper = RetentionSweeper(services.store, max_age_s=settings.retention_hours * 3600,
                                   interval_s=settings.sweep_interval_s)
        sweeper.start()
        role = f" ({services.queue.role})" if hasattr(services.queue, "role") else ""
        logger.info("serving: store %s, %s queue%s, %s", services.store.url,
                    getattr(services.queue, "kind", type(services.queue).__name__), role,
                    "API keys required" if settings.key_digests else "no authentication")
        try:
            yield
        finally:
            sweeper.close()
            services.queue.close()

    app = FastAPI(
        title="HoVerServe",
        version=API_VERSION,
        description=_DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # install_docs serves /docs and /redoc from local assets, no CDN
        redoc_url=None,
    )
    app.state.services = services
    install_handlers(app)
    install_docs(app)
    app.include_router(api_router)
    app.add_middleware(TimingMiddleware, metrics=services.metrics)
    return app
