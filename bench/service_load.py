"""Load benchmark of the HTTP API: concurrent uploads while many clients poll job status.

    python bench/service_load.py                       # starts its own API (embedded queue)
    python bench/service_load.py --server http://host:8000 --api-key KEY --model NAME

Runs ``--uploads`` concurrent slide uploads (CMU-1-Small-Region.svs by default) and, for
``--seconds`` after they are accepted, ``--pollers`` concurrent clients each polling
``GET /v1/jobs/{id}`` in a loop. Reports upload and status latencies (p50/p99/max), request
counts and errors; ``--json FILE`` also writes them. Exit status 1 when any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CMU1 = ROOT / ".." / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str]:
    """An API process (embedded queue) with the test oracle model, store under ``home``."""
    sys.path.insert(0, str(ROOT))
    from tests._synthetic import build_oracle

    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    build_oracle(models / "oracle.onnx")
    port = _free_port()
    env = {**os.environ, "HOVERSERVE_STORE": str(home / "store"),
           "HOVERSERVE_CACHE_DIR": str(home / "cache"), "HOVERSERVE_MODELS_DIR": str(models),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HOVERSERVE_REDIS_URL", None)
    env.pop("HOVERSERVE_API_KEYS", None)
    code = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"
    log = (home / "api.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-c", code, "serve", "--port", str(port),
                             "--no-access-log", "--log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start; see {home / 'api.log'}")


def _summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"n": 0}
    ms = np.asarray(latencies) * 1000
    return {"n": len(ms), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def _server_quantiles(metrics: str, route: str) -> dict[str, float]:
    """p50/p99 upper bounds (ms) of the server-side latency histogram of ``route`` (GET, 200):
    the time inside the API process, without the client's or the network's share."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = sample.labels
            if (sample.name.endswith("_bucket") and labels.get("route") == route
                    and labels.get("method") == "GET" and labels.get("status") == "200"):
                buckets.append((float(labels["le"]), sample.value))
    if not buckets:
        return {}
    buckets.sort()
    total = buckets[-1][1]
    result = {"n": total}
    for name, q in (("p50_ms_le", 0.5), ("p99_ms_le", 0.99)):
        result[name] = next(le for le, count in buckets if count >= q * total) * 1000
    return result


async def run_load(url: str, *, slide: Path, options: dict, uploads: int, pollers: int,
                   seconds: float, interval: float = 0.5, api_key: str | None = None) -> dict:
    """Upload ``uploads`` slides at once, then poll their status with ``pollers`` clients, each
    waiting ``interval`` seconds between its requests (0: as fast as possible)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=uploads + pollers + 4)
    errors: list[str] = []
    upload_times: list[float] = []
    status_times: list[float] = []
    data = slide.read_bytes()
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        async def upload(i: int) -> str | None:
            start = time.perf_counter()
            response = await client.post("/v1/jobs", files={"slide": (slide.name, data)},
                                         data={"options": json.dumps(options)})
            upload_times.append(time.perf_counter() - start)
            if response.status_code != 202:
                errors.append(f"upload {i}: {response.status_code} {response.text[:200]}")
                return None
            return response.json()["id"]

        async def poll(i: int, ids: list[str], stop: float) -> None:
            k = i
            await asyncio.sleep(interval * i / max(1, pollers))  # spread the pollers' phases
            while time.perf_counter() < stop:
                job_id = ids[k % len(ids)]
                k += 1
                start = time.perf_counter()
                try:
                    response = await client.get(f"/v1/jobs/{job_id}")
                except httpx.HTTPError as exc:
                    errors.append(f"poll {i}: {type(exc).__name__}: {exc}")
                    continue
                status_times.append(time.perf_counter() - start)
                if response.status_code != 200:
                    errors.append(f"poll {i}: {response.status_code} {response.text[:200]}")
                await asyncio.sleep(interval)

        ids = [job_id for job_id in await asyncio.gather(*(upload(i) for i in range(uploads)))
               if job_id]
        if ids:
            stop = time.perf_counter() + seconds
            await asyncio.gather(*(poll(i, ids, stop) for i in range(pollers)))
        states = {}
        for job_id in ids:
            states[job_id] = (await client.get(f"/v1/jobs/{job_id}")).json()["state"]
        server = _server_quantiles((await client.get("/metrics")).text, "/v1/jobs/{job_id}")
    return {"uploads": _summary(upload_times), "status": _summary(status_times),
            "status_server": server,
            "errors": errors, "pollers": pollers, "seconds": seconds, "interval": interval,
            "states": states}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", help="API URL (default: start a local one)")
    parser.add_argument("--api-key")
    parser.add_argument("--slide", type=Path, default=CMU1)
    parser.add_argument("--model", default="oracle", help="model name for the jobs")
    parser.add_argument("--roi", default="0,0,600,600", help="x,y,w,h of each job (small: load "
                        "on the API, not the pipeline, is measured), or 'none' for the whole slide "
                        "(the jobs keep the machine busy while the pollers run)")
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--pollers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.5,
                        help="seconds each poller waits between requests (0 = flat out)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    options: dict = {"model": args.model}
    if args.roi != "none":
        options["roi"] = [int(v) for v in args.roi.split(",")]
    proc = None
    with tempfile.TemporaryDirectory(prefix="hoverserve-load-") as tmp:
        url = args.server
        if url is None:
            proc, url = start_server(Path(tmp))
        try:
            result = asyncio.run(run_load(url, slide=args.slide, options=options,
                                          uploads=args.uploads, pollers=args.pollers,
                                          seconds=args.seconds, interval=args.interval,
                                          api_key=args.api_key))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=20)
    up, st = result["uploads"], result["status"]
    print(f"uploads: {up['n']} (p50 {up.get('p50_ms', 0):.0f} ms, max {up.get('max_ms', 0):.0f} ms)")
    print(f"status:  {st['n']} requests from {args.pollers} pollers "
          f"({args.interval:g} s apart each) in {args.seconds:.0f} s: "
          f"p50 {st.get('p50_ms', 0):.1f} ms, p99 {st.get('p99_ms', 0):.1f} ms, "
          f"max {st.get('max_ms', 0):.1f} ms (goal p99 < 50 ms)")
    server = result["status_server"]
    if server:
        print(f"         inside the API process (histogram bucket bounds): p50 <= "
              f"{server['p50_ms_le']:g} ms, p99 <= {server['p99_ms_le']:g} ms")
    print(f"errors:  {len(result['errors'])}")
    for line in result["errors"][:10]:
        print(f"  {line}")
    if args.json:
        sys.path.insert(0, str(ROOT / "bench"))
        from report import machine_facts

        result.update({"machine": machine_facts(), "slide": args.slide.name, "options": options,
                       "uploads_requested": args.uploads})
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
