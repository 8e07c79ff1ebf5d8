"""``hoverserve serve`` (the HTTP API) and ``hoverserve worker`` (a queue worker)."""

from __future__ import annotations

import argparse
import errno
import socket
from typing import TYPE_CHECKING, Any

from service.cli import _args
from service.cli._errors import UsageError

if TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["register"]


def _settings(store: str | None) -> Settings:
    from service.settings import Settings

    overrides: dict[str, Any] = {"store": store} if store else {}
    return Settings(**overrides)


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (raises UsageError naming the problem in one line)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot listen on {host}:{port}: unknown host ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no owner
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (another server is using it?)" if exc.errno == errno.EADDRINUSE else ""
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}{hint}") from exc
    return sock


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    settings = _settings(args.store)
    # Bind first: a server that cannot listen must exit before it touches the store (it would
    # otherwise take up, and then abandon, the store's jobs).
    sock = _listen(args.host, args.port)
    port = sock.getsockname()[1]
    app = create_app(settings, port=port)
    config = uvicorn.Config(app, host=args.host, port=port, log_level=args.log_level,
                            access_log=args.access_log)
    with sock:
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args.store)
    if not settings.redis_url:
        raise UsageError("`hoverserve worker` needs HOVERSERVE_REDIS_URL (without Redis, "
                         "`hoverserve serve` runs jobs itself)")
    from service.queue.rq_queue import run_worker

    run_worker(settings, name=args.name, burst=args.burst)
    return 0


def register(sub: _args.Subparsers) -> None:
    """Add ``serve`` and ``worker`` to the ``hoverserve`` parser."""
    p = sub.add_parser("serve", help="run the HTTP API (uvicorn)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--store", help="store URL or directory (default: $HOVERSERVE_STORE)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info",
                                                            "debug"])
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("worker", help="run a queue worker (needs HOVERSERVE_REDIS_URL)")
    p.add_argument("--store", help="store URL or directory (default: $HOVERSERVE_STORE)")
    p.add_argument("--name", help="worker name (default: host:pid)")
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.set_defaults(func=_cmd_worker)
