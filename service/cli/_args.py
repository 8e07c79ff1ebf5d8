"""Argument types and shared options of the ``hoverserve`` subcommands.

Every bound is read from where the library keeps it (:mod:`worker.options` for run options,
:mod:`models.families` for post-processing), never typed again here, so the command line accepts
exactly what the API and the library accept, with the same messages.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any

from models.families import MAX_UPSAMPLE, HoverOptions, InstanceOptions
from models.zoo import ModelNotFound, resolve_model
from service.cli._errors import UsageError
from worker.options import (
    MAX_REGION_SIZE,
    MIN_REGION_SIZE,
    OBJECTS,
    Device,
    check_mpp,
    check_roi,
)

__all__ = [
    "DEVICES",
    "OBJECTS",
    "Subparsers",
    "model_file",
    "mpp",
    "number",
    "positive_float",
    "positive_int",
    "postprocess_args",
    "probability",
    "region_size",
    "roi",
    "upsample_factor",
]

Subparsers = argparse._SubParsersAction
"""What ``add_subparsers`` returns: each command group's ``register`` adds its parsers to it."""

DEVICES: tuple[str, ...] = typing.get_args(Device)
"""``--device`` choices."""


def roi(text: str) -> tuple[int, int, int, int]:
    """``x,y,w,h`` in level-0 pixels, checked as the API checks a job's roi."""
    parts = text.replace(" ", "").split(",")
    try:
        x, y, w, h = (int(float(p)) for p in parts)
    except (ValueError, OverflowError) as exc:
        raise argparse.ArgumentTypeError(f"--roi wants x,y,w,h in level-0 pixels, got {text!r}") from exc
    try:
        return check_roi((x, y, w, h))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def number(text: str) -> float:
    """Any number."""
    try:
        return float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc


def positive_float(text: str) -> float:
    """A number > 0."""
    value = number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def mpp(text: str) -> float:
    """A resolution in µm per pixel within the range the API accepts (same message)."""
    try:
        return check_mpp(number(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def probability(text: str) -> float:
    """A threshold strictly between 0 and 1."""
    value = number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a threshold between 0 and 1, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def region_size(text: str) -> int:
    """A region core side within the bounds a job may ask for, model pixels."""
    value = positive_int(text)
    if not MIN_REGION_SIZE <= value <= MAX_REGION_SIZE:
        raise argparse.ArgumentTypeError(
            f"expected a region size from {MIN_REGION_SIZE} to {MAX_REGION_SIZE} model pixels, "
            f"got {text!r}")
    return value


def upsample_factor(text: str) -> int:
    """An upsampling factor of the post-processing, 1 to :data:`models.families.MAX_UPSAMPLE`."""
    value = positive_int(text)
    if value > MAX_UPSAMPLE:
        raise argparse.ArgumentTypeError(
            f"expected an upsampling factor from 1 to {MAX_UPSAMPLE}, got {text!r}")
    return value


def postprocess_args(args: argparse.Namespace) -> dict[str, Any]:
    """The post-processing options given on the command line (``--np-threshold``,
    ``--score-threshold`` etc. are named after the card keys of every family), None or empty
    where not given."""
    keys = dict.fromkeys((*HoverOptions.KEYS, *InstanceOptions.KEYS))
    return {key: getattr(args, key, None) for key in keys}


def model_file(name: str | None, option: str | None = None) -> Path:
    """The model file a command line names: a file, an installed model's name, or None for the
    bundled default (:func:`models.zoo.resolve_model`).

    Parameters
    ----------
    name : str, optional
        What the user typed.
    option : str, optional
        The option that named it (``--model``), to start the message with.

    Returns
    -------
    Path

    Raises
    ------
    UsageError
        No such file or model; the message lists the installed models.
    """
    try:
        return resolve_model(name)
    except ModelNotFound as exc:
        raise UsageError(f"{option}: {exc}" if option else str(exc)) from exc
