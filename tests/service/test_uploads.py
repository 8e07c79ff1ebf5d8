"""receive_upload in-process: every malformed, oversized, ambiguous or stalled form is refused with
its own error code, and no temporary file outlives a refused upload."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import pytest
from starlette.requests import Request

from service.errors import BadUpload, ServiceError, UploadTimeout, UploadTooLarge
from service.jobs import JobOptions
from service.uploads import (
    MAX_FIELD_BYTES,
    MAX_FIELDS,
    MAX_FILENAME_CHARS,
    MAX_FORM_BYTES,
    MAX_PART_HEADER_BYTES,
    Upload,
    check_filename,
    receive_upload,
)
from worker.pipeline import InferenceOptions
from worker.slide.base import MAX_MPP, MIN_MPP, check_user_mpp

BOUNDARY = "test-boundary-7f3a"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
LIMIT = 1 << 20
SLIDE = bytes(range(256)) * 64


def part(name: str, data: bytes, filename: str | None = None, extra: str = "") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{extra}\r\n").encode() \
        + data + b"\r\n"


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def slide_part(data: bytes = SLIDE, filename: str = "s.svs") -> bytes:
    return part("slide", data, filename, "Content-Type: application/octet-stream\r\n")


def request(chunks: Iterable[bytes], *, content_type: str | None = CONTENT_TYPE,
            end: str = "complete", headers: dict[str, str] | None = None) -> Request:
    """A request whose body arrives as ``chunks``; then, instead of the last message, ``end``:
    ``"complete"`` (more_body False), ``"stall"`` (nothing, ever) or ``"disconnect"``."""
    pending = list(chunks)
    raw = [(b"content-type", content_type.encode("latin-1"))] if content_type is not None else []
    raw += [(k.lower().encode(), v.encode("latin-1")) for k, v in (headers or {}).items()]

    async def receive() -> dict:
        if pending:
            body = pending.pop(0)
            return {"type": "http.request", "body": body,
                    "more_body": bool(pending) or end != "complete"}
        if end == "stall":
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/jobs", "headers": raw,
             "query_string": b""}
    return Request(scope, receive)


def receive(tmp_path: Path, req: Request, **kwargs: object) -> Upload:
    options = {"tmp_dir": tmp_path / "uploads", "limit": LIMIT, **kwargs}
    return asyncio.run(receive_upload(req, **options))  # type: ignore[arg-type]


def refused(tmp_path: Path, req: Request, code: str, **kwargs: object) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        receive(tmp_path, req, **kwargs)
    assert info.value.code == code, info.value.message
    assert info.value.message
    assert leftovers(tmp_path) == []
    return info.value


def leftovers(tmp_path: Path) -> list[str]:
    folder = tmp_path / "uploads"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# --------------------------------------------------------------------------- accepted forms


def test_a_well_formed_upload_streams_the_slide_to_a_hashed_temporary_file(tmp_path: Path) -> None:
    body = form(part("options", b'{"model": "oracle"}'), slide_part())
    upload = receive(tmp_path, request([body[i : i + 1000] for i in range(0, len(body), 1000)]))
    assert upload.path is not None and upload.path.read_bytes() == SLIDE
    assert upload.sha256 == hashlib.sha256(SLIDE).hexdigest() and upload.size == len(SLIDE)
    assert (upload.name, upload.ext) == ("s.svs", "svs")
    assert upload.fields == {"options": '{"model": "oracle"}'}
    upload.discard()
    assert leftovers(tmp_path) == []


def test_a_stored_slide_can_be_named_instead_of_sent(tmp_path: Path) -> None:
    upload = receive(tmp_path, request([form(part("slide_sha256", b"ab" * 32))]),
                     alternative="slide_sha256")
    assert upload.path is None and upload.fields["slide_sha256"] == "ab" * 32
    assert leftovers(tmp_path) == []


def test_text_after_the_closing_boundary_is_ignored(tmp_path: Path) -> None:
    upload = receive(tmp_path, request([form(slide_part()) + b"epilogue"]))
    assert upload.size == len(SLIDE)
    upload.discard()


# --------------------------------------------------------------------------- malformed forms


@pytest.mark.parametrize(("content_type", "code"), [
    (None, "not_multipart"),
    ("application/json", "not_multipart"),
    ("multipart/form-data", "invalid_boundary"),
    ("multipart/form-data; boundary=", "invalid_boundary"),
    ('multipart/form-data; boundary=""', "invalid_boundary"),
    ("multipart/form-data; boundary=" + "b" * 71, "invalid_boundary"),
])
def test_content_type_without_a_usable_boundary(tmp_path: Path, content_type: str | None,
                                                 code: str) -> None:
    refused(tmp_path, request([form(slide_part())], content_type=content_type), code)


def test_garbage_body(tmp_path: Path) -> None:
    refused(tmp_path, request([b"\x00garbage" * 100]), "malformed_multipart")


def test_body_with_another_boundary(tmp_path: Path) -> None:
    body = form(slide_part()).replace(BOUNDARY.encode(), b"other-boundary")
    refused(tmp_path, request([body]), "malformed_multipart")


@pytest.mark.parametrize("cut", [0, 10, 200, len(SLIDE) // 2, -len(f"--{BOUNDARY}--\r\n"), -4])
def test_body_without_its_closing_boundary_is_not_a_whole_upload(tmp_path: Path, cut: int) -> None:
    body = form(part("options", b"{}"), slide_part())
    refused(tmp_path, request([body[:cut]]), "incomplete_multipart")


def test_part_without_a_name(tmp_path: Path) -> None:
    body = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nx\r\n--{BOUNDARY}--\r\n".encode()
    refused(tmp_path, request([body]), "malformed_multipart")


def test_oversized_part_header_line(tmp_path: Path) -> None:
    body = form(part("options", b"{}", extra="X-Junk: " + "a" * 200_000 + "\r\n"), slide_part())
    refused(tmp_path, request([body]), "part_headers_too_large")


def test_oversized_part_headers_in_many_lines(tmp_path: Path) -> None:
    lines = "".join(f"X-{i}: {'a' * 1500}\r\n" for i in range(12))  # 18 kB, no line too long
    assert len(lines) > MAX_PART_HEADER_BYTES
    refused(tmp_path, request([form(slide_part(), part("options", b"{}", extra=lines))]),
            "part_headers_too_large")


def test_too_many_part_headers(tmp_path: Path) -> None:
    lines = "".join(f"X-{i}: a\r\n" for i in range(40))
    refused(tmp_path, request([form(part("options", b"{}", extra=lines), slide_part())]),
            "part_headers_too_large")


@pytest.mark.parametrize("name", [
    "C:\\x.svs", "C:x.svs", "../x.svs", "..\\x.svs", "a/b.svs", "/etc/x.svs", "..", ".",
    "x\x00.svs", "x\n.svs", "\\\\server\\share\\x.svs", "a" * (MAX_FILENAME_CHARS + 1) + ".svs",
    "a" * 5000 + ".svs",
])
def test_path_like_or_overlong_file_names(tmp_path: Path, name: str) -> None:
    refused(tmp_path, request([form(slide_part(filename=name))]), "invalid_filename")


def test_file_name_checks_keep_ordinary_names() -> None:
    assert check_filename("CMU-1 (copy).svs") == "CMU-1 (copy).svs"
    assert check_filename("é" * MAX_FILENAME_CHARS)
    with pytest.raises(BadUpload):
        check_filename("x\x7f.svs")


def test_rfc5987_file_name_is_checked_too(tmp_path: Path) -> None:
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"slide\"; "
            f"filename*=UTF-8''..%2Fx.svs\r\n\r\n").encode() + SLIDE + f"\r\n--{BOUNDARY}--\r\n".encode()
    refused(tmp_path, request([body]), "invalid_filename")


def test_two_slide_fields(tmp_path: Path) -> None:
    refused(tmp_path, request([form(slide_part(), slide_part(filename="t.svs"))]),
            "duplicate_field")


def test_two_options_fields(tmp_path: Path) -> None:
    refused(tmp_path, request([form(part("options", b"{}"), part("options", b"{}"), slide_part())]),
            "duplicate_field")


def test_file_in_another_field(tmp_path: Path) -> None:
    refused(tmp_path, request([form(part("file", SLIDE, "s.svs"))]), "unexpected_file")


def test_options_may_come_as_a_file(tmp_path: Path) -> None:
    upload = receive(tmp_path, request([form(part("options", b'{"mpp": 0.5}', "o.json"),
                                             slide_part())]))
    assert upload.fields == {"options": '{"mpp": 0.5}'}
    upload.discard()


def test_file_and_slide_sha256_together(tmp_path: Path) -> None:
    body = form(slide_part(), part("slide_sha256", b"ab" * 32))
    refused(tmp_path, request([body]), "ambiguous_slide", alternative="slide_sha256")


@pytest.mark.parametrize("fields", [[], [b"options"], [b"slide_sha256"]])
def test_no_slide_and_no_slide_sha256(tmp_path: Path, fields: list[bytes]) -> None:
    # An empty slide_sha256 names nothing.
    body = form(*(part(name.decode(), b"" if name == b"slide_sha256" else b"{}") for name in fields))
    error = refused(tmp_path, request([body]), "missing_slide", alternative="slide_sha256")
    assert "slide_sha256" in error.message


def test_empty_slide(tmp_path: Path) -> None:
    refused(tmp_path, request([form(slide_part(b""))]), "empty_upload")


# --------------------------------------------------------------------------- bounded resources


def test_slide_over_the_limit(tmp_path: Path) -> None:
    body = form(slide_part(b"\0" * (LIMIT + 1)))
    error = refused(tmp_path, request([body[i : i + 65536] for i in range(0, len(body), 65536)]),
                    "upload_too_large")
    assert isinstance(error, UploadTooLarge) and error.status == 413


@pytest.mark.parametrize("declared", ["999999999999999999999999", "9" * 5000])
def test_declared_length_over_the_limit_is_refused_before_reading(tmp_path: Path,
                                                                  declared: str) -> None:
    refused(tmp_path, request([], headers={"content-length": declared}, end="stall"),
            "upload_too_large")


def test_strange_declared_length_is_left_to_the_body(tmp_path: Path) -> None:
    upload = receive(tmp_path, request([form(slide_part())], headers={"content-length": "²"}))
    upload.discard()


def test_more_fields_than_allowed(tmp_path: Path) -> None:
    many = [part(f"f{i}", b"x") for i in range(20_000)]
    refused(tmp_path, request([form(*many)]), "too_many_fields")
    assert MAX_FIELDS < 20_000


def test_field_over_its_size(tmp_path: Path) -> None:
    error = refused(tmp_path, request([form(part("options", b" " * (MAX_FIELD_BYTES + 1)),
                                            slide_part())]), "field_too_large")
    assert error.status == 413


def test_fields_over_their_total_size(tmp_path: Path) -> None:
    count = MAX_FORM_BYTES // (MAX_FIELD_BYTES - 10) + 1
    assert count < MAX_FIELDS
    fields = [part(f"f{i}", b"x" * (MAX_FIELD_BYTES - 10)) for i in range(count)]
    # Each just under the per-field cap, together over the total.
    refused(tmp_path, request([form(*fields)]), "form_too_large")


def test_an_upload_that_stalls_is_closed_and_its_file_removed(tmp_path: Path) -> None:
    head = form(slide_part())[:5000]
    error = refused(tmp_path, request([head], end="stall"), "upload_timeout", idle_timeout=0.2)
    assert isinstance(error, UploadTimeout) and error.status == 408
    assert error.headers == {"Connection": "close"}


def test_a_client_that_disconnects_is_not_an_error(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    head = form(slide_part())[:5000]
    refused(tmp_path, request([head], end="disconnect"), "client_disconnected")
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --------------------------------------------------------------------------- the mpp range


def test_every_layer_shares_one_mpp_range() -> None:
    for value in (MIN_MPP, 0.25, MAX_MPP):
        assert JobOptions(mpp=value).mpp == value
        assert InferenceOptions(model=Path("m.onnx"), mpp=value).mpp == value
        assert check_user_mpp(value) == value
    for value in (MIN_MPP / 2, MAX_MPP * 2, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            JobOptions(mpp=value)
        with pytest.raises(ValueError):
            InferenceOptions(model=Path("m.onnx"), mpp=value)
        with pytest.raises(ValueError):
            check_user_mpp(value)


@pytest.mark.parametrize(("text", "words"), [
    ('{"mpp": NaN}', "finite number of µm per pixel, got NaN"),
    ('{"mpp": Infinity}', "got Infinity"),
    ('{"mpp": -Infinity}', "got -Infinity"),
    (json.dumps({"mpp": 0.02}), "between 0.05 and 10"),
])
def test_mpp_problems_are_named(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        JobOptions.model_validate_json(text)
