"""Streaming multipart uploads: the slide goes to a local temporary file, hashed on the way.

The request body is parsed as it arrives (never buffered whole), the size limit is enforced while
streaming, and the client's file name is reduced to a display name and a whitelisted extension:
it never becomes a path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from service.errors import BadUpload, UploadTooLarge
from service.store import SLIDE_EXTENSIONS

__all__ = ["Upload", "display_name", "receive_upload"]

logger = logging.getLogger(__name__)

_FLUSH_BYTES = 1 << 20
"""Bytes buffered before a write to the temporary file (in a worker thread)."""

_MAX_FIELD_BYTES = 64 * 1024
"""Largest accepted non-file form field (the ``options`` JSON)."""


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


def _extension(name: str) -> str:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext if ext in SLIDE_EXTENSIONS else "bin"


class _Receiver:
    """multipart callbacks: file part → temp file (hashed, limited), text parts → ``fields``."""

    def __init__(self, tmp_dir: Path, limit: int) -> None:
        self.tmp_dir = tmp_dir
        self.limit = limit
        self.upload = Upload()
        self.header_field = b""
        self.header_value = b""
        self.headers: dict[bytes, bytes] = {}
        self.part_name = ""
        self.is_file = False
        self.buffer = bytearray()
        self.file_buffer = bytearray()
        self.digest = hashlib.sha256()
        self.fh: BinaryIO | None = None
        self.slide_parts = 0

    # multipart callbacks (called synchronously by parser.write)
    def on_part_begin(self) -> None:
        self.headers = {}
        self.buffer = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_field.lower()] = self.header_value
        self.header_field, self.header_value = b"", b""

    def on_headers_finished(self) -> None:
        _, params = parse_options_header(self.headers.get(b"content-disposition", b""))
        self.part_name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        self.is_file = self.part_name == "slide"
        if self.is_file:
            self.slide_parts += 1
            if self.slide_parts > 1:
                raise BadUpload("send one file in the 'slide' field", code="bad_request")
            raw = filename.decode("utf-8", "replace") if filename else "slide"
            if re.search(r"[\\/]", raw) or raw.strip() in (".", ".."):
                # Names are never used as paths, but a client sending one is confused or probing:
                # say so rather than guess which part it meant.
                raise BadUpload(f"file name {raw!r} contains a path; send a bare file name",
                                code="invalid_filename")
            name = display_name(raw)
            self.upload.name, self.upload.ext = name, _extension(name)

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
        if len(self.buffer) + len(chunk) > _MAX_FIELD_BYTES:
            raise BadUpload(f"form field {self.part_name!r} is too long", code="bad_request")
        self.buffer += chunk

    def on_part_end(self) -> None:
        if not self.is_file:
            self.upload.fields[self.part_name] = self.buffer.decode("utf-8", "replace")
            self.buffer = bytearray()

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


async def receive_upload(
    request: Request, *, tmp_dir: Path, limit: int, allow_missing: bool = False
) -> Upload:
    """Parse a ``multipart/form-data`` request, streaming its ``slide`` field to ``tmp_dir``.

    Raises
    ------
    BadUpload
        Not multipart, no ``slide`` field, or an empty file.
    UploadTooLarge
        More than ``limit`` bytes of slide (also refused early from ``Content-Length``).

    With ``allow_missing`` a form without a ``slide`` part is returned with ``path`` None.
    """
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise BadUpload("send the slide as multipart/form-data in the field 'slide'",
                        code="bad_request")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _MAX_FIELD_BYTES + 65536:
        raise UploadTooLarge(f"upload exceeds the limit of {limit / 2**20:.1f} MiB")
    receiver = _Receiver(tmp_dir, limit)
    parser = MultipartParser(boundary, {
        "on_part_begin": receiver.on_part_begin, "on_part_data": receiver.on_part_data,
        "on_part_end": receiver.on_part_end, "on_header_field": receiver.on_header_field,
        "on_header_value": receiver.on_header_value, "on_header_end": receiver.on_header_end,
        "on_headers_finished": receiver.on_headers_finished,
    })
    receiver.open_file()
    upload = receiver.upload
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            data = receiver.take_file_bytes()
            if data:
                await run_in_threadpool(receiver.write, data)
        parser.finalize()
        tail = receiver.take_file_bytes(force=True)
        if tail:
            await run_in_threadpool(receiver.write, tail)
        receiver.close()
    except BaseException:
        receiver.close()
        upload.discard()
        raise
    if receiver.slide_parts == 0:
        upload.discard()
        upload.path = None
        if allow_missing:
            return upload
        raise BadUpload("no file in the form field 'slide'", code="missing_slide")
    if upload.size == 0:
        upload.discard()
        raise BadUpload("the uploaded slide is empty (0 bytes)", code="empty_upload")
    upload.sha256 = receiver.digest.hexdigest()
    return upload
