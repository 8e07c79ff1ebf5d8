"""service.errors: one table gives every exception its error code and HTTP status, by class."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI

from service.errors import (
    DEFAULT_CODE,
    ERROR_CODES,
    BadUpload,
    JobNotFound,
    QuotaExceeded,
    ServiceError,
    error_code,
    http_status,
    install_handlers,
)
from service.queue.retry import WorkerDied
from worker.errors import (
    InferenceError,
    MissingResolution,
    NotRGBSlide,
    SlideError,
    SlideTooLarge,
    TissueMaskError,
    UnsupportedSlide,
    WorkerError,
)


@pytest.mark.parametrize(("exc", "code"), [
    (UnsupportedSlide("x"), "unsupported_slide"),
    (NotRGBSlide("x"), "not_rgb_slide"),
    (MissingResolution("x"), "missing_resolution"),
    (SlideTooLarge("x"), "slide_too_large"),
    (SlideError("x"), "invalid_slide"),
    (TissueMaskError("x"), "invalid_tissue_mask"),
    (InferenceError("x"), "processing_error"),
    (WorkerError("x"), "processing_error"),
    (WorkerDied(-9), "worker_died"),
    (JobNotFound("x"), "job_not_found"),
    (ServiceError("x"), "internal_error"),
    (RuntimeError("x"), "task_failed"),
    (KeyError("x"), "task_failed"),
])
def test_each_exception_has_one_code(exc: BaseException, code: str) -> None:
    assert error_code(exc) == code


def test_a_subclass_nobody_listed_takes_its_nearest_listed_ancestors_code() -> None:
    class OddSlide(NotRGBSlide):
        pass

    class OddWorkerError(InferenceError):
        pass

    class ReallyDied(WorkerDied):
        pass

    assert error_code(OddSlide("x")) == "not_rgb_slide"
    assert http_status(OddSlide("x")) == 422
    assert error_code(OddWorkerError("x")) == "processing_error"
    assert error_code(ReallyDied(1)) == "worker_died"


def test_a_service_error_speaks_for_itself_even_with_a_per_instance_code() -> None:
    exc = BadUpload("empty", code="empty_upload")
    assert (error_code(exc), http_status(exc)) == ("empty_upload", 400)
    assert http_status(QuotaExceeded("full", retry_after_s=5)) == 429


def test_no_exception_or_an_unknown_one_gets_the_default() -> None:
    assert error_code(None) == DEFAULT_CODE == "task_failed"
    assert error_code(ValueError("x"), default="internal_error") == "internal_error"
    assert http_status(ValueError("x")) == 500
    assert http_status(WorkerDied(1)) == 500


def test_the_name_keys_of_the_table_name_real_classes() -> None:
    # Keys spelled as strings (to avoid an import cycle) must still match a class.
    names = [key for key in ERROR_CODES if isinstance(key, str)]
    assert names == [f"{WorkerDied.__module__}.{WorkerDied.__qualname__}"]


def _app(exc: Exception) -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.get("/boom")
    def boom() -> None:
        raise exc

    return app


@pytest.mark.parametrize(("exc", "status", "code"), [
    (NotRGBSlide("/srv/x.tif is 16-bit grey"), 422, "not_rgb_slide"),
    (SlideError("/srv/x.tif is odd"), 422, "invalid_slide"),
    (TissueMaskError("/srv/m.png: cannot read"), 422, "invalid_tissue_mask"),
    (JobNotFound("no job abc"), 404, "job_not_found"),
    (InferenceError("/srv/model.onnx failed"), 500, "internal_error"),
    (RuntimeError("oops"), 500, "internal_error"),
])
def test_the_api_answers_from_the_table(exc: Exception, status: int, code: str) -> None:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=_app(exc), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/boom")

    response = asyncio.run(get())
    assert response.status_code == status
    body = response.json()
    assert body["error"]["code"] == code
    # Client errors say what is wrong, without server paths; internal ones say nothing more.
    assert "/srv/" not in body["error"]["message"]
