"""Gating block: every backbone level to the same channel count before the BiFPN."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["ConvBNAct", "Gating"]


class ConvBNAct(nn.Sequential):
    """Convolution (same padding, no bias) → BatchNorm → swish (SiLU) or nothing."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, *, groups: int = 1, act: bool = True) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(c_out),
            nn.SiLU() if act else nn.Identity(),
        )


class Gating(nn.Module):
    """One 3×3 convolution + BatchNorm + swish per level, to ``width`` channels (the official
    code's ``conv_p*in_bifpn``), with optional spatial dropout.

    Parameters
    ----------
    channels : sequence of int
        Channels of the backbone levels, finest first.
    width : int
        Channels of every output level.
    dropout : float
        Spatial (channel) dropout rate while training; 0 disables it.
    """

    def __init__(self, channels: Sequence[int], width: int, *, dropout: float = 0.0) -> None:
        super().__init__()
        if width < 1 or not channels:
            raise ValueError(f"need levels and width >= 1, got {list(channels)} and {width}")
        self.levels = nn.ModuleList(ConvBNAct(c, width) for c in channels)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.levels):
            raise ValueError(f"expected {len(self.levels)} levels, got {len(features)}")
        return [self.dropout(gate(f)) for gate, f in zip(self.levels, features, strict=True)]
