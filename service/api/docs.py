"""``/docs`` (Swagger UI) and ``/redoc`` from assets installed with a Python package, no CDN.

FastAPI's own pages load their JavaScript and CSS from a CDN, so they stay blank on an air-gapped
network. The assets come from the ``fastapi-offline`` package (Swagger UI and ReDoc bundles, kept
up to date by its maintainer) and are served by this API under :data:`STATIC_URL`.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["STATIC_URL", "assets_dir", "install_docs"]

STATIC_URL = "/static-docs"
"""Where the Swagger UI and ReDoc files are served."""

_SWAGGER_PARAMETERS = {
    # Swagger UI would otherwise send the OpenAPI document to an online validator for its badge.
    "validatorUrl": None,
    "persistAuthorization": True,
}


def assets_dir() -> Path:
    """The folder of installed Swagger UI and ReDoc files (``swagger-ui-bundle.js`` ...)."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` from local assets.

    Parameters
    ----------
    app : FastAPI
        Created with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages off).
    docs_url, redoc_url : str
        Paths of the two pages.
    """
    app.mount(STATIC_URL, StaticFiles(directory=assets_dir()), name="static-docs")
    openapi_url = app.openapi_url or "/openapi.json"
    redirect_url = f"{docs_url}/oauth2-redirect"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - API",
            swagger_js_url=f"{root}{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC_URL}/favicon.png",
            oauth2_redirect_url=f"{root}{redirect_url}", swagger_ui_parameters=_SWAGGER_PARAMETERS)

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}{openapi_url}", title=f"{app.title} - API reference",
            redoc_js_url=f"{root}{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{STATIC_URL}/favicon.png", with_google_fonts=False)
