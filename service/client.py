"""A small Python client for the HoVerServe HTTP API (httpx)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

__all__ = ["Client", "ClientError"]

TERMINAL = ("succeeded", "failed", "cancelled")


class ClientError(Exception):
    """An error answer from the server: HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class Client:
    """Talks to one HoVerServe server.

    Parameters
    ----------
    base_url : str
        e.g. ``http://127.0.0.1:8000``.
    api_key : str, optional
        Sent as ``Authorization: Bearer <key>``.
    timeout : float
        Seconds per request (uploads use no read limit on the body).
    transport : httpx.BaseTransport, optional
        For tests (``httpx.MockTransport``) or custom networking.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout,
                                  transport=transport)

    def __repr__(self) -> str:
        return f"Client({str(self._http.base_url)!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code, message = f"http_{response.status_code}", response.text[:200]
        raise ClientError(response.status_code, code, message)

    def submit(self, slide: str | Path, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload a slide and queue a job; returns the job's status (with ``id``)."""
        slide = Path(slide)
        with slide.open("rb") as fh:
            response = self._http.post(
                "/v1/jobs", files={"slide": (slide.name, fh, "application/octet-stream")},
                data={"options": json.dumps(options or {})},
                timeout=httpx.Timeout(self._http.timeout.connect, read=None, write=None, pool=None))
        return self._check(response).json()

    def status(self, job_id: str) -> dict[str, Any]:
        return self._check(self._http.get(f"/v1/jobs/{job_id}")).json()

    def jobs(self, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        return self._check(self._http.get("/v1/jobs", params={"offset": offset, "limit": limit})).json()

    def models(self) -> list[dict[str, Any]]:
        return self._check(self._http.get("/v1/models")).json()["models"]

    def cancel(self, job_id: str) -> None:
        """Cancel a queued or running job, or delete a finished one."""
        self._check(self._http.delete(f"/v1/jobs/{job_id}"))

    def wait(self, job_id: str, *, interval: float = 1.0, timeout: float | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job finishes; returns its final status (raises TimeoutError)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(job_id)
            if on_progress is not None:
                on_progress(status)
            if status["state"] in TERMINAL:
                return status
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status['state']} after {timeout} s")
            time.sleep(interval)

    def download(self, job_id: str, name: str, dest: str | Path) -> Path:
        """Save one result to ``dest`` (a file path, or a folder to put ``name`` in)."""
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / Path(name).name
        with self._http.stream("GET", f"/v1/jobs/{job_id}/results/{name}") as response:
            if not response.is_success:
                response.read()
                self._check(response)
            with dest.open("wb") as fh:
                for block in response.iter_bytes():
                    fh.write(block)
        return dest

    def download_all(self, job_id: str, out_dir: str | Path) -> list[Path]:
        """Save every result of a succeeded job into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        return [self.download(job_id, name, out) for name in self.status(job_id)["results"]]
