"""Seeded fuzzing of ``POST /v1/jobs`` on one real server: hundreds of mutated requests (multipart
structure, options JSON, headers, damaged slides) are all answered without a 5xx, the server stays
healthy, and a job that finished before the fuzzing keeps byte-identical results."""

from __future__ import annotations

import hashlib
import json
import random
import re
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from service.deps import key_digest
from tests.service._server import CMU1, ORACLE, SLIDES, Server, service_env, submit, wait_for

pytestmark = pytest.mark.slow

SEED = 20261201
KEY = "fuzz-key-0123456789abcdef"
IDLE_S = 2
BOUNDARY = "fuzz-boundary-5c1d"
ROI = [200, 200, 400, 400]


@dataclass
class Form:
    """A request to mutate: multipart body, Content-Type and any extra headers."""

    body: bytes
    content_type: str = f"multipart/form-data; boundary={BOUNDARY}"
    headers: dict[bytes, bytes] = field(default_factory=dict)


@dataclass
class Tally:
    """What the server answered (status counts) and how often the connection broke instead."""

    statuses: dict[int, int] = field(default_factory=dict)
    sent: int = 0
    broken: int = 0
    accepted: list[str] = field(default_factory=list)

    def add(self, status: int) -> None:
        self.statuses[status] = self.statuses.get(status, 0) + 1

    @property
    def answered(self) -> int:
        return sum(self.statuses.values())


# --------------------------------------------------------------------------- building forms


def part(name: str, data: bytes, filename: str | None = None, extra: bytes = b"") -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return (f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode() + extra + b"\r\n"
            + data + b"\r\n")


def form(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def slide_samples() -> list[tuple[str, bytes]]:
    """Small slides from ../shared (the big ones cut heavily so every request stays quick)."""
    samples = [(p.name, p.read_bytes()) for p in sorted((SLIDES / "synthetic").iterdir())
               if p.suffix in (".svs", ".tiff", ".dcm")]
    samples += [(p.name, p.read_bytes()[:200_000]) for p in sorted((SLIDES / "tiles").glob("*.png"))]
    samples.append((CMU1.name, CMU1.read_bytes()[:300_000]))
    return samples


def good_options(rng: random.Random) -> dict:
    return {**ORACLE, "tissue_mask": False, "roi": [0, 0, rng.randint(32, 96), rng.randint(32, 96)]}


def good_form(rng: random.Random, samples: list[tuple[str, bytes]]) -> bytes:
    name, data = rng.choice(samples)
    return form(part("options", json.dumps(good_options(rng)).encode()), part("slide", data, name))


# --------------------------------------------------------------------------- mutations


def _flip(rng: random.Random, data: bytes, flips: int) -> bytes:
    out = bytearray(data)
    for _ in range(flips if out else 0):
        out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    return bytes(out)


def _splice(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data) + 1)
    j = min(len(data), i + rng.randint(0, 4000))
    choice = rng.randrange(5)
    if choice == 0:
        return data[:i]  # truncated
    if choice == 1:
        return data[:i] + data[j:]  # a slice removed
    if choice == 2:
        return data[:i] + rng.randbytes(rng.randint(1, 300)) + data[i:]  # junk inserted
    if choice == 3:
        return data[:j] + data[i:]  # a slice repeated
    return _flip(rng, data, rng.randint(1, 16))


_TOKENS = [b"Content-Disposition", b"form-data", b"name=", b"filename=", b'"slide"', b'"options"',
           b"\r\n\r\n", b"\r\n", b"--" + BOUNDARY.encode() + b"--", b"--" + BOUNDARY.encode()]


def _replace_token(rng: random.Random, data: bytes) -> bytes:
    token = rng.choice(_TOKENS)
    junk = rng.choice([b"", b"\n", b"X", rng.randbytes(rng.randint(1, 40)), token * 3,
                       token.upper(), b"--" + BOUNDARY.encode()[:-1]])
    return data.replace(token, junk, rng.choice([1, 1, -1]))


def _odd_parts(rng: random.Random, samples: list[tuple[str, bytes]]) -> bytes:
    name, data = rng.choice(samples)
    options = json.dumps(good_options(rng)).encode()
    choice = rng.randrange(8)
    if choice == 0:
        return form(part("options", options), part("slide", data, name), part("slide", data, name))
    if choice == 1:
        return form(part("slide", data, rng.choice(["../x.svs", "C:\\x.svs", "C:x.svs", "a/b",
                                                   "x\x00.svs", "n" * rng.randint(256, 6000)])))
    if choice == 2:
        return form(part("options", options, extra=b"X-Junk: " + b"j" * rng.randint(5000, 90000)
                         + b"\r\n"), part("slide", data, name))
    if choice == 3:
        return form(*(part(f"f{i}", b"x") for i in range(rng.randint(15, 3000))),
                    part("slide", data, name))
    if choice == 4:
        return form(part("options", options), part("slide_sha256", rng.randbytes(32).hex().encode()),
                    part("slide", data, name))
    if choice == 5:
        return form(part("options", options))
    if choice == 6:
        return form(part("options", b" " * rng.randint(60_000, 300_000)), part("slide", data, name))
    return b"preamble\r\n" + form(part("slide", data, name))


