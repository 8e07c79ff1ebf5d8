"""SE-ResNet block: a residual block whose output channels are gated by squeeze-and-excitation."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SEResBlock", "SqueezeExcite", "conv_bn_relu"]


def conv_bn_relu(in_ch: int, out_ch: int, *, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Convolution (same padding, no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class SqueezeExcite(nn.Module):
    """Channel gating: global average pool -> bottleneck MLP -> sigmoid -> scale.

    Parameters
    ----------
    channels : int
        Feature channels.
    reduction : int
        Bottleneck ratio of the MLP (at least 4 hidden units are kept).
    """

    def __init__(self, channels: int, *, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # mean over (H, W) rather than AdaptiveAvgPool2d: exports to a plain ReduceMean
        squeezed = x.mean(dim=(2, 3), keepdim=True)
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(squeezed))))
        return x * gate


class SEResBlock(nn.Module):
    """Basic residual block (two 3x3 convolutions) with squeeze-and-excitation on the residual.

    ``out = relu(shortcut(x) + SE(bn(conv(relu(bn(conv(x)))))))``; the shortcut is a strided
    1x1 convolution when the stride or the channel count changes.

    Parameters
    ----------
    in_ch, out_ch : int
        Input and output channels.
    stride : int
        Stride of the first convolution (2 halves the resolution).
    reduction : int
        Squeeze-and-excitation bottleneck ratio.
    """

    def __init__(self, in_ch: int, out_ch: int, *, stride: int = 1, reduction: int = 8) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.se = SqueezeExcite(out_ch, reduction=reduction)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return torch.relu(out + self.shortcut(x))
