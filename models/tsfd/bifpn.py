"""BiFPN: bidirectional feature pyramid with feature reweighing and fast normalised fusion.

Every fusion node reweighs each input's channels (squeeze-and-excitation, TSFD-Net's "feature
reweighing"), mixes the inputs with learnt non-negative weights normalised to sum to one
(EfficientDet's fast normalised fusion, ``w_i = relu(a_i) / (eps + sum_j relu(a_j))``), then applies
a depthwise-separable 3×3 convolution, BatchNorm and swish. Levels are finest first, each half the
side of the previous one; up- and down-sampling are nearest ×2 and 3×3 max pooling with stride 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.tsfd.gating import ConvBNAct

__all__ = ["BiFPN", "FusionNode", "SqueezeExcite", "downsample", "upsample"]

_FUSION_EPS = 1e-4


def upsample(x: Tensor) -> Tensor:
    """Nearest-neighbour ×2."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


def downsample(x: Tensor) -> Tensor:
    """3×3 max pooling with stride 2 (halves an even side)."""
    return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class SqueezeExcite(nn.Module):
    """Channel reweighing: global average → FC (swish) → FC (sigmoid) → scale."""

    def __init__(self, channels: int, ratio: int = 8) -> None:
        super().__init__()
        reduced = max(1, channels // ratio)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.expand(F.silu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class FusionNode(nn.Module):
    """Reweigh each of ``n_inputs`` same-shaped maps, fuse them, then a separable conv.

    Parameters
    ----------
    width : int
        Channels of inputs and output.
    n_inputs : int
        Number of fused maps (>= 2).
    """

    def __init__(self, width: int, n_inputs: int) -> None:
        super().__init__()
        if n_inputs < 2:
            raise ValueError(f"a fusion node needs >= 2 inputs, got {n_inputs}")
        self.reweigh = nn.ModuleList(SqueezeExcite(width) for _ in range(n_inputs))
        self.weights = nn.Parameter(torch.ones(n_inputs))
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.pointwise = ConvBNAct(width, width, 1)

    def fusion_weights(self) -> Tensor:
        """The normalised fusion weights (non-negative, summing to about one)."""
        w = F.relu(self.weights)
        return w / (w.sum() + _FUSION_EPS)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        if len(inputs) != len(self.reweigh):
            raise ValueError(f"expected {len(self.reweigh)} inputs, got {len(inputs)}")
        w = self.fusion_weights()
        fused = w[0] * self.reweigh[0](inputs[0])
        for i in range(1, len(inputs)):
            fused = fused + w[i] * self.reweigh[i](inputs[i])
        return self.pointwise(self.depthwise(fused))


class BiFPN(nn.Module):
    """One BiFPN block over ``n_levels`` maps: a top-down then a bottom-up pass.

    Top-down: ``td[i] = node(x[i], up(td[i+1]))`` from the second-coarsest level down; bottom-up:
    ``out[i] = node(x[i], td[i], down(out[i-1]))``, the coarsest ``node(x[L], down(out[L-1]))``.
    """

    def __init__(self, width: int, n_levels: int = 5) -> None:
        super().__init__()
        if n_levels < 2:
            raise ValueError(f"n_levels must be >= 2, got {n_levels}")
        self.n_levels = n_levels
        self.top_down = nn.ModuleList(FusionNode(width, 2) for _ in range(n_levels - 1))
        self.bottom_up = nn.ModuleList(
            FusionNode(width, 2 if i == n_levels - 1 else 3) for i in range(1, n_levels)
        )

    def forward(self, x: Sequence[Tensor]) -> list[Tensor]:
        if len(x) != self.n_levels:
            raise ValueError(f"expected {self.n_levels} levels, got {len(x)}")
        last = self.n_levels - 1
        td: list[Tensor] = [x[last]]
        for node, i in zip(self.top_down, range(last - 1, -1, -1), strict=True):
            td.insert(0, node([x[i], upsample(td[0])]))
        out = [td[0]]
        for node, i in zip(self.bottom_up, range(1, self.n_levels), strict=True):
            inputs = [x[i], downsample(out[-1])] if i == last else [x[i], td[i], downsample(out[-1])]
            out.append(node(inputs))
        return out