def multipart_mutation(rng: random.Random, samples: list[tuple[str, bytes]]) -> Form:
    if rng.random() < 0.3:
        return Form(_odd_parts(rng, samples))
    body = good_form(rng, samples)
    for _ in range(rng.randint(1, 3)):
        body = _replace_token(rng, body) if rng.random() < 0.4 else _splice(rng, body)
    return Form(body)


def _junk_value(rng: random.Random, depth: int = 0) -> object:
    pool: list[Callable[[], object]] = [
        lambda: None, lambda: True, lambda: rng.randint(-10**6, 10**6), lambda: 10**rng.randint(10, 400),
        lambda: rng.uniform(-1e308, 1e308), lambda: rng.choice([0.02, 50, 0.0, -0.5, 1e-300, 0.25]),
        lambda: "x" * rng.randint(0, 3000), lambda: rng.randbytes(8).hex(),
        lambda: [_junk_value(rng, depth + 1) for _ in range(rng.randint(0, 5))] if depth < 4 else [],
        lambda: {rng.randbytes(3).hex(): _junk_value(rng, depth + 1)} if depth < 4 else {},
    ]
    return rng.choice(pool)()


_KEYS = ["model", "mpp", "roi", "tissue_mask", "region_size", "colour", "", "__class__"]


def _options_text(rng: random.Random) -> bytes:
    options: dict[str, object] = good_options(rng)
    for _ in range(rng.randint(1, 3)):
        key = rng.choice(_KEYS)
        if rng.random() < 0.2:
            options.pop(key, None)
        else:
            options[key] = _junk_value(rng)
    text = json.dumps(options, allow_nan=True)
    choice = rng.randrange(10)
    if choice == 0:
        return text.encode()[: rng.randrange(len(text) + 1)]
    if choice == 1:
        return rng.choice([b"NaN", b"[]", b"null", b'"x"', b"1e999", b"\xff\xfe{}", b"{" * 5000])
    if choice == 2:
        return text.replace('"mpp": ', '"mpp": NaN, "x": ', 1).encode()
    if choice == 3:
        depth = rng.randint(10, 20000)
        return b'{"roi": ' + b"[" * depth + b"]" * depth + b"}"
    if choice == 4:
        return re.sub(r'"mpp": [^,}]+', '"mpp": ' + rng.choice(["Infinity", "-Infinity", "NaN", "1e400"]),
                      text.replace('"model"', '"mpp": 1, "model"', 1), count=1).encode()
    return text.encode()


def options_mutation(rng: random.Random, samples: list[tuple[str, bytes]]) -> Form:
    name, data = rng.choice(samples)
    return Form(form(part("options", _options_text(rng)), part("slide", data, name)))


def header_mutation(rng: random.Random, samples: list[tuple[str, bytes]]) -> Form:
    request = Form(good_form(rng, samples))
    choice = rng.randrange(4)
    if choice == 0:
        request.content_type = rng.choice([
            "", "text/plain", "multipart/form-data", "multipart/form-data; boundary=",
            "multipart/form-data; boundary=other", f'multipart/form-data; boundary="{BOUNDARY}"',
            f"multipart/mixed; boundary={BOUNDARY}", "multipart/form-data; boundary=" + "b" * 300,
            f"multipart/form-data; charset=utf-8; boundary={BOUNDARY}; x=y",
            f"MULTIPART/FORM-DATA; BOUNDARY={BOUNDARY}", "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=\"unterminated", ";;;=;=", "\xe9\xff; boundary=\xe9",
        ])
    elif choice == 1:
        request.headers[b"Authorization"] = rng.choice([
            b"", b"Bearer", b"Bearer ", b"Basic " + rng.randbytes(12).hex().encode(),
            b"Bearer " + rng.randbytes(20).hex().encode(), b"bearer " + KEY.encode(),
            b"Bearer  " + KEY.encode(), b"Bearer " + b"k" * 6000, b"Bearer \xe9\xff\xfe",
        ])
    elif choice == 2:
        request.headers[b"Content-Encoding"] = rng.choice([b"gzip", b"br", b"identity", b"\xff"])
        request.headers[b"Expect"] = rng.choice([b"100-continue", b"nonsense"])
    else:
        request.headers[rng.choice([b"X-Forwarded-For", b"Cookie", b"Range", b"If-None-Match"])] = \
            rng.randbytes(rng.randint(1, 500)).hex().encode()
    return request


def slide_mutation(rng: random.Random, samples: list[tuple[str, bytes]]) -> Form:
    name, data = rng.choice(samples)
    if rng.random() < 0.5:
        data = data[: rng.randint(0, len(data))]
    data = _flip(rng, data, rng.choice([0, 1, 4, 32, 256]))
    if rng.random() < 0.3:
        name = name.rsplit(".", 1)[0] + "." + rng.choice(["svs", "tiff", "dcm", "png", "jpg", "bin", ""])
    return Form(form(part("options", json.dumps(good_options(rng)).encode()), part("slide", data, name)))


