"""Streaming multipart uploads: the slide goes to a local temporary file, hashed on the way.

The request body is parsed as it arrives (never buffered whole) and every resource a client can
make the server hold is bounded while streaming: slide bytes (the size limit), form fields (count,
size of each, total), part headers, and time (an upload that sends nothing for
``idle_timeout`` seconds is closed). Anything that is not a well-formed, complete
``multipart/form-data`` body is refused with a 4xx :class:`~service.errors.ServiceError` whose
code names the problem, and the temporary file is removed whatever happens. The client's file
name is reduced to a display name and a whitelisted extension: it never becomes a path, and a
name that looks like one is refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import tempfile
import unicodedata
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote

from python_multipart.exceptions import FormParserError, MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.errors import BadUpload, UploadTimeout, UploadTooLarge
from service.store import SLIDE_EXTENSIONS

__all__ = [
    "MAX_BOUNDARY_CHARS",
    "MAX_FIELDS",
    "MAX_FIELD_BYTES",
    "MAX_FILENAME_CHARS",
    "MAX_FORM_BYTES",
    "MAX_PART_HEADERS",
    "MAX_PART_HEADER_BYTES",
    "SLIDE_FIELD",
    "Upload",
    "check_filename",
    "display_name",
    "receive_upload",
]

logger = logging.getLogger(__name__)

SLIDE_FIELD = "slide"
"""The form field that carries the slide file."""

MAX_FIELD_BYTES = 64 * 1024
"""Largest accepted non-file form field (the ``options`` JSON), bytes."""

MAX_FORM_BYTES = 256 * 1024
"""Largest total of all non-file form fields of one request, bytes (below ``MAX_FIELDS`` times
``MAX_FIELD_BYTES``, so it binds)."""

MAX_FIELDS = 16
"""Most parts (fields and the file) one form may have."""

MAX_PART_HEADER_BYTES = 16 * 1024
"""Largest total size of one part's headers, bytes."""

MAX_PART_HEADERS = 16
"""Most header lines one part may have."""

MAX_FILENAME_CHARS = 255
"""Longest accepted client file name, characters (the common file-system limit)."""

MAX_BOUNDARY_CHARS = 70
"""Longest multipart boundary RFC 2046 allows."""

_FLUSH_BYTES = 1 << 20
"""Bytes buffered before a write to the temporary file (in a worker thread)."""

_TEXT_FILE_FIELDS = frozenset({"options"})
"""Fields that may come as a file (``curl -F options=@options.json``): read as text all the same."""

_DRIVE = re.compile(r"^[A-Za-z]:")
"""A Windows drive prefix (``C:x.svs`` is relative to drive C's current folder)."""


