"""Named sizes of the TSFD-Net family and the name -> builder registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.tsfd.net import TSFDNet

__all__ = ["BUILDERS", "SIZES", "build_tsfd", "build_tsfd_b2", "build_tsfd_tiny"]

SIZES: dict[str, dict[str, Any]] = {
    # The CPU-budget scale: EfficientNet-B0 trunk, 64-channel pyramid (see models/tsfd/__init__.py
    # for compute per patch); 3 BiFPN blocks as in the paper.
    "tsfd": {"scale": "b0", "width": 64, "n_bifpn": 3},
    # A GPU-budget scale, closer to the paper's B4 / 160 channels.
    "tsfd-b2": {"scale": "b2", "width": 112, "n_bifpn": 3},
    # Tests and smoke runs: same blocks, narrow pyramid, one BiFPN.
    "tsfd-tiny": {"scale": "b0", "width": 16, "n_bifpn": 1},
}
"""Architecture name -> TSFDNet keyword arguments."""


def _build(size: str, n_classes: int, overrides: dict[str, Any]) -> TSFDNet:
    return TSFDNet(n_classes, **{**SIZES[size], **overrides})


def build_tsfd(n_classes: int = 5, **overrides: Any) -> TSFDNet:
    """The CPU-budget TSFD-Net (B0 trunk); ``overrides`` replace any TSFDNet argument."""
    return _build("tsfd", n_classes, overrides)


def build_tsfd_b2(n_classes: int = 5, **overrides: Any) -> TSFDNet:
    """A larger TSFD-Net (B2 trunk, 112-channel pyramid) for GPU training."""
    return _build("tsfd-b2", n_classes, overrides)


def build_tsfd_tiny(n_classes: int = 5, **overrides: Any) -> TSFDNet:
    """A narrow TSFD-Net for tests and smoke runs."""
    return _build("tsfd-tiny", n_classes, overrides)


BUILDERS: dict[str, Callable[..., TSFDNet]] = {
    "tsfd": build_tsfd,
    "tsfd-b2": build_tsfd_b2,
    "tsfd-tiny": build_tsfd_tiny,
}
"""Architecture name (as written in training configs and model cards) -> builder."""
