"""EfficientNet feature extractor (Tan & Le 2019), written here so the project needs no torchvision.

timm is the reference implementation, but every timm release imports torchvision at import time
(``timm.layers`` → ``torchvision.ops.misc``), and PyPI's torchvision does not load beside the
project's torch 2.13.0 CPU build. This module builds the same network as timm's
``efficientnet_b0`` … ``efficientnet_b4`` with ``features_only=True`` — the same block layout,
compound scaling, channel rounding and SiLU (swish) activations, and the same parameter names, so
a timm state dict loads into it unchanged. Checked once outside the project (a throwaway venv with
torch 2.14.1, torchvision 0.29.1, timm 1.0.31): for B0 … B4 with 6 input channels, timm's weights
load with ``strict=True`` and the five feature maps are identical (max difference 0.0).

Features are returned at strides 2, 4, 8, 16 and 32 (ends of stages 0, 1, 2, 4, 6), as timm does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["COMPOUND_SCALES", "EfficientNetFeatures", "StageSpec", "round_channels", "stage_specs"]

COMPOUND_SCALES: dict[str, tuple[float, float]] = {
    "b0": (1.0, 1.0),
    "b1": (1.0, 1.1),
    "b2": (1.1, 1.2),
    "b3": (1.2, 1.4),
    "b4": (1.4, 1.8),
}
"""Scale name → (width multiplier, depth multiplier), EfficientNet's compound scaling."""


@dataclass(frozen=True)
class StageSpec:
    """One stage of blocks: kind ``ds`` (depthwise-separable) or ``ir`` (inverted residual)."""

    kind: str
    repeats: int
    kernel: int
    stride: int
    expansion: int
    channels: int


_B0_STAGES = (
    StageSpec("ds", 1, 3, 1, 1, 16),
    StageSpec("ir", 2, 3, 2, 6, 24),
    StageSpec("ir", 2, 5, 2, 6, 40),
    StageSpec("ir", 3, 3, 2, 6, 80),
    StageSpec("ir", 3, 5, 1, 6, 112),
    StageSpec("ir", 4, 5, 2, 6, 192),
    StageSpec("ir", 1, 3, 1, 6, 320),
)
_FEATURE_STAGES = (0, 1, 2, 4, 6)
_SE_RATIO = 0.25
_STEM = 32


def round_channels(channels: float, multiplier: float = 1.0, divisor: int = 8) -> int:
    """``channels · multiplier`` rounded to a multiple of ``divisor``, never more than 10 % down."""
    value = channels * multiplier
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def stage_specs(width: float, depth: float) -> tuple[StageSpec, ...]:
    """The B0 stages scaled by the width and depth multipliers (depth rounds up)."""
    return tuple(
        StageSpec(s.kind, math.ceil(s.repeats * depth), s.kernel, s.stride, s.expansion,
                  round_channels(s.channels, width))
        for s in _B0_STAGES
    )


class _BatchNormAct(nn.BatchNorm2d):
    """BatchNorm followed by SiLU or nothing (timm's ``BatchNormAct2d``: same parameter names)."""

    def __init__(self, channels: int, *, act: bool = True) -> None:
        super().__init__(channels)
        self.act: nn.Module = nn.SiLU() if act else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(super().forward(x))


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int) -> None:
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act1 = nn.SiLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.conv_expand(self.act1(self.conv_reduce(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


def _conv(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False)


class _DepthwiseSeparable(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.skip = stride == 1 and c_in == c_out
        self.conv_dw = _conv(c_in, c_in, kernel, stride, groups=c_in)
        self.bn1 = _BatchNormAct(c_in)
        self.se = _SqueezeExcite(c_in, round(c_in * _SE_RATIO))
        self.conv_pw = _conv(c_in, c_out, 1)
        self.bn2 = _BatchNormAct(c_out, act=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


class _InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expansion: int) -> None:
        super().__init__()
        mid = round_channels(c_in * expansion)
        self.skip = stride == 1 and c_in == c_out
        self.conv_pw = _conv(c_in, mid, 1)
        self.bn1 = _BatchNormAct(mid)
        self.conv_dw = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn2 = _BatchNormAct(mid)
        # squeeze width from the block input, as timm (se_from_exp=False) does
        self.se = _SqueezeExcite(mid, round(mid * _SE_RATIO / expansion))
        self.conv_pwl = _conv(mid, c_out, 1)
        self.bn3 = _BatchNormAct(c_out, act=False)

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
        y = self.bn3(self.conv_pwl(self.se(y)))
        return x + y if self.skip else y


class EfficientNetFeatures(nn.Module):
    """EfficientNet-B0…B4 trunk returning the five feature maps (strides 2 … 32).

    Parameters
    ----------
    scale : str
        Key of :data:`COMPOUND_SCALES`.
    in_chans : int
        Input channels (3 for RGB, 6 for RGB + H, E, residual).
    """

    def __init__(self, scale: str = "b0", *, in_chans: int = 3) -> None:
        super().__init__()
        if scale not in COMPOUND_SCALES:
            raise ValueError(f"scale must be one of {sorted(COMPOUND_SCALES)}, got {scale!r}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be >= 1, got {in_chans}")
        width, depth = COMPOUND_SCALES[scale]
        stem = round_channels(_STEM, width)
        self.conv_stem = _conv(in_chans, stem, 3, 2)
        self.bn1 = _BatchNormAct(stem)
        stages: list[nn.Module] = []
        c_in = stem
        for spec in stage_specs(width, depth):
            blocks: list[nn.Module] = []
            for index in range(spec.repeats):
                stride = spec.stride if index == 0 else 1
                if spec.kind == "ds":
                    blocks.append(_DepthwiseSeparable(c_in, spec.channels, spec.kernel, stride))
                else:
                    blocks.append(_InvertedResidual(c_in, spec.channels, spec.kernel, stride,
                                                    spec.expansion))
                c_in = spec.channels
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        specs = stage_specs(width, depth)
        self.channels: tuple[int, ...] = tuple(specs[i].channels for i in _FEATURE_STAGES)
        """Channels of the five feature maps."""

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.bn1(self.conv_stem(x))
        features = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in _FEATURE_STAGES:
                features.append(x)
        return features
