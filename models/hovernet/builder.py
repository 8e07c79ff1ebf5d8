"""Named builders of HoVer-Net networks (random weights; load a checkpoint afterwards)."""

from __future__ import annotations

from collections.abc import Callable

from models.hovernet.net import HoVerNet

__all__ = ["BUILDERS", "build_hovernet", "hovernet_fast", "hovernet_original"]


def hovernet_fast(nr_types: int | None = None) -> HoVerNet:
    """HoVer-Net ``fast`` mode: 256×256 in, 164×164 out (PanNuke, MoNuSAC checkpoints)."""
    return HoVerNet("fast", nr_types)


def hovernet_original(nr_types: int | None = None) -> HoVerNet:
    """HoVer-Net ``original`` mode: 270×270 in, 80×80 out (CoNSeP, Kumar, CPM-17 checkpoints)."""
    return HoVerNet("original", nr_types)


BUILDERS: dict[str, Callable[[int | None], HoVerNet]] = {
    "hovernet-fast": hovernet_fast,
    "hovernet-original": hovernet_original,
}
"""Architecture name (as written in model cards) → builder."""


def build_hovernet(architecture: str, nr_types: int | None = None) -> HoVerNet:
    """Build the network named ``architecture`` (a key of :data:`BUILDERS`)."""
    try:
        builder = BUILDERS[architecture]
    except KeyError:
        raise ValueError(
            f"architecture must be one of {sorted(BUILDERS)}, got {architecture!r}"
        ) from None
    return builder(nr_types)
