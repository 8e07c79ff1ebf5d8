"""The command-line client (`hoverserve submit`, `hoverserve jobs ...`) and what a browser or API
user sees: one line and exit status 2 for every failure, never a traceback; /docs without a CDN;
error messages without server paths.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.cli import EXIT_USAGE, main
from service.cli import client as client_commands
from service.client import Client, ClientError, ServerUnreachable
from tests.service._server import _MAIN, CMU1, ROOT, SLIDES, Server, free_port, service_env, submit

pytestmark = pytest.mark.slow

SMALL = ["--model", "oracle", "--roi", "0,0,400,400", "--quiet", "--interval", "0.2"]
"""A quick job: the oracle model on a 400 px box of CMU-1-Small-Region."""


def one_error_line(err: str) -> str:
    """The single stderr line of a failed command (asserting there is nothing else)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("hoverserve: error: ")
    return lines[0]


def hoverserve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The console script in its own process, so that stderr is exactly what a user sees."""
    return subprocess.run([sys.executable, "-c", _MAIN, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("client")


@pytest.fixture(scope="module")
def server(home: Path) -> Iterator[Server]:
    with Server(service_env(home), home / "api.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def finished_id(server: Server, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A job run to success by `hoverserve submit --wait --out`."""
    out = tmp_path_factory.mktemp("submitted")
    with httpx.Client(base_url=server.url) as http:
        before = {item["id"] for item in http.get("/v1/jobs").json()["items"]}
    assert main(["submit", str(CMU1), "--server", server.url, "--out", str(out), *SMALL]) == 0
    with httpx.Client(base_url=server.url) as http:
        items = http.get("/v1/jobs").json()["items"]
    (job_id,) = {item["id"] for item in items} - before
    assert (out / "manifest.json").is_file()
    return job_id


# --------------------------------------------------------------------------- no server


COMMANDS = [
    ["jobs", "list"],
    ["jobs", "status", "0" * 32],
    ["jobs", "status", "0" * 32, "--wait"],
    ["jobs", "download", "0" * 32],
    ["jobs", "cancel", "0" * 32],
    ["jobs", "retry", "0" * 32],
    ["jobs", "delete", "0" * 32],
    ["submit", str(CMU1), "--wait"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=[" ".join(c[:2]) for c in COMMANDS])
def test_every_command_says_in_one_line_that_nothing_listens(
    command: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    url = f"http://127.0.0.1:{free_port()}"
    assert main([*command, "--server", url]) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err)
    assert f"no answer from {url}: connection refused" in line
    assert not any(tmp_path.iterdir())  # nothing half-downloaded


def test_a_stopped_server_is_one_line_on_the_real_stderr() -> None:
    for command in (["jobs", "list"], ["submit", str(CMU1), "--wait"]):
        result = hoverserve(*command, "--server", f"http://127.0.0.1:{free_port()}")
        assert result.returncode == EXIT_USAGE
        assert "connection refused" in one_error_line(result.stderr)
        assert result.stdout == ""
    result = hoverserve("jobs", "status", "x", "--server", "127.0.0.1:8000")
    assert result.returncode == EXIT_USAGE
    assert "must start with http://" in one_error_line(result.stderr)


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "localhost:8000", "ftp://127.0.0.1/", "http://"])
def test_a_server_url_without_http_is_named(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", str(CMU1), "--server", url, "--wait"]) == EXIT_USAGE
    line = one_error_line(capsys.readouterr().err)
    assert repr(url) in line and "http://" in line


def test_an_unknown_host_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["jobs", "list", "--server", "http://no-such-host.invalid:8000"]) == EXIT_USAGE
    assert "unknown host name" in one_error_line(capsys.readouterr().err)


