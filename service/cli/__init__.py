"""The ``hoverserve`` command line.

Each subcommand parses its arguments, builds the value objects the library takes, calls one
library function and renders the result. Library errors become a one-line message on stderr and
exit status 2 (:mod:`service.cli._errors`); nothing else is printed on failure.

The command groups are the modules of :data:`COMMAND_GROUPS`, each with a
``register(subparsers)`` that adds its subcommands; :func:`build_parser` calls them in that order
(the order of ``hoverserve --help``). Nothing registers itself on import.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from types import ModuleType

from service.cli import client, evaluate, export, infer, keys, model, serve
from service.cli._errors import EXIT_USAGE, UsageError, run

__all__ = ["COMMAND_GROUPS", "EXIT_USAGE", "UsageError", "build_parser", "main"]

COMMAND_GROUPS: tuple[ModuleType, ...] = (infer, model, export, evaluate, serve, client, keys)
"""The modules whose ``register(subparsers)`` make up ``hoverserve``: infer; model ...; export
qupath; evaluate; serve and worker; submit and jobs ...; key new|hash."""


def build_parser() -> argparse.ArgumentParser:
    """The ``hoverserve`` parser with every command group's subcommands.

    Returns
    -------
    argparse.ArgumentParser
        Each leaf subcommand sets ``func``, the function that runs it.
    """
    parser = argparse.ArgumentParser(
        prog="hoverserve",
        description="Nuclear instance segmentation and classification of whole-slide images.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hoverserve`` with ``argv`` (default: the process's arguments).

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name.

    Returns
    -------
    int
        The exit status: 0, 1 (a followed job did not succeed), 2 (bad input, printed as one
        line) or 130 (interrupted). A bad option exits through argparse (SystemExit 2).
    """
    # Spinning OpenMP threads starve everything else on small shared machines (training ran ~10x
    # slower); this only takes effect if set before torch is first imported, which no command
    # does before it runs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args.func, args)
