"""Named sizes of the panoptic family and the name -> builder registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.panoptic.net import PanopticNet

__all__ = ["BUILDERS", "SIZES", "build_panoptic_r18", "build_panoptic_tiny"]

SIZES: dict[str, dict[str, Any]] = {
    # The CPU-budget scale (see models/panoptic/backbone.py for the depth): ResNet-18 to layer3,
    # 128-channel FPN and RoI heads; 8.4 M parameters in the exported graph (34 MB float32).
    "panoptic-r18": {"depth": "resnet18", "width": 128, "box_width": 256, "fc_channels": 16,
                     "semantic_width": 64},
    # Tests and smoke runs: the same blocks, narrow.
    "panoptic-tiny": {"depth": "resnet18", "width": 32, "box_width": 64, "fc_channels": 4,
                      "semantic_width": 16},
}
"""Architecture name -> PanopticNet keyword arguments."""


def _build(size: str, n_classes: int, overrides: dict[str, Any]) -> PanopticNet:
    return PanopticNet(n_classes, **{**SIZES[size], **overrides})


def build_panoptic_r18(n_classes: int = 2, **overrides: Any) -> PanopticNet:
    """The CPU-budget panoptic network; ``n_classes`` counts background; ``overrides`` replace
    any PanopticNet argument."""
    return _build("panoptic-r18", n_classes, overrides)


def build_panoptic_tiny(n_classes: int = 2, **overrides: Any) -> PanopticNet:
    """A narrow panoptic network for tests and smoke runs."""
    return _build("panoptic-tiny", n_classes, overrides)


BUILDERS: dict[str, Callable[..., PanopticNet]] = {
    "panoptic-r18": build_panoptic_r18,
    "panoptic-tiny": build_panoptic_tiny,
}
"""Architecture name (as written in training configs and model cards) -> builder."""
