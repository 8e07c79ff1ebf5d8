"""Interlinked semantic and boundary decoders with their heads.

Both decoders walk the fused pyramid top-down. The semantic path is ``s[i] = node(x[i], up(s[i+1]))``;
the boundary path also takes the semantic feature of its level, ``b[i] = node(x[i], up(b[i+1]), s[i])``
(the official ``OP_BiFPN``), so boundaries are learnt where the nuclei are. At the finest level
each head upsamples ×2 to the input grid: 3×3 conv + BatchNorm + swish, then a 1×1 convolution to
logits — one channel per class plus background (softmax) and one boundary channel (sigmoid).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from models.tsfd.bifpn import FusionNode, upsample
from models.tsfd.gating import ConvBNAct

__all__ = ["Head", "InterlinkedDecoders"]


class Head(nn.Module):
    """×2 nearest upsampling, 3×3 conv + BN + swish, 1×1 conv to ``out_channels`` logits."""

    def __init__(self, width: int, out_channels: int) -> None:
        super().__init__()
        mid = max(8, width // 2)
        self.conv = ConvBNAct(width, mid, 3)
        self.logits = nn.Conv2d(mid, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(self.conv(upsample(x)))


class InterlinkedDecoders(nn.Module):
    """Semantic and boundary decoders over ``n_levels`` fused maps of ``width`` channels.

    Parameters
    ----------
    width : int
        Channels of the pyramid.
    n_classes : int
        Semantic channels, background included (2 for an untyped model).
    n_levels : int
        Pyramid levels, finest first.
    """

    def __init__(self, width: int, n_classes: int, n_levels: int = 5) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2 (background + nucleus), got {n_classes}")
        self.n_levels = n_levels
        self.semantic = nn.ModuleList(FusionNode(width, 2) for _ in range(n_levels - 1))
        self.boundary = nn.ModuleList(FusionNode(width, 3) for _ in range(n_levels - 1))
        self.semantic_head = Head(width, n_classes)
        self.boundary_head = Head(width, 1)

    def forward(self, x: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Semantic logits (N×C×H×W) and boundary logits (N×1×H×W), H = 2 × the finest level."""
        if len(x) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(x)}")
        last = self.n_levels - 1
        sem, bnd = x[last], x[last]
        for k, i in enumerate(range(last - 1, -1, -1)):
            sem = self.semantic[k]([x[i], upsample(sem)])
            bnd = self.boundary[k]([x[i], upsample(bnd), sem])
        return self.semantic_head(sem), self.boundary_head(bnd)
