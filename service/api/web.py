"""The web page: ``/`` (upload a slide, follow your jobs) and ``/jobs/{id}`` (look at the nuclei).

Plain HTML, CSS and JavaScript modules installed with the package (:mod:`service.web`); the pages
hold no data: their scripts call the API with the key the user typed. A Content-Security-Policy
keeps every request the page makes on this server.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Response

from service.errors import ResultNotFound
from service.jobs import is_job_id

__all__ = ["ASSETS", "CONTENT_SECURITY_POLICY", "router"]

router = APIRouter(include_in_schema=False)

ASSETS = {
    "style.css": "text/css; charset=utf-8",
    "api.js": "text/javascript; charset=utf-8",
    "home.js": "text/javascript; charset=utf-8",
    "job.js": "text/javascript; charset=utf-8",
    "viewer.js": "text/javascript; charset=utf-8",
    "overlay.js": "text/javascript; charset=utf-8",
}
"""Files under ``/web/`` and their media types (nothing else is served from the package)."""

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)
"""Only this server's own scripts, styles and API; tiles arrive as blobs fetched from it."""

_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _read(name: str) -> bytes:
    return resources.files("service.web").joinpath(name).read_bytes()


def _page(name: str) -> Response:
    return Response(_read(name), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/")
def home_page() -> Response:
    """Upload a slide and follow your jobs."""
    return _page("index.html")


@router.get("/jobs/{job_id}")
def job_page(job_id: str) -> Response:
    """The viewer of one job (its data is fetched by the page, with the caller's key)."""
    if not is_job_id(job_id):
        raise ResultNotFound(f"no job {job_id!r}", code="job_not_found")
    return _page("job.html")


@router.get("/web/{name}")
def asset(name: str) -> Response:
    """A script or style sheet of the page."""
    if name not in ASSETS:
        raise ResultNotFound(f"no web asset {name!r}", code="not_found")
    return Response(_read(name), media_type=ASSETS[name], headers=_HEADERS)
