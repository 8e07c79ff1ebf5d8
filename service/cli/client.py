"""``hoverserve submit`` and ``hoverserve jobs ...``: the command-line client of a server.

Every failure (no answer, an error answer, Ctrl-C, a closed output pipe) becomes a
:class:`~service.cli._errors.UsageError` whose message says what happened, printed as one line on
stderr with exit status 2 (:mod:`service.cli._errors`), never a traceback. Once a job exists, the
line says how to get back to it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from service.cli import _args
from service.cli._errors import UsageError
from service.client import TERMINAL, Client, ClientError, ServerUnreachable

__all__ = ["register"]

STATES = ("queued", "running", "succeeded", "failed", "cancelled")


class _Session:
    """The client of one command, and the job it is about once that is known."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server: str = args.server or os.environ.get("HOVERSERVE_SERVER") or ""
        if not self.server:
            raise UsageError("which server? pass --server URL (or set HOVERSERVE_SERVER)")
        self.job_id: str | None = getattr(args, "job_id", None)
        self.following = False
        """True once the job is known to exist and this command follows it."""

    def client(self) -> Client:
        key = self.args.api_key or os.environ.get("HOVERSERVE_API_KEY")
        try:
            return Client(self.server, api_key=key)
        except ValueError as exc:
            raise UsageError(f"--server: {exc}") from exc

    def follow_hint(self) -> str:
        """How to get back to the job (after Ctrl-C or a lost connection)."""
        return (f"job {self.job_id} goes on on the server; follow it with "
                f"`hoverserve jobs status {self.job_id} --server {self.server} --wait`")


def _describe(exc: BaseException, session: _Session) -> str:
    """The one line printed for a failure of a client command."""
    if isinstance(exc, ClientError):
        text = f"server answered {exc.status} {exc.code}: {exc.message}"
    elif isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
        if session.job_id is None and session.args.command == "submit":
            return (f"{text} before the server answered; `hoverserve jobs list --server "
                    f"{session.server}` shows whether a job was created")
    elif isinstance(exc, BrokenPipeError):
        return "the output was closed before everything was written (broken pipe)"
    else:
        text = str(exc)
    if session.following and not isinstance(exc, ClientError):
        return f"{text}; {session.follow_hint()}"
    return " ".join(text.split())


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


def _run(args: argparse.Namespace, action: Callable[[_Session, Client], int]) -> int:
    """Run ``action`` with a client; every failure becomes a UsageError saying what happened."""
    session = _Session(args)
    try:
        with session.client() as client:
            code = action(session, client)
        sys.stdout.flush()
        return code
    except UsageError:
        raise
    except (ClientError, ServerUnreachable, KeyboardInterrupt, TimeoutError) as exc:
        raise UsageError(_describe(exc, session)) from exc
    except BrokenPipeError as exc:
        _silence_stdout()
        raise UsageError(_describe(exc, session)) from exc
    except OSError as exc:  # e.g. the download folder cannot be written
        raise UsageError(str(exc)) from exc
    except KeyError as exc:
        raise UsageError(f"unexpected answer from {session.server} (no {exc} field); is it a "
                         "HoVerServe server of this version?") from exc


def _out(text: str) -> None:
    print(text, flush=True)  # flushed at once: a caller reading a pipe sees the job id early


# --------------------------------------------------------------------------- showing jobs


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _when(stamp: float | None) -> str:
    return "-" if stamp is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp))


def _regions(status: dict[str, Any]) -> str:
    progress = status.get("progress") or {}
    total = progress.get("regions_total")
    return f"{progress.get('regions_done', 0)}/{'?' if total is None else total}"


def _status_lines(status: dict[str, Any]) -> list[str]:
    progress = status.get("progress") or {}
    slide = status.get("slide") or {}
    lines = [
        f"job       {status['id']}",
        f"state     {status['state']}" + ("  (results expired)" if status.get("expired") else ""),
        f"slide     {slide.get('name', '?')} ({_size(slide.get('bytes', 0))}, "
        f"sha256 {str(slide.get('sha256', ''))[:12]})",
        f"model     {status.get('model', '?')}",
        f"progress  {_regions(status)} regions, {progress.get('nuclei', 0)} nuclei"
        + (f", about {progress['eta_seconds']:.0f} s left" if progress.get("eta_seconds") else ""),
        f"created   {_when(status.get('created_at'))}",
        f"finished  {_when(status.get('finished_at'))}",
    ]
    if status.get("error"):
        lines.append(f"error     {status['error'].get('code')}: {status['error'].get('message')}")
    if status.get("results"):
        lines.append(f"results   {', '.join(status['results'])}")
    return lines


