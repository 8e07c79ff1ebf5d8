"""Errors raised by :mod:`service`, and the one place they become HTTP responses.

Tree::

    ServiceError                 status, code
    ├── Unauthorized             401 unauthorized         missing or unknown API key
    ├── JobNotFound              404 job_not_found        no such job (or another key's)
    ├── ResultNotFound           404 result_not_found     the job has no output of that name
    ├── JobNotFinished           409 job_not_finished     results asked for before success
    ├── JobNotRetryable          409 job_not_retryable    retry of a job that is not failed/cancelled
    ├── ResultsExpired           410 results_expired      the retention time has passed
    ├── SlideNotFound            404 slide_not_found      slide_sha256 unknown, or not the caller's
    ├── QuotaExceeded            429 quota_exceeded       the key's active jobs or stored bytes
    ├── BadUpload                400 <code>               empty upload, malformed form...
    ├── UploadTimeout            408 upload_timeout       the upload stalled (connection closed)
    ├── UploadTooLarge           413 upload_too_large     over the configured limit
    ├── InvalidOptions           422 invalid_options      the ``options`` field is not valid
    ├── UnknownModel             422 unknown_model        no model of that name
    └── QueueUnavailable         503 queue_unavailable    Redis does not answer

Every other exception's status and code come from one table, :data:`ERROR_CODES`, looked up
along the exception's class hierarchy (:func:`error_code`, :func:`http_status`): the API's
answers and a failed job's ``error.code`` read the same entries. Slide errors from :mod:`worker`
(raised by the validation open or a task) are 422 with a code per subclass.
"""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker.errors import (
    MissingResolution,
    NotRGBSlide,
    SlideError,
    SlideTooLarge,
    TissueMaskError,
    UnsupportedSlide,
    WorkerError,
)

__all__ = [
    "DEFAULT_CODE",
    "ERROR_CODES",
    "BadUpload",
    "InvalidOptions",
    "JobNotFinished",
    "JobNotFound",
    "JobNotRetryable",
    "QueueUnavailable",
    "QuotaExceeded",
    "ResultNotFound",
    "ResultsExpired",
    "ServiceError",
    "SlideNotFound",
    "Unauthorized",
    "UnknownModel",
    "UploadTimeout",
    "UploadTooLarge",
    "error_body",
    "error_code",
    "http_status",
    "install_handlers",
    "public_message",
]

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base class: an error with an HTTP status and a stable machine-readable code."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        if code is not None:
            self.code = code


class Unauthorized(ServiceError):
    status, code = 401, "unauthorized"


class JobNotFound(ServiceError):
    status, code = 404, "job_not_found"


class ResultNotFound(ServiceError):
    status, code = 404, "result_not_found"


class SlideNotFound(ServiceError):
    status, code = 404, "slide_not_found"


class QuotaExceeded(ServiceError):
    status, code = 429, "quota_exceeded"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})


class JobNotFinished(ServiceError):
    status, code = 409, "job_not_finished"


class JobNotRetryable(ServiceError):
    status, code = 409, "job_not_retryable"


class ResultsExpired(ServiceError):
    status, code = 410, "results_expired"


class BadUpload(ServiceError):
    status, code = 400, "bad_upload"


class UploadTimeout(ServiceError):
    """The client stopped sending its upload; the answer also closes the connection."""

    status, code = 408, "upload_timeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"Connection": "close"})


class UploadTooLarge(ServiceError):
    status, code = 413, "upload_too_large"


class InvalidOptions(ServiceError):
    status, code = 422, "invalid_options"


class UnknownModel(ServiceError):
    status, code = 422, "unknown_model"


class QueueUnavailable(ServiceError):
    status, code = 503, "queue_unavailable"


ERROR_CODES: dict[type[BaseException] | str, tuple[int, str]] = {
    SlideError: (422, "invalid_slide"),
    UnsupportedSlide: (422, "unsupported_slide"),
    NotRGBSlide: (422, "not_rgb_slide"),
    MissingResolution: (422, "missing_resolution"),
    SlideTooLarge: (422, "slide_too_large"),
    TissueMaskError: (422, "invalid_tissue_mask"),
    WorkerError: (500, "processing_error"),
    # Named, not imported: service.queue.retry imports this module.
    "service.queue.retry.WorkerDied": (500, "worker_died"),
}
"""(HTTP status, error code) of the exceptions that are not :class:`ServiceError` (which carry
their own), keyed by class or by ``module.QualName``; the nearest class of an exception's MRO
that is listed decides."""

