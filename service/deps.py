"""FastAPI dependencies: the app's collaborators and the caller's identity."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request

from service.catalog import Catalog
from service.errors import Unauthorized
from service.metrics import Metrics
from service.settings import Settings
from service.store import Store

__all__ = ["ANONYMOUS", "OwnerDep", "Services", "ServicesDep", "key_digest", "owner_of"]

ANONYMOUS = "anonymous"
"""Owner of every job when authentication is off."""


@dataclass
class Services:
    """Built once per app (see :func:`service.main.create_app`), shared by every request.

    Everything a request may use lives here: routers keep no module-level state, so two apps in
    one process (tests) share nothing.
    """

    settings: Settings
    store: Store
    catalog: Catalog
    queue: Any
    metrics: Metrics
    caches: dict[str, Any] = field(default_factory=dict)
    """Routers' caches of expensive objects, by name (the viewer's open slides and indexes)."""


def key_digest(key: str) -> str:
    """SHA-256 hex digest of an API key (what ``HOVERSERVE_API_KEYS`` holds)."""
    return hashlib.sha256(key.encode()).hexdigest()


def owner_of(authorization: str | None, digests: frozenset[str]) -> str:
    """The caller's owner id from an ``Authorization`` header (raises Unauthorized)."""
    if not digests:
        return ANONYMOUS
    if not authorization:
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <key>'")
    digest = key_digest(key.strip())
    # Constant-time comparison against every digest: no early exit that leaks which matched.
    matched = False
    for known in digests:
        matched |= hmac.compare_digest(digest, known)
    if not matched:
        raise Unauthorized("unknown API key")
    return f"key-{digest[:16]}"


def get_services(request: Request) -> Services:
    """The app's :class:`Services` (set by :func:`service.main.create_app`)."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_owner(request: Request, services: ServicesDep) -> str:
    return owner_of(request.headers.get("authorization"), services.settings.key_digests)


OwnerDep = Annotated[str, Depends(get_owner)]
