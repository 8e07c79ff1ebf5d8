"""``hoverserve key new|hash``: API keys for ``HOVERSERVE_API_KEYS``."""

from __future__ import annotations

import argparse
import json
import secrets

from service.cli import _args

__all__ = ["register"]


def _cmd_key_new(args: argparse.Namespace) -> int:
    from service.deps import key_digest

    key = "hs_" + secrets.token_urlsafe(32)
    print(json.dumps({"key": key, "sha256": key_digest(key)}, indent=2))
    return 0


def _cmd_key_hash(args: argparse.Namespace) -> int:
    from service.deps import key_digest

    print(key_digest(args.key))
    return 0


def register(sub: _args.Subparsers) -> None:
    """Add ``key new`` and ``key hash`` to the ``hoverserve`` parser."""
    p = sub.add_parser("key", help="API keys for HOVERSERVE_API_KEYS")
    ksub = p.add_subparsers(dest="key_command", required=True)
    k = ksub.add_parser("new", help="make a key; put its sha256 in HOVERSERVE_API_KEYS")
    k.set_defaults(func=_cmd_key_new)
    k = ksub.add_parser("hash", help="the sha256 of an existing key")
    k.add_argument("key")
    k.set_defaults(func=_cmd_key_hash)