DEFAULT_CODE = "task_failed"
"""Error code of an exception no entry covers (a failed job's "anything else")."""


def _entry(exc: BaseException) -> tuple[int, str] | None:
    """(status, code) of ``exc``: its own if a ServiceError, else the table's nearest class."""
    if isinstance(exc, ServiceError):
        return exc.status, exc.code
    for cls in type(exc).__mro__:
        entry = ERROR_CODES.get(cls) or ERROR_CODES.get(f"{cls.__module__}.{cls.__qualname__}")
        if entry is not None:
            return entry
    return None


def error_code(exc: BaseException | None, default: str = DEFAULT_CODE) -> str:
    """The stable error code an exception stands for (API answers and failed jobs alike).

    Parameters
    ----------
    exc : BaseException or None
        The exception (None: no exception was caught).
    default : str
        The code of an exception :data:`ERROR_CODES` does not cover.

    Returns
    -------
    str
        ``exc.code`` for a :class:`ServiceError`; else the code of the nearest class of
        ``type(exc).__mro__`` in the table (``not_rgb_slide``, ``invalid_slide`` for another
        SlideError, ``processing_error`` for another WorkerError, ``worker_died``...); else
        ``default``.
    """
    entry = None if exc is None else _entry(exc)
    return default if entry is None else entry[1]


def http_status(exc: BaseException) -> int:
    """The HTTP status an exception is answered with: its table entry's, else 500."""
    entry = _entry(exc)
    return 500 if entry is None else entry[0]


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def _response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    return _response(exc.status, exc.code, exc.message, {**headers, **exc.headers})


# Paths: absolute or ~/ ./ ../ ones, URLs with a scheme (s3://...), Windows drive paths, and any
# other token with two or more slashes (a relative store or cache folder); "µm/px" is no path,
# nor is an API path (/v1/jobs/...).
_PATH = re.compile(
    r"(?<![\w.~/:-])(?!/v1/)(?:[A-Za-z][\w+.-]*://\S*|[A-Za-z]:\\\S*|(?:~|\.{1,2})?/[^\s'\"<>:,;()]+"
    r"|[\w.-]+/[\w.-]+/[^\s'\"<>:,;()]*)")
_FLAG_VALUE = re.compile(r"(?<![\w-])--([a-z][a-z-]*) (\d[\d.]*)")
_PASS_FLAG = re.compile(r"\b(?:pass|use|give) --([a-z][a-z-]*)")
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z-]*)")


def _option(flag: str) -> str:
    return flag.removeprefix("no-").replace("-", "_")


def public_message(text: str, name: str | None = None) -> str:
    """A worker message as an API user should read it: no server paths, API options not CLI flags.

    Parameters
    ----------
    text : str
        e.g. ``"/tmp/u/3f.png has no resolution in its metadata; pass --mpp (... --mpp 0.25 ...)"``.
    name : str, optional
        The client's name for the slide, shown instead of a path (default: "the slide").

    Returns
    -------
    str
        e.g. ``'the slide has no resolution in its metadata; set "mpp" in options (... "mpp": 0.25 ...)'``.
    """
    # A path ends before the punctuation that follows it ("/tmp/x.svs: empty file").
    text = _PATH.sub(lambda m: (name or "the slide") + m[0][len(m[0].rstrip(":,;.")):], text)
    text = _FLAG_VALUE.sub(lambda m: f'"{_option(m[1])}": {m[2]}', text)
    text = _PASS_FLAG.sub(lambda m: f'set "{_option(m[1])}" in options', text)
    return _FLAG.sub(lambda m: f'"{_option(m[1])}" in options', text)


async def _table_error(request: Request, exc: Exception) -> JSONResponse:
    # Worker messages are written for the command line: they name the file and CLI flags.
    return _response(http_status(exc), error_code(exc), public_message(str(exc)))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return _response(422, "invalid_request", "; ".join(parts) or "invalid request")


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, f"http_{exc.status_code}")
    return _response(exc.status_code, code, str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return _response(500, "internal_error", "internal server error")


def install_handlers(app: FastAPI) -> None:
    """Register the translation of every error to ``{"error": {"code", "message"}}``."""
    app.add_exception_handler(ServiceError, _service_error)  # type: ignore[arg-type]
    # Only the table's client errors answer with their message; the rest are internal errors.
    for key, (status, _) in ERROR_CODES.items():
        if isinstance(key, type) and issubclass(key, Exception) and status < 500:
            app.add_exception_handler(key, _table_error)
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _unexpected)
