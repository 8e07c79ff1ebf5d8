"""How a failed command ends: the one place an exception becomes a one-line message on stderr
and an exit status.

Library errors and :class:`UsageError` (a problem with the command line the user can fix) are
printed as ``hoverserve: error: MESSAGE`` on one line and give :data:`EXIT_USAGE`; nothing else
is printed, never a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from models.errors import ModelError
from worker.errors import WorkerError

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_INTERRUPTED", "EXIT_USAGE", "UsageError", "fail", "run"]

EXIT_USAGE = 2
"""Exit status for bad input (unreadable slide, bad option, missing model...)."""

EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT, as a shell reports it)."""

EXIT_BROKEN_PIPE = 141
"""Exit status when the reader of the output went away (``| head``): 128 + SIGPIPE, as a shell
tool killed by the signal reports."""

TORCH_HINT = "this command needs PyTorch: pip install -e '.[torch]'"
"""Training, export and data caching need the optional PyTorch extra; inference does not."""


class UsageError(Exception):
    """A problem with the command line the user can fix; printed without a traceback."""


_USER_ERRORS: tuple[type[Exception], ...] = (UsageError, ModelError, WorkerError, ValueError,
                                             FileNotFoundError)
"""Errors that describe the user's input; printed without a traceback."""


def fail(message: str) -> int:
    """Print ``message`` as the command's one error line on stderr; give :data:`EXIT_USAGE`.

    Parameters
    ----------
    message : str
        What went wrong; line breaks and runs of spaces are folded so that it stays one line.

    Returns
    -------
    int
    """
    print(f"hoverserve: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


def run(command: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run one subcommand and turn the failures a user can fix into a message and exit status.

    Parameters
    ----------
    command : callable
        The subcommand (``args.func``).
    args : argparse.Namespace
        Its parsed arguments.

    Returns
    -------
    int
        The command's exit status; :data:`EXIT_USAGE` after a usage or library error,
        :data:`EXIT_INTERRUPTED` after Ctrl-C.
    """
    try:
        return int(command(args) or 0)
    except _USER_ERRORS as exc:
        return fail(str(exc))
    except ModuleNotFoundError as exc:
        if exc.name != "torch":
            raise
        return fail(TORCH_HINT)
    except KeyboardInterrupt:
        print("hoverserve: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python flushes stdout again at exit; pointing it at /dev/null keeps that quiet too.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
