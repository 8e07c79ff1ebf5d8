"""``hoverserve evaluate``: compare predicted and ground-truth label maps (PQ, AJI, F1...)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from service.cli import _args
from service.cli.tables import print_scores

__all__ = ["register"]


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from models.evaluate import evaluate_files

    result = evaluate_files(args.pred, args.gt, radius=args.radius, mpp=args.mpp)
    print_scores(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def register(sub: _args.Subparsers) -> None:
    """Add ``evaluate`` to the ``hoverserve`` parser."""
    p = sub.add_parser("evaluate", help="compare predicted and ground-truth label maps")
    p.add_argument("pred", help=".npz (inst[, type_map]) or label image")
    p.add_argument("gt", help=".npz (inst[, type_map]) or label image")
    p.add_argument("--radius", type=_args.positive_float, help="detection radius, pixels")
    p.add_argument("--mpp", type=_args.mpp, help="µm/px (sets the default radius)")
    p.add_argument("--json", help="also write every metric to this JSON file")
    p.set_defaults(func=_cmd_evaluate)