def _follow(session: _Session, client: Client, label: str) -> dict[str, Any]:
    """Poll the session's job with a progress bar on stderr until it finishes."""
    from tqdm import tqdm

    args = session.args
    # No bar where stderr is no terminal (a log file, a pipe): it would write a line per poll.
    bar = tqdm(total=0, unit="region", desc=label, disable=args.quiet or not sys.stderr.isatty(),
               dynamic_ncols=True, file=sys.stderr, delay=0.5)

    def show(status: dict[str, Any]) -> None:
        session.following = True
        progress = status["progress"]
        if progress.get("regions_total") is not None and bar.total != progress["regions_total"]:
            bar.reset(total=progress["regions_total"])
        bar.n = progress.get("regions_done", 0)
        bar.set_postfix(state=status["state"], nuclei=progress.get("nuclei", 0), refresh=False)
        bar.refresh()

    try:
        final = client.wait(session.job_id or "", interval=args.interval, on_progress=show)
    except BaseException:
        bar.leave = False  # cleared: the error line is the only one left
        raise
    finally:
        bar.close()
    return final


def _finished(status: dict[str, Any]) -> int:
    """0 when the job succeeded; else says why on stderr and gives 1."""
    if status["state"] == "succeeded":
        return 0
    error = status.get("error") or {}
    reason = f": {error.get('message')}" if error.get("message") else ""
    print(f"job {status['id']} {status['state']}{reason}", file=sys.stderr)
    return 1


# --------------------------------------------------------------------------- commands


def _cmd_submit(args: argparse.Namespace) -> int:
    slide = Path(args.slide)
    if not slide.is_file():
        raise UsageError(f"slide not found: {slide}")
    options: dict[str, object] = {}
    if args.model:
        options["model"] = args.model
    if args.mpp:
        options["mpp"] = args.mpp
    if args.roi:
        options["roi"] = list(args.roi)
    if args.no_tissue_mask:
        options["tissue_mask"] = False

    def action(session: _Session, client: Client) -> int:
        job = client.submit(slide, options=options)
        session.job_id, session.following = job["id"], True
        _out(job["id"])
        if not args.wait and not args.out:
            return 0
        final = _follow(session, client, slide.name)
        if final["state"] != "succeeded" or not args.out:
            return _finished(final)
        for path in client.download_all(job["id"], args.out):
            _out(str(path))
        return 0

    return _run(args, action)


def _cmd_list(args: argparse.Namespace) -> int:
    def action(session: _Session, client: Client) -> int:
        page = client.jobs(offset=args.offset, limit=args.limit, state=args.state)
        if args.json:
            _out(json.dumps(page, indent=2))
            return 0
        items = page["items"]
        if not items:
            _out("no jobs" + (f" {args.state}" if args.state else ""))
            return 0
        _out(f"{'JOB':32}  {'STATE':9}  {'REGIONS':>9}  {'NUCLEI':>8}  {'CREATED':19}  SLIDE")
        for item in items:
            nuclei = (item.get("progress") or {}).get("nuclei", 0)
            name = (item.get("slide") or {}).get("name", "?")
            _out(f"{item['id']:32}  {item['state']:9}  {_regions(item):>9}  {nuclei:>8}  "
                 f"{_when(item.get('created_at')):19}  {name}")
        shown = page["offset"] + len(items)
        if shown < page["total"] or page["offset"]:
            _out(f"jobs {page['offset'] + 1}-{shown} of {page['total']} (see --offset, --limit)")
        return 0

    return _run(args, action)


def _cmd_status(args: argparse.Namespace) -> int:
    def action(session: _Session, client: Client) -> int:
        status = _follow(session, client, args.job_id[:12]) if args.wait else client.status(args.job_id)
        if args.json:
            _out(json.dumps(status, indent=2))
        else:
            for line in _status_lines(status):
                _out(line)
        return _finished(status) if args.wait else 0

    return _run(args, action)