@dataclass
class Upload:
    """A received upload: temporary file, content hash, size, names and the other form fields."""

    path: Path | None = None
    sha256: str = ""
    size: int = 0
    name: str = ""
    ext: str = ""
    fields: dict[str, str] = field(default_factory=dict)

    def discard(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def display_name(filename: str) -> str:
    """The last path component of a client's file name, stripped of control characters."""
    base = re.split(r"[\\/]", filename)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    return base[:200] if base not in ("", ".", "..") else "slide"


def check_filename(raw: str) -> str:
    """Refuse a client file name that is too long or looks like a path; return its display name.

    Names are never used as paths, but a client sending one is confused or probing: say so rather
    than guess which part it meant.

    Raises
    ------
    BadUpload
        ``invalid_filename``: over :data:`MAX_FILENAME_CHARS`, a control character (NUL...), a
        ``/`` or ``\\``, a drive prefix (``C:``), or ``.``/``..``.
    """
    if len(raw) > MAX_FILENAME_CHARS:
        raise BadUpload(f"file name is {len(raw)} characters long; at most {MAX_FILENAME_CHARS} "
                        "are accepted", code="invalid_filename")
    if any(unicodedata.category(ch) == "Cc" for ch in raw):
        raise BadUpload(f"file name {raw!r} contains a control character", code="invalid_filename")
    if re.search(r"[\\/]", raw) or _DRIVE.match(raw) or raw.strip() in (".", ".."):
        raise BadUpload(f"file name {raw!r} contains a path; send a bare file name",
                        code="invalid_filename")
    return display_name(raw)


def _extension(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in SLIDE_EXTENSIONS else "bin"


def _disposition(raw: bytes) -> dict[str, str]:
    """The parameters of a part's ``Content-Disposition``, values kept as sent.

    Parsed here rather than with python-multipart's ``parse_options_header``, which rewrites
    ``C:\\dir\\x.svs`` to ``x.svs`` and so hides the path this module refuses. Inside a quoted
    value only ``\\"`` is an escape: browsers send Windows names with bare backslashes.
    """
    text = raw.decode("utf-8", "replace")
    params: dict[str, str] = {}
    for match in re.finditer(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)', text):
        key, value = match.group(1).lower(), match.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        params[key] = value
    if "filename" not in params and "filename*" in params:
        # RFC 5987 form: charset'language'percent-encoded.
        _, _, encoded = params["filename*"].partition("'")
        params["filename"] = unquote(encoded.partition("'")[2], errors="replace")
    return params


class _Receiver:
    """multipart callbacks: the ``slide`` part → temp file (hashed, limited), the rest → ``fields``."""

    def __init__(self, tmp_dir: Path, limit: int) -> None:
        self.tmp_dir = tmp_dir
        self.limit = limit
        self.upload = Upload()
        self.header_field = b""
        self.header_value = b""
        self.header_bytes = 0
        self.headers: dict[bytes, bytes] = {}
        self.part_name = ""
        self.is_file = False
        self.buffer = bytearray()
        self.file_buffer = bytearray()
        self.digest = hashlib.sha256()
        self.fh: BinaryIO | None = None
        self.parts = 0
        self.names: set[str] = set()
        self.form_bytes = 0
        self.has_slide = False
        self.ended = False

    # multipart callbacks (called synchronously by parser.write)
    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_FIELDS:
            raise BadUpload(f"the form has more than {MAX_FIELDS} fields", code="too_many_fields")
        self.headers, self.header_bytes = {}, 0
        self.buffer = bytearray()

    def _count_header(self, size: int) -> None:
        self.header_bytes += size
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise BadUpload(f"a form part's headers exceed {MAX_PART_HEADER_BYTES // 1024} KiB",
                            code="part_headers_too_large")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        params = _disposition(self.headers.get(b"content-disposition", b""))
        name = params.get("name", "")
        if not name:
            raise BadUpload("a form part has no name in its Content-Disposition header",
                            code="malformed_multipart")
        if name in self.names:
            raise BadUpload(f"the form field {name!r} is sent more than once", code="duplicate_field")
        self.names.add(name)
        self.part_name = name
        self.is_file = name == SLIDE_FIELD
        if not self.is_file:
            if "filename" in params and name not in _TEXT_FILE_FIELDS:
                raise BadUpload(f"a file was sent in the form field {name!r}; send the slide in "
                                f"the field {SLIDE_FIELD!r}", code="unexpected_file")
            return
        self.has_slide = True
        self.upload.name = check_filename(params.get("filename") or "slide")
        self.upload.ext = _extension(self.upload.name)
        self.open_file()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self.is_file:
            self.upload.size += len(chunk)
            if self.upload.size > self.limit:
                raise UploadTooLarge(
                    f"upload exceeds the limit of {self.limit / 2**20:.1f} MiB")
            self.digest.update(chunk)
            self.file_buffer += chunk
            return
        if len(self.buffer) + len(chunk) > MAX_FIELD_BYTES:
            raise UploadTooLarge(f"form field {self.part_name!r} is longer than "
                                 f"{MAX_FIELD_BYTES // 1024} KiB", code="field_too_large")
        self.form_bytes += len(chunk)
        if self.form_bytes > MAX_FORM_BYTES:
            raise UploadTooLarge(f"the form's fields exceed {MAX_FORM_BYTES // 1024} KiB in all",
                                 code="form_too_large")
        self.buffer += chunk

    def on_part_end(self) -> None:
        if not self.is_file:
            self.upload.fields[self.part_name] = self.buffer.decode("utf-8", "replace")
            self.buffer = bytearray()

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict[str, object]:
        names = ("on_part_begin", "on_part_data", "on_part_end", "on_header_field",
                 "on_header_value", "on_header_end", "on_headers_finished", "on_end")
        return {name: getattr(self, name) for name in names}

    def take_file_bytes(self, force: bool = False) -> bytes | None:
        if self.file_buffer and (force or len(self.file_buffer) >= _FLUSH_BYTES):
            data = bytes(self.file_buffer)
            self.file_buffer = bytearray()
            return data
        return None

    def write(self, data: bytes) -> None:
        if self.fh is not None:
            self.fh.write(data)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()

    def open_file(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=".upload-")
        self.fh = os.fdopen(fd, "wb")
        self.upload.path = Path(name)


def _boundary(request: Request) -> bytes:
    """The request's multipart boundary (raises BadUpload when there is none usable)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise BadUpload(f"send the slide as multipart/form-data in the field {SLIDE_FIELD!r}",
                        code="not_multipart")
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        raise BadUpload(f"the multipart/form-data Content-Type needs a boundary of 1 to "
                        f"{MAX_BOUNDARY_CHARS} characters", code="invalid_boundary")
    return boundary


def _allowance(limit: int) -> int:
    """Most body bytes a form with ``limit`` slide bytes can take."""
    # Everything but the slide is capped, so a longer body is over the limit whatever it holds.
    return limit + MAX_FORM_BYTES + MAX_FIELDS * (MAX_PART_HEADER_BYTES + 2 * MAX_BOUNDARY_CHARS + 16)


async def _body(request: Request, idle_timeout: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; an idle gap or a disconnect ends the upload."""
    more = True
    while more:
        try:
            async with asyncio.timeout(idle_timeout):
                message = await request.receive()
        except TimeoutError:
            raise UploadTimeout(f"the upload sent nothing for {idle_timeout:g} s and was closed") \
                from None
        if message["type"] == "http.disconnect":
            raise BadUpload("the client disconnected before the upload was complete",
                            code="client_disconnected")
        more = bool(message.get("more_body", False))
        yield message.get("body", b"")


async def _consume(request: Request, receiver: _Receiver, boundary: bytes,
                   idle_timeout: float) -> None:
    """Feed the body to the parser, writing slide bytes as they accumulate."""
    allowance = _allowance(receiver.limit)
    parser = MultipartParser(boundary, receiver.callbacks(),  # type: ignore[arg-type]
                             max_header_count=MAX_PART_HEADERS,
                             max_header_size=MAX_PART_HEADER_BYTES)
    received = 0
    try:
        async for chunk in _body(request, idle_timeout):
            received += len(chunk)
            if received > allowance:
                raise UploadTooLarge(
                    f"upload exceeds the limit of {receiver.limit / 2**20:.1f} MiB")
            parser.write(chunk)
            data = receiver.take_file_bytes()
            if data:
                await run_in_threadpool(receiver.write, data)
    except (MultipartParseError, FormParserError) as exc:
        if str(exc).startswith("Maximum header"):
            raise BadUpload(f"a form part has too many or too long headers ({exc})",
                            code="part_headers_too_large") from None
        raise BadUpload(f"malformed multipart/form-data body: {exc}",
                        code="malformed_multipart") from None
    if not receiver.ended:
        # python-multipart's finalize() accepts a body cut anywhere: a truncated upload must not
        # pass for a whole one, so the closing boundary has to have been seen.
        raise BadUpload("the multipart/form-data body ended before its closing boundary",
                        code="incomplete_multipart")
    tail = receiver.take_file_bytes(force=True)
    if tail:
        await run_in_threadpool(receiver.write, tail)


def _check_choice(receiver: _Receiver, alternative: str | None) -> None:
    """Exactly one source of slide: the file, or (when allowed) the ``alternative`` field."""
    named = bool(alternative and receiver.upload.fields.get(alternative, "").strip())
    if receiver.has_slide and named:
        raise BadUpload(f"send either a file in {SLIDE_FIELD!r} or {alternative!r}, not both",
                        code="ambiguous_slide")
    if not receiver.has_slide and not named:
        other = f" or name a stored slide in {alternative!r}" if alternative else ""
        raise BadUpload(f"no file in the form field {SLIDE_FIELD!r}{other}", code="missing_slide")
    if receiver.has_slide and receiver.upload.size == 0:
        raise BadUpload("the uploaded slide is empty (0 bytes)", code="empty_upload")


async def receive_upload(
    request: Request, *, tmp_dir: Path, limit: int, idle_timeout: float = 60.0,
    alternative: str | None = None,
) -> Upload:
    """Parse a ``multipart/form-data`` request, streaming its ``slide`` field to ``tmp_dir``.

    Parameters
    ----------
    request
        The request; its body is read here.
    tmp_dir
        Folder for the temporary file (created if missing).
    limit
        Most slide bytes accepted.
    idle_timeout
        Seconds the client may send nothing before the upload is closed.
    alternative
        A form field that may name the slide instead of the file (``slide_sha256``); then the
        returned upload has ``path`` None and the field in ``fields``.

    Returns
    -------
    Upload
        The temporary file (the caller owns it: :meth:`Upload.discard`), its SHA-256, size, the
        client's display name and extension, and the other form fields.

    Raises
    ------
    BadUpload
        400: ``not_multipart``, ``invalid_boundary``, ``malformed_multipart``,
        ``incomplete_multipart``, ``part_headers_too_large``, ``too_many_fields``,
        ``duplicate_field``, ``unexpected_file``, ``invalid_filename``, ``missing_slide``,
        ``ambiguous_slide``, ``empty_upload``, ``client_disconnected``.
    UploadTooLarge
        413: ``upload_too_large`` (also refused early from ``Content-Length``),
        ``field_too_large``, ``form_too_large``.
    UploadTimeout
        408 ``upload_timeout``: nothing received for ``idle_timeout`` seconds.
    """
    boundary = _boundary(request)
    declared = request.headers.get("content-length", "")
    # isascii: str.isdigit() also accepts '²', which int() refuses; a 19th digit is over any limit
    # (and int() refuses more than 4300).
    if declared.isascii() and declared.isdigit() and (
            len(declared) > 18 or int(declared) > _allowance(limit)):
        raise UploadTooLarge(f"upload exceeds the limit of {limit / 2**20:.1f} MiB")
    receiver = _Receiver(tmp_dir, limit)
    upload = receiver.upload
    try:
        await _consume(request, receiver, boundary, idle_timeout)
        receiver.close()
        _check_choice(receiver, alternative)
    except BadUpload as exc:
        receiver.close()
        upload.discard()
        if exc.code == "client_disconnected":
            # Not an error of the server's: nobody is left to answer.
            logger.info("upload abandoned: the client disconnected after %d slide bytes",
                        upload.size)
        raise
    except BaseException:
        receiver.close()
        upload.discard()
        raise
    upload.sha256 = receiver.digest.hexdigest() if receiver.has_slide else ""
    return upload
