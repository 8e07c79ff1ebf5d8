"""Coordinate attention (Hou et al., CVPR 2021): channel gates that keep one spatial direction.

Features are pooled along each image axis separately, mixed by a shared 1x1 bottleneck, and turned
into a row gate (H x 1) and a column gate (1 x W); the product re-weights every position, so the
gate knows *where* along each axis a channel matters (useful for locating nucleus boundaries).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CoordAttention"]


class CoordAttention(nn.Module):
    """Coordinate-attention gate.

    Parameters
    ----------
    channels : int
        Feature channels (input = output).
    reduction : int
        Bottleneck ratio of the shared 1x1 convolution (at least 8 hidden units are kept).
    """

    def __init__(self, channels: int, *, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(8, channels // reduction)
        self.mix = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.Hardswish(),
        )
        self.to_rows = nn.Conv2d(hidden, channels, 1)
        self.to_cols = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height = x.shape[2]
        rows = x.mean(dim=3, keepdim=True)  # N x C x H x 1
        cols = x.mean(dim=2, keepdim=True).transpose(2, 3)  # N x C x W x 1
        mixed = self.mix(torch.cat([rows, cols], dim=2))
        mixed_rows, mixed_cols = mixed[:, :, :height], mixed[:, :, height:]
        gate_rows = torch.sigmoid(self.to_rows(mixed_rows))  # N x C x H x 1
        gate_cols = torch.sigmoid(self.to_cols(mixed_cols)).transpose(2, 3)  # N x C x 1 x W
        return x * gate_rows * gate_cols