def _cmd_download(args: argparse.Namespace) -> int:
    def action(session: _Session, client: Client) -> int:
        out = Path(args.out or args.job_id)
        for path in client.download_all(args.job_id, out, names=args.names or None):
            _out(str(path))
        return 0

    return _run(args, action)


def _cmd_cancel(args: argparse.Namespace) -> int:
    def action(session: _Session, client: Client) -> int:
        before = client.status(args.job_id)
        if before["state"] in TERMINAL:
            raise UsageError(f"job {args.job_id} is already {before['state']}: nothing to cancel "
                             f"(`hoverserve jobs delete {args.job_id}` removes it)")
        after = client.cancel(args.job_id)
        _out(f"job {args.job_id} {after['state'] if after else 'finished meanwhile and was deleted'}")
        return 0

    return _run(args, action)


def _cmd_retry(args: argparse.Namespace) -> int:
    def action(session: _Session, client: Client) -> int:
        status = client.retry(args.job_id)
        _out(f"job {args.job_id} {status.get('state', 'queued')} again")
        return 0

    return _run(args, action)


def _cmd_delete(args: argparse.Namespace) -> int:
    def action(session: _Session, client: Client) -> int:
        for job_id in args.job_ids:
            session.job_id = job_id
            client.delete(job_id)
            _out(f"deleted {job_id}")
        return 0

    return _run(args, action)


# --------------------------------------------------------------------------- parsers


def _server_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help="server URL, e.g. http://127.0.0.1:8000 (default: $HOVERSERVE_SERVER)")
    p.add_argument("--api-key", help="API key (default: $HOVERSERVE_API_KEY)")


def _follow_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=_args.positive_float, default=1.0, help="seconds between polls")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def register(sub: _args.Subparsers) -> None:
    """Add ``submit`` and ``jobs list|status|download|cancel|retry|delete`` to ``hoverserve``."""
    p = sub.add_parser("submit", help="send a slide to a server, follow it, download results")
    p.add_argument("slide")
    _server_options(p)
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.add_argument("--out", help="download the results into this folder (implies --wait)")
    p.add_argument("--model", help="model name (see GET /v1/models)")
    p.add_argument("--mpp", type=_args.mpp, help="µm per level-0 pixel override")
    p.add_argument("--roi", type=_args.roi, help="x,y,w,h in level-0 pixels")
    p.add_argument("--no-tissue-mask", action="store_true")
    _follow_options(p)
    p.set_defaults(func=_cmd_submit, command="submit")

    jobs = sub.add_parser("jobs", help="your jobs on a server: list, status, download, cancel, ...")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)

    p = jsub.add_parser("list", help="your jobs, newest first")
    _server_options(p)
    p.add_argument("--state", help=f"only jobs in this state ({', '.join(STATES)}...)")
    p.add_argument("--limit", type=_args.positive_int, default=50, help="at most this many (max 500)")
    p.add_argument("--offset", type=int, default=0, help="skip this many of the newest")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p.set_defaults(func=_cmd_list)

    p = jsub.add_parser("status", help="a job's state, progress, error and results")
    p.add_argument("job_id", metavar="ID")
    _server_options(p)
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    _follow_options(p)
    p.set_defaults(func=_cmd_status)

    p = jsub.add_parser("download", help="save a succeeded job's results")
    p.add_argument("job_id", metavar="ID")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these results (default: all)")
    _server_options(p)
    p.add_argument("--out", help="folder to save into (default: ./ID)")
    p.set_defaults(func=_cmd_download)

    for name, func, text in (("cancel", _cmd_cancel, "stop a queued or running job"),
                             ("retry", _cmd_retry, "re-run a failed job's missing work")):
        p = jsub.add_parser(name, help=text)
        p.add_argument("job_id", metavar="ID")
        _server_options(p)
        p.set_defaults(func=func)

    p = jsub.add_parser("delete", help="delete jobs and their results (cancelling running ones)")
    p.add_argument("job_ids", nargs="+", metavar="ID")
    _server_options(p)
    p.set_defaults(func=_cmd_delete)

    for action in jsub.choices.values():
        action.set_defaults(command=f"jobs {action.prog.split()[-1]}")