# --------------------------------------------------------------------------- raw sockets


def raw_statuses(port: int, request: bytes, wait: float) -> list[int]:
    """Send bytes as they are; the statuses of every response read until the server closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.settimeout(wait)
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                received += chunk
        except OSError:  # reset or timeout: what arrived so far is the answer
            pass
    return [int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", received)]


def lying_requests(rng: random.Random, samples: list[tuple[str, bytes]]) -> list[bytes]:
    """Requests whose framing lies: Content-Length off either way, broken chunked encoding."""
    requests = []
    for i in range(12):
        body = good_form(rng, samples)
        head = (f"POST /v1/jobs HTTP/1.1\r\nHost: fuzz\r\nAuthorization: Bearer {KEY}\r\n"
                f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n")
        if i % 3 == 0:
            requests.append(f"{head}Content-Length: {len(body) + rng.randint(1, 10**6)}\r\n\r\n"
                            .encode() + body)
        elif i % 3 == 1:
            requests.append(f"{head}Content-Length: {rng.randint(0, len(body) - 1)}\r\n\r\n"
                            .encode() + body)
        else:
            chunk = rng.choice([b"zz\r\n", b"ffffffffffffffffff\r\n", b"10\r\nabc\r\n0\r\n"])
            requests.append(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunk + body[:500])
    return requests


# --------------------------------------------------------------------------- the test


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("fuzz")
    env = service_env(home, api_keys=key_digest(KEY), max_upload_mb="3",
                      upload_idle_timeout_s=str(IDLE_S))
    with Server(env, home / "api.log") as srv:
        yield srv


def result_digests(client: httpx.Client, job: dict) -> dict[str, str]:
    digests = {}
    for name, url in job["results"].items():
        response = client.get(url)
        assert response.status_code == 200, (name, response.text)
        digests[name] = hashlib.sha256(response.content).hexdigest()
    return digests


def send(client: httpx.Client, request: Form, tally: Tally) -> None:
    headers = {b"Authorization": f"Bearer {KEY}".encode(),
               b"Content-Type": request.content_type.encode("latin-1")}
    headers.update(request.headers)
    tally.sent += 1
    try:
        response = client.post("/v1/jobs", content=request.body, headers=headers)
    except httpx.TransportError:
        tally.broken += 1
        return
    tally.add(response.status_code)
    if response.status_code == 202:
        tally.accepted.append(response.json()["id"])
        # Nothing waits for accepted jobs; cancelling at once keeps the CPU for the fuzzing.
        tally.add(client.delete(f"/v1/jobs/{response.json()['id']}").status_code)


def test_mutated_requests_never_get_a_5xx(server: Server) -> None:
    rng = random.Random(SEED)
    samples = slide_samples()
    tally = Tally()
    with server.client({"Authorization": f"Bearer {KEY}"}) as client:
        response = submit(client, CMU1, {**ORACLE, "roi": ROI})
        assert response.status_code == 202, response.text
        earlier = wait_for(client, response.json()["id"])
        assert earlier["state"] == "succeeded", earlier
        before = result_digests(client, earlier)

        with ThreadPoolExecutor(max_workers=4) as pool:
            # Framing lies stall until the idle timeout: they run alongside the rest.
            raw: list[Future[list[int]]] = [pool.submit(raw_statuses, server.port, request, 30)
                                            for request in lying_requests(rng, samples)]
            mutations = [multipart_mutation] * 150 + [options_mutation] * 130 \
                + [header_mutation] * 90 + [slide_mutation] * 130
            rng.shuffle(mutations)
            for mutate in mutations:
                send(client, mutate(rng, samples), tally)
            for future in raw:
                tally.sent += 1
                for status in future.result():
                    tally.add(status)

        assert not [s for s in tally.statuses if s >= 500], tally.statuses
        assert tally.sent >= 500 and tally.broken <= tally.sent // 100, tally
        assert sum(n for s, n in tally.statuses.items() if 400 <= s < 500) > 400, tally.statuses
        assert client.get("/healthz").json()["status"] == "ok"
        after = client.get(f"/v1/jobs/{earlier['id']}").json()
        assert after["state"] == "succeeded" and result_digests(client, after) == before
        fresh = submit(client, SLIDES / "synthetic" / "small.svs", {**ORACLE, "tissue_mask": False})
        assert fresh.status_code == 202, fresh.text
        metrics = client.get("/metrics").text
    answered = [line for line in metrics.splitlines()
                if line.startswith("hoverserve_http_request_seconds_count")]
    assert answered and not [line for line in answered if 'status="5' in line], answered
    # (Reader libraries log their own tracebacks for damaged files; ours would say these.)
    log = server.log.read_text()
    assert "unhandled error" not in log and "Exception in ASGI application" not in log, log[-3000:]
    assert not list(server.log.parent.rglob(".upload-*"))
