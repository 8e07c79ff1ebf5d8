"""``hoverserve serve | worker | submit | key``: the service's subcommands (registered in service.cli)."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from service.cli import _EXTRA_COMMANDS, UsageError, _positive_float, _roi

__all__ = ["register"]


def _settings(store: str | None):
    from service.settings import Settings

    overrides: dict[str, Any] = {"store": store} if store else {}
    return Settings(**overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.main import create_app

    settings = _settings(args.store)
    app = create_app(settings)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args.store)
    if not settings.redis_url:
        raise UsageError("`hoverserve worker` needs HOVERSERVE_REDIS_URL (without Redis, "
                         "`hoverserve serve` runs jobs itself)")
    from service.queue.rq_queue import run_worker

    run_worker(settings, name=args.name, burst=args.burst)
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from service.client import Client, ClientError

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
    key = args.api_key or os.environ.get("HOVERSERVE_API_KEY")
    with Client(args.server, api_key=key) as client:
        try:
            job = client.submit(slide, options=options)
            print(job["id"])
            if not args.wait and not args.out:
                return 0
            bar = tqdm(total=0, unit="region", desc=slide.name, disable=args.quiet,
                       dynamic_ncols=True, file=sys.stderr)

            def show(status: dict) -> None:
                progress = status["progress"]
                if progress.get("regions_total") is not None and bar.total != progress["regions_total"]:
                    bar.reset(total=progress["regions_total"])
                bar.n = progress.get("regions_done", 0)
                bar.set_postfix(state=status["state"], nuclei=progress.get("nuclei", 0), refresh=False)
                bar.refresh()

            try:
                final = client.wait(job["id"], interval=args.interval, on_progress=show)
            finally:
                bar.close()
            if final["state"] != "succeeded":
                error = final.get("error") or {}
                print(f"job {job['id']} {final['state']}: {error.get('message', '')}", file=sys.stderr)
                return 1
            if args.out:
                for path in client.download_all(job["id"], args.out):
                    print(path)
        except ClientError as exc:
            raise UsageError(f"server answered {exc}") from exc
    return 0


def _cmd_key_new(args: argparse.Namespace) -> int:
    from service.deps import key_digest

    key = "hs_" + secrets.token_urlsafe(32)
    print(json.dumps({"key": key, "sha256": key_digest(key)}, indent=2))
    return 0


def _cmd_key_hash(args: argparse.Namespace) -> int:
    from service.deps import key_digest

    print(key_digest(args.key))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the service subcommands to the ``hoverserve`` parser."""
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

    p = sub.add_parser("submit", help="send a slide to a server, follow it, download results")
    p.add_argument("slide")
    p.add_argument("--server", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--api-key", help="API key (default: $HOVERSERVE_API_KEY)")
    p.add_argument("--wait", action="store_true", help="follow the job until it finishes")
    p.add_argument("--out", help="download the results into this folder (implies --wait)")
    p.add_argument("--model", help="model name (see GET /v1/models)")
    p.add_argument("--mpp", type=_positive_float, help="µm per level-0 pixel override")
    p.add_argument("--roi", type=_roi, help="x,y,w,h in level-0 pixels")
    p.add_argument("--no-tissue-mask", action="store_true")
    p.add_argument("--interval", type=_positive_float, default=1.0, help="seconds between polls")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("key", help="API keys for HOVERSERVE_API_KEYS")
    ksub = p.add_subparsers(dest="key_command", required=True)
    k = ksub.add_parser("new", help="make a key; put its sha256 in HOVERSERVE_API_KEYS")
    k.set_defaults(func=_cmd_key_new)
    k = ksub.add_parser("hash", help="the sha256 of an existing key")
    k.add_argument("key")
    k.set_defaults(func=_cmd_key_hash)


_EXTRA_COMMANDS.append(register)
