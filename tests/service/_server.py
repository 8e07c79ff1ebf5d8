"""Real service processes for the HTTP tests: a uvicorn API (and RQ workers) on free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests._synthetic import build_oracle

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT / ".." / "shared"
SLIDES = SHARED / "data" / "slides"
CMU1 = SLIDES / "CMU-1-Small-Region.svs"
QUPATH_CHECK = SHARED / "tools" / "qupath_geojson_check.py"

ORACLE = {"model": "oracle"}
"""Job options naming the test model (the ONNX oracle: fast, crude nuclei on real H&E)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def models_dir(tmp: Path) -> Path:
    folder = tmp / "models"
    folder.mkdir(parents=True, exist_ok=True)
    build_oracle(folder / "oracle.onnx")
    return folder


def service_env(tmp: Path, **settings: str) -> dict[str, str]:
    """Environment for a service process: store and cache under ``tmp``, the oracle model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOVERSERVE_")}
    env.update({
        "HOVERSERVE_STORE": str(tmp / "store"),
        "HOVERSERVE_CACHE_DIR": str(tmp / "cache"),
        "HOVERSERVE_MODELS_DIR": str(models_dir(tmp)),
        "HOVERSERVE_BATCH_SIZE": "4",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    })
    env.update({f"HOVERSERVE_{k.upper()}": v for k, v in settings.items()})
    return env


_MAIN = "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))"
"""What the ``hoverserve`` console script runs (``python -m service.cli`` runs the same)."""


class Process:
    """A ``hoverserve`` subcommand in its own process group, logging to a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as fh:  # the child keeps its own copy of the descriptor
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _MAIN, *args], env=env, cwd=ROOT,
                stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as when a machine dies."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


class Server(Process):
    """``hoverserve serve`` on a free port, started and answering ``/healthz``."""

    def __init__(self, env: dict[str, str], log: Path, *, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--port", str(self.port), "--no-access-log",
                          "--log-level", "warning"], env, log)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not start: {log.read_text()[-3000:]}")
            time.sleep(0.2)

    def __enter__(self) -> Server:
        return self

    def client(self, headers: dict[str, str] | None = None) -> httpx.Client:
        """An HTTP client for this server (close it, or use it in a ``with`` block)."""
        return httpx.Client(base_url=self.url, headers=headers or {}, timeout=60)


def wait_for(client: httpx.Client, job_id: str, *, timeout: float = 240,
             states: tuple[str, ...] = ("succeeded", "failed", "cancelled")) -> dict:
    """Poll a job until it reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        status = client.get(f"/v1/jobs/{job_id}")
        status.raise_for_status()
        body = status.json()
        if body["state"] in states:
            return body
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {body['state']}: {body}")
        time.sleep(0.3)


def submit(client: httpx.Client, slide: Path, options: dict | None = None, *,
           filename: str | None = None) -> httpx.Response:
    import json

    with slide.open("rb") as fh:
        return client.post("/v1/jobs", files={"slide": (filename or slide.name, fh)},
                           data={"options": json.dumps(options or ORACLE)})


def qupath_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(QUPATH_CHECK), str(path)], capture_output=True,
                          text=True, timeout=120)
