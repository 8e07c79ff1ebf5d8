"""Building blocks of HoVer-Net, named so that their parameters carry the official state-dict keys.

Official checkpoints name layers with slashes (``conv1/bn``, ``preact/bn``, ``conv0./``); the blocks
below are :class:`torch.nn.Sequential` subclasses built from ordered (name, layer) pairs so that
those names, and therefore the checkpoint keys, come out unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BN_EPS",
    "DenseBlock",
    "DenseUnit",
    "PreactBottleneck",
    "ResidualStage",
    "TFSamePad",
    "UpSample2x",
    "bn_relu",
    "centre_crop",
]

BN_EPS = 1e-5
"""Batch-norm epsilon used by every normalisation layer of the official network."""


def bn_relu(channels: int) -> list[tuple[str, nn.Module]]:
    """Batch norm followed by ReLU, as (name, layer) pairs named ``bn`` and ``relu``."""
    return [("bn", nn.BatchNorm2d(channels, eps=BN_EPS)), ("relu", nn.ReLU(inplace=True))]


def centre_crop(x: Tensor, crop: tuple[int, int]) -> Tensor:
    """Remove ``crop`` = (rows, cols) pixels from an NCHW tensor, centred.

    For an odd amount the extra pixel is removed at the bottom / right, as in the official code.
    """
    top, left = crop[0] // 2, crop[1] // 2
    height, width = x.shape[-2], x.shape[-1]
    return x[:, :, top : height - (crop[0] - top), left : width - (crop[1] - left)]


class TFSamePad(nn.Module):
    """Zero padding that reproduces TensorFlow's ``"same"`` convolution padding.

    The total padding is ``k - s`` when the side is a multiple of the stride ``s`` and
    ``k - (side % s)`` otherwise; an odd total puts the extra pixel at the bottom / right.
    Like the official layer, the amount is computed from the height and applied to both axes
    (inputs are square).
    """

    def __init__(self, kernel_size: int, stride: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        side = int(x.shape[2])
        remainder = side % self.stride
        total = self.kernel_size - (self.stride if remainder == 0 else remainder)
        total = max(total, 0)
        before = total // 2
        after = total - before
        return F.pad(x, (before, after, before, after), mode="constant", value=0.0)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


class UpSample2x(nn.Module):
    """Nearest-neighbour ×2 upsampling as a Kronecker product with the buffer ``unpool_mat``.

    The official network keeps a 2×2 matrix of ones as a buffer (it is in every checkpoint) and
    forms ``out[2i + p, 2j + q] = x[i, j] * unpool_mat[p, q]``; we do the same so that a
    checkpoint's buffer is honoured exactly.
    """

    unpool_mat: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("unpool_mat", torch.ones(2, 2, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        channels, height, width = x.shape[1], x.shape[2], x.shape[3]
        # (N, C, H, 1, W, 1) * (1, 1, 1, 2, 1, 2) -> (N, C, H, 2, W, 2): rows then columns doubled
        out = x[:, :, :, None, :, None] * self.unpool_mat.view(1, 1, 1, 2, 1, 2)
        return out.reshape(-1, channels, height * 2, width * 2)


class PreactBottleneck(nn.Sequential):
    """Pre-activated bottleneck unit: [BN-ReLU] 1×1 → BN-ReLU → k×k (stride) → BN-ReLU → 1×1.

    The first unit of a stage has no leading BN-ReLU: its input has already been activated by
    the previous stage's closing ``blk_bna`` (or the stem). The k×k convolution is padded
    TensorFlow-"same"; all others are valid 1×1 convolutions without bias.
    """

    def __init__(
        self, in_ch: int, mid_ch: int, out_ch: int, *, kernel_size: int, stride: int, preact: bool
    ) -> None:
        layers: list[tuple[str, nn.Module]] = []
        if preact:
            layers += [
                ("preact/bn", nn.BatchNorm2d(in_ch, eps=BN_EPS)),
                ("preact/relu", nn.ReLU(inplace=True)),
            ]
        layers += [
            ("conv1", nn.Conv2d(in_ch, mid_ch, 1, bias=False)),
            ("conv1/bn", nn.BatchNorm2d(mid_ch, eps=BN_EPS)),
            ("conv1/relu", nn.ReLU(inplace=True)),
            ("conv2/pad", TFSamePad(kernel_size, stride)),
            ("conv2", nn.Conv2d(mid_ch, mid_ch, kernel_size, stride=stride, bias=False)),
            ("conv2/bn", nn.BatchNorm2d(mid_ch, eps=BN_EPS)),
            ("conv2/relu", nn.ReLU(inplace=True)),
            ("conv3", nn.Conv2d(mid_ch, out_ch, 1, bias=False)),
        ]
        super().__init__(OrderedDict(layers))


class ResidualStage(nn.Module):
    """A stage of the pre-activated ResNet: ``count`` bottleneck units, then BN-ReLU.

    Each unit's output is added to a running shortcut; the stage's input is projected by a
    strided 1×1 convolution (``shortcut``) when width or resolution change.
    """

    def __init__(
        self, in_ch: int, mid_ch: int, out_ch: int, count: int, *, stride: int = 1
    ) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            PreactBottleneck(
                in_ch if idx == 0 else out_ch, mid_ch, out_ch,
                kernel_size=3, stride=stride if idx == 0 else 1, preact=idx != 0,
            )
            for idx in range(count)
        )
        self.shortcut: nn.Conv2d | None = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            if in_ch != out_ch or stride != 1
            else None
        )
        self.blk_bna = nn.Sequential(OrderedDict(bn_relu(out_ch)))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        feat = x
        for unit in self.units:
            feat = unit(feat) + shortcut
            shortcut = feat
        return self.blk_bna(feat)


class DenseUnit(nn.Sequential):
    """Dense-block unit: BN-ReLU → 1×1 → BN-ReLU → grouped k×k (valid)."""

    def __init__(
        self, in_ch: int, *, kernel_size: int, mid_ch: int = 128, growth: int = 32, groups: int = 4
    ) -> None:
        super().__init__(
            OrderedDict(
                [
                    ("preact_bna/bn", nn.BatchNorm2d(in_ch, eps=BN_EPS)),
                    ("preact_bna/relu", nn.ReLU(inplace=True)),
                    ("conv1", nn.Conv2d(in_ch, mid_ch, 1, bias=False)),
                    ("conv1/bn", nn.BatchNorm2d(mid_ch, eps=BN_EPS)),
                    ("conv1/relu", nn.ReLU(inplace=True)),
                    ("conv2", nn.Conv2d(mid_ch, growth, kernel_size, groups=groups, bias=False)),
                ]
            )
        )


class DenseBlock(nn.Module):
    """Dense block of valid convolutions: each unit's output is concatenated to its input.

    Because the units' k×k convolutions are valid, the running features are centre-cropped to
    the new features' size before concatenation; the block ends with BN-ReLU.
    """

    def __init__(self, in_ch: int, count: int, *, kernel_size: int, growth: int = 32) -> None:
        super().__init__()
        self.units = nn.ModuleList(
            DenseUnit(in_ch + idx * growth, kernel_size=kernel_size, growth=growth)
            for idx in range(count)
        )
        self.out_ch = in_ch + count * growth
        self.blk_bna = nn.Sequential(OrderedDict(bn_relu(self.out_ch)))

    def forward(self, x: Tensor) -> Tensor:
        feat = x
        for unit in self.units:
            new = unit(feat)
            crop = (feat.shape[2] - new.shape[2], feat.shape[3] - new.shape[3])
            feat = torch.cat([centre_crop(feat, crop), new], dim=1)
        return self.blk_bna(feat)
