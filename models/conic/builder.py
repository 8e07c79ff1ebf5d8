"""Named sizes of the ConicNet family and the name -> builder registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from models.conic.unet import ConicNet

__all__ = ["BUILDERS", "SIZES", "build_conic", "build_conic_small", "build_conic_tiny", "build_conic_wide"]

SIZES: dict[str, dict[str, Any]] = {
    # The default HoVerServe model (see docs/model-card.md for its size and speed).
    "conic": {"stem_width": 16, "widths": (24, 48, 96, 160), "depths": (1, 1, 2, 1),
              "decoder_widths": (96, 48, 24, 16), "head_width": 16, "stem_convs": 1},
    # About 4x wider and deeper than "conic" (4.1 M parameters, 18 GFLOPs per 256x256 patch): trained
    # on a GPU; still practical on a CPU for a slide (docs/model-card.md).
    "conic-wide": {"stem_width": 32, "widths": (48, 96, 192, 320), "depths": (1, 2, 2, 1),
                   "decoder_widths": (192, 96, 48, 32), "head_width": 32, "stem_convs": 2},
    # A lighter variant for slow CPUs.
    "conic-small": {"stem_width": 12, "widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1),
                    "decoder_widths": (64, 32, 16, 12), "head_width": 12, "stem_convs": 1},
    # A very small variant for tests and smoke runs (a few thousand parameters per stage).
    "conic-tiny": {"stem_width": 4, "widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1),
                   "decoder_widths": (16, 8, 8, 4), "head_width": 4, "stem_convs": 1},
}
"""Architecture name -> ConicNet keyword arguments."""


def _build(size: str, n_classes: int, overrides: dict[str, Any]) -> ConicNet:
    return ConicNet(n_classes, **{**SIZES[size], **overrides})


def build_conic(n_classes: int = 5, **overrides: Any) -> ConicNet:
    """The default HoVerServe model; ``overrides`` replace any of its ConicNet arguments."""
    return _build("conic", n_classes, overrides)


def build_conic_wide(n_classes: int = 5, **overrides: Any) -> ConicNet:
    """A wider, deeper variant (GPU-trained)."""
    return _build("conic-wide", n_classes, overrides)


def build_conic_small(n_classes: int = 5, **overrides: Any) -> ConicNet:
    """A lighter variant for slow CPUs."""
    return _build("conic-small", n_classes, overrides)


def build_conic_tiny(n_classes: int = 5, **overrides: Any) -> ConicNet:
    """A very small variant for tests and smoke runs."""
    return _build("conic-tiny", n_classes, overrides)


BUILDERS: dict[str, Callable[..., ConicNet]] = {
    "conic": build_conic,
    "conic-wide": build_conic_wide,
    "conic-small": build_conic_small,
    "conic-tiny": build_conic_tiny,
}
"""Architecture name (as written in training configs and model cards) -> builder."""