def test_the_server_comes_from_the_environment_or_is_asked_for(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HOVERSERVE_SERVER", raising=False)
    assert main(["jobs", "list"]) == EXIT_USAGE
    assert "--server" in one_error_line(capsys.readouterr().err)
    monkeypatch.setenv("HOVERSERVE_SERVER", f"http://127.0.0.1:{free_port()}")
    assert main(["jobs", "list"]) == EXIT_USAGE
    assert "connection refused" in one_error_line(capsys.readouterr().err)


# --------------------------------------------------------------------------- error answers


def mock_server(monkeypatch: pytest.MonkeyPatch, handler: httpx.MockTransport) -> None:
    """Make the commands talk to ``handler`` instead of the network."""
    def make(url: str, *, api_key: str | None = None) -> Client:
        return Client(url, api_key=api_key, transport=handler)

    monkeypatch.setattr(client_commands, "Client", make)


@pytest.mark.parametrize(("status", "body", "expected"), [
    (500, {"error": {"code": "internal_error", "message": "internal server error"}},
     "server answered 500 internal_error: internal server error"),
    (503, {"error": {"code": "queue_unavailable", "message": "Redis does not answer"}},
     "server answered 503 queue_unavailable: Redis does not answer"),
    (502, "<html>\n<body>Bad gateway</body>\n</html>", "server answered 502 http_502: <html> <body>Bad"),
    (429, {"error": {"code": "quota_exceeded", "message": "3 jobs\nrunning"}},
     "server answered 429 quota_exceeded: 3 jobs running"),
])
def test_error_answers_are_their_code_and_message(
    status: int, body: object, expected: str, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        if isinstance(body, str):
            return httpx.Response(status, text=body)
        return httpx.Response(status, json=body)

    mock_server(monkeypatch, httpx.MockTransport(answer))
    assert main(["jobs", "list", "--server", "http://hoverserve.test"]) == EXIT_USAGE
    assert expected in one_error_line(capsys.readouterr().err)


def test_a_server_that_is_not_hoverserve_is_named(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    mock_server(monkeypatch, httpx.MockTransport(lambda r: httpx.Response(200, text="<html>hi</html>")))
    assert main(["jobs", "status", "a" * 32, "--server", "http://web.test"]) == EXIT_USAGE
    assert "not a HoVerServe JSON object" in one_error_line(capsys.readouterr().err)


def test_a_connection_lost_mid_answer_is_one_line(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("peer closed connection", request=request)

    mock_server(monkeypatch, httpx.MockTransport(drop))
    assert main(["jobs", "list", "--server", "http://flaky.test"]) == EXIT_USAGE
    assert "the connection was lost" in one_error_line(capsys.readouterr().err)


def test_the_python_client_raises_its_own_two_errors() -> None:
    with pytest.raises(ValueError, match="http://"):
        Client("127.0.0.1:8000")
    refused = Client(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ServerUnreachable, match="connection refused"):
        refused.status("x")
    gone = Client("http://x.test", transport=httpx.MockTransport(
        lambda r: httpx.Response(404, json={"error": {"code": "job_not_found", "message": "no job"}})))
    with pytest.raises(ClientError) as info:
        gone.status("x")
    assert (info.value.status, info.value.code, info.value.message) == (404, "job_not_found", "no job")


# --------------------------------------------------------------------------- a real server


def test_jobs_list_shows_the_submitted_job(server: Server, finished_id: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["jobs", "list", "--server", server.url]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith(finished_id))
    assert "succeeded" in row and CMU1.name in row
    assert main(["jobs", "list", "--server", server.url, "--json", "--state", "succeeded"]) == 0
    page = json.loads(capsys.readouterr().out)
    assert finished_id in [item["id"] for item in page["items"]]
    assert {item["state"] for item in page["items"]} == {"succeeded"}


def test_jobs_status_shows_state_progress_and_results(server: Server, finished_id: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["jobs", "status", finished_id, "--server", server.url]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^state\s+succeeded$", out, re.M), out
    assert re.search(r"^results\s+.*manifest\.json", out, re.M), out
    assert main(["jobs", "status", finished_id, "--server", server.url, "--wait", "--quiet",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "succeeded"


def test_jobs_download_saves_the_servers_files(server: Server, finished_id: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    out = tmp_path / "results"
    assert main(["jobs", "download", finished_id, "counts.json", "--server", server.url,
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.split() == [str(out / "counts.json")]
    with httpx.Client(base_url=server.url) as http:
        expected = http.get(f"/v1/jobs/{finished_id}/results/counts.json").content
    assert (out / "counts.json").read_bytes() == expected
    assert main(["jobs", "download", finished_id, "--server", server.url, "--out", str(out)]) == 0
    saved = {Path(p).name for p in capsys.readouterr().out.split()}
    assert {"manifest.json", "overlay.png", "nuclei.zarr.zip"} <= saved
    assert not list(out.glob("*.part"))


@pytest.mark.parametrize(("command", "expected"), [
    (["jobs", "status"], "404 job_not_found"),
    (["jobs", "download"], "404 job_not_found"),
    (["jobs", "cancel"], "404 job_not_found"),
    (["jobs", "delete"], "404 job_not_found"),
    (["jobs", "retry"], "server answered 4"),  # 404 job_not_found (or 404/405 without the route)
])
def test_an_unknown_job_is_one_line(command: list[str], expected: str, server: Server,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*command, "f" * 32, "--server", server.url]) == EXIT_USAGE
    assert expected in one_error_line(capsys.readouterr().err)


def test_a_missing_result_and_a_finished_job_are_one_line(server: Server, finished_id: str,
                                                          capsys: pytest.CaptureFixture[str],
                                                          tmp_path: Path) -> None:
    capsys.readouterr()
    assert main(["jobs", "download", finished_id, "nope.txt", "--server", server.url,
                 "--out", str(tmp_path)]) == EXIT_USAGE
    assert "404 result_not_found" in one_error_line(capsys.readouterr().err)
    assert not any(tmp_path.iterdir())
    assert main(["jobs", "cancel", finished_id, "--server", server.url]) == EXIT_USAGE
    assert "already succeeded" in one_error_line(capsys.readouterr().err)
    assert main(["jobs", "retry", finished_id, "--server", server.url]) == EXIT_USAGE
    one_error_line(capsys.readouterr().err)  # 409 (not failed) or 404 (no route yet)


def test_cancel_then_delete_removes_the_job(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    with server.client() as http:
        job = submit(http, CMU1).json()
    capsys.readouterr()
    assert main(["jobs", "cancel", job["id"], "--server", server.url]) == 0
    out = capsys.readouterr().out.strip()
    assert out in (f"job {job['id']} cancelled", f"job {job['id']} finished meanwhile and was deleted")
    with server.client() as http:
        if out.endswith("cancelled"):
            assert http.get(f"/v1/jobs/{job['id']}").json()["state"] == "cancelled"
        second = submit(http, CMU1).json()
    assert main(["jobs", "delete", job["id"], second["id"], "--server", server.url]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == [f"deleted {job['id']}", f"deleted {second['id']}"]
    with server.client() as http:
        for job_id in (job["id"], second["id"]):
            assert http.get(f"/v1/jobs/{job_id}").status_code == 404


def test_ctrl_c_while_waiting_names_the_job_and_the_way_back(server: Server) -> None:
    # Whole slide: long enough to be still running when interrupted.
    proc = subprocess.Popen([sys.executable, "-c", _MAIN, "submit", str(CMU1), "--server", server.url,
                             "--model", "oracle", "--wait", "--quiet"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # A suite started in the background inherits SIGINT ignored (as a shell
                            # sets it for `cmd &`), and Python then installs no Ctrl-C handler:
                            # give the client the terminal's default, as a user's shell does.
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip()  # printed as soon as the job exists
        assert len(job_id) == 32, job_id
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_USAGE
    line = one_error_line(err)
    assert "interrupted" in line and f"hoverserve jobs status {job_id}" in line
    with server.client() as http:
        assert http.get(f"/v1/jobs/{job_id}").json()["state"] != "cancelled"  # it goes on
        http.delete(f"/v1/jobs/{job_id}")  # (cancelled here, to free the server)


def test_ctrl_c_in_any_command_is_one_line(capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(request: httpx.Request) -> httpx.Response:
        raise KeyboardInterrupt

    mock_server(monkeypatch, httpx.MockTransport(interrupted))
    assert main(["jobs", "list", "--server", "http://x.test"]) == EXIT_USAGE
    assert one_error_line(capsys.readouterr().err) == "hoverserve: error: interrupted"
    assert main(["submit", str(CMU1), "--server", "http://x.test"]) == EXIT_USAGE
    assert "hoverserve jobs list" in one_error_line(capsys.readouterr().err)


def test_a_closed_output_pipe_is_one_line(server: Server, finished_id: str) -> None:
    with subprocess.Popen([sys.executable, "-c", _MAIN, "jobs", "list", "--server", server.url],
                          cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # as `| head -0` does, before anything is printed
        err = proc.stderr.read()
        assert proc.wait(timeout=30) == EXIT_USAGE
    assert "broken pipe" in one_error_line(err)


# --------------------------------------------------------------------------- what others see


def test_docs_pages_load_only_same_origin_assets(server: Server) -> None:
    with server.client() as http:
        for page in ("/docs", "/redoc"):
            response = http.get(page)
            assert response.status_code == 200 and "text/html" in response.headers["content-type"]
            html = response.text
            assert "http://" not in html and "https://" not in html  # no CDN, no fonts
            urls = re.findall(r"""(?:src|href)="([^"]+)"|url: '([^']+)'|spec-url="([^"]+)\"""", html)
            urls = [next(u for u in group if u) for group in urls]
            assert any(u.endswith(".js") for u in urls), html
            for url in urls:
                assert url.startswith("/") and not url.startswith("//"), url
                assert http.get(url).status_code == 200, url


def test_slide_errors_name_the_api_option_and_no_server_path(server: Server, home: Path) -> None:
    tile = SLIDES / "tiles" / "high-nuclei-score-level0.png"  # a PNG: no resolution in it
    with server.client() as http:
        response = submit(http, tile, filename="tile.png")
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "missing_resolution"
    assert '"mpp" in options' in error["message"]
    assert "--mpp" not in error["message"]
    for server_path in ("/tmp", str(home), "hoverserve-cache", "uploads/"):
        assert server_path not in error["message"], error["message"]
