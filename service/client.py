"""A small Python client for the HoVerServe HTTP API (httpx).

Every failure is one of two exceptions with a one-line message: :class:`ClientError` when the
server answered with an error, :class:`ServerUnreachable` when no answer came (connection refused,
unknown host, timeout, connection lost). A URL that is not ``http(s)://`` is a ``ValueError``.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

__all__ = ["TERMINAL", "Client", "ClientError", "ServerUnreachable"]

TERMINAL = ("succeeded", "failed", "cancelled")
"""Job states that do not change any more."""


class ClientError(Exception):
    """An error answer from the server: HTTP status, error code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message


class ServerUnreachable(ConnectionError):
    """No answer from the server: refused, unknown host, timed out or the connection was lost."""


def check_url(url: str) -> str:
    """``url`` without a trailing slash, or ValueError when it is not an http(s) server URL.

    Parameters
    ----------
    url : str
        e.g. ``http://127.0.0.1:8000``.

    Returns
    -------
    str
        The URL as given, less trailing slashes.

    Raises
    ------
    ValueError
        If the scheme is not http or https, or the URL names no host.
    """
    example = "e.g. http://127.0.0.1:8000"
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"server URL {url!r} is not a URL ({exc}); {example}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"server URL {url!r} must start with http:// or https:// ({example})")
    return url.rstrip("/")


_ERRNO = re.compile(r"^\[Errno -?\d+\]\s*")


def _reason(exc: httpx.TransportError) -> str:
    """Why a request got no answer, in words (no exception class names)."""
    text = _ERRNO.sub("", str(exc)).strip()
    lowered = text.lower()
    if "refused" in lowered:
        return "connection refused (is `hoverserve serve` running there?)"
    if "name or service not known" in lowered or "nodename nor servname" in lowered or \
            "name resolution" in lowered or "no address associated" in lowered:
        return "unknown host name"
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.RemoteProtocolError | httpx.ReadError | httpx.WriteError):
        return f"the connection was lost ({text or 'closed by the server'})"
    return text or "no answer"


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

    Raises
    ------
    ValueError
        If ``base_url`` is not an http(s) URL.
    """

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.base_url = check_url(base_url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def __repr__(self) -> str:
        return f"Client({self.base_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # ------------------------------------------------------------------ plumbing

    @contextlib.contextmanager
    def _answer(self) -> Iterator[None]:
        """Turn httpx's transport errors into :class:`ServerUnreachable` naming this server."""
        try:
            yield
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"no answer from {self.base_url}: {_reason(exc)}") from exc

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._answer():
            response = self._http.request(method, path, **kwargs)
        return self._check(response)

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        try:
            error = response.json()["error"]
            code, message = str(error["code"]), str(error["message"])
        except (ValueError, KeyError, TypeError):
            code = f"http_{response.status_code}"
            message = " ".join(response.text[:200].split()) or response.reason_phrase
        raise ClientError(response.status_code, code, message)

    def _json(self, response: httpx.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ClientError(response.status_code, "bad_response",
                              f"the answer of {self.base_url} is not a HoVerServe JSON object "
                              "(is this the right server URL?)")
        return body

    # ------------------------------------------------------------------ jobs

    def submit(self, slide: str | Path, *, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload a slide and queue a job; returns the job's status (with ``id``)."""
        slide = Path(slide)
        with slide.open("rb") as fh:
            response = self._request(
                "POST", "/v1/jobs", files={"slide": (slide.name, fh, "application/octet-stream")},
                data={"options": json.dumps(options or {})},
                timeout=httpx.Timeout(self._http.timeout.connect, read=None, write=None, pool=None))
        return self._json(response)

    def status(self, job_id: str) -> dict[str, Any]:
        """The job's state, progress, error and result links."""
        return self._json(self._request("GET", f"/v1/jobs/{job_id}"))

    def jobs(self, *, offset: int = 0, limit: int = 50, state: str | None = None) -> dict[str, Any]:
        """One page of this key's jobs, newest first (``items``, ``total``, ``offset``, ``limit``)."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state:
            params["state"] = state
        return self._json(self._request("GET", "/v1/jobs", params=params))

    def models(self) -> list[dict[str, Any]]:
        """The models the server offers."""
        return list(self._json(self._request("GET", "/v1/models"))["models"])

    def cancel(self, job_id: str) -> dict[str, Any] | None:
        """Cancel a queued or running job (returns its status), or delete a finished one (None)."""
        response = self._request("DELETE", f"/v1/jobs/{job_id}")
        return None if response.status_code == 204 or not response.content else self._json(response)

    def delete(self, job_id: str) -> None:
        """Delete a job and its results, cancelling it first when it still runs."""
        if self.cancel(job_id) is not None:  # it was cancelled, not deleted: now it is finished
            self.cancel(job_id)

    def retry(self, job_id: str) -> dict[str, Any]:
        """Re-run a failed job's missing work; returns its new status."""
        return self._json(self._request("POST", f"/v1/jobs/{job_id}/retry"))

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
        """Save one result to ``dest`` (a file path, or a folder to put ``name`` in).

        The file appears only when complete: it is written beside ``dest`` first.
        """
        dest = Path(dest)
        if dest.is_dir():
            dest = dest / Path(name).name
        partial = dest.with_name(dest.name + ".part")
        try:
            with self._answer(), self._http.stream("GET", f"/v1/jobs/{job_id}/results/{name}") as response:
                if not response.is_success:
                    response.read()
                    self._check(response)
                dest.parent.mkdir(parents=True, exist_ok=True)  # only once there is something to save
                with partial.open("wb") as fh:
                    for block in response.iter_bytes():
                        fh.write(block)
            partial.replace(dest)
        finally:
            partial.unlink(missing_ok=True)
        return dest

    def download_all(self, job_id: str, out_dir: str | Path, *,
                     names: list[str] | None = None) -> list[Path]:
        """Save the results of a succeeded job (every one, or ``names``) into ``out_dir``."""
        out = Path(out_dir)
        wanted = names or list(self.status(job_id)["results"])
        return [self.download(job_id, name, out / Path(name).name) for name in wanted]
