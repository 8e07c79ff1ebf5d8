"""ConicNet: SE-ResNet U-Net with coordinate attention and HoVer-style NP / HV / NC heads.

One encoder of SE-ResNet stages (strides 2..16), one shared decoder whose every level fuses the
upsampled features with the encoder skip and re-weights them with coordinate attention, and three
small heads (conv-BN-ReLU, then a 1x1 convolution):

- ``np``: nucleus-pixel logits, 2 channels (background, nucleus);
- ``hv``: horizontal and vertical distances to the nucleus' centre of mass, 2 channels (x then y);
- ``tp``: nucleus-type logits, ``n_classes`` channels (channel 0 background).

Convolutions use same padding, so any input side divisible by 16 works; ``margin`` pixels are cut
from each side of the outputs, where zero padding leaves the predictions less reliable. Input is an
RGB batch with values 0-255 (the ONNX contract); normalisation happens inside the network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.conic.coord_attention import CoordAttention
from models.conic.se import SEResBlock, conv_bn_relu

__all__ = ["ConicNet"]

_STRIDE = 16
# approximate per-channel statistics of H&E tiles (0-255); exact values matter little with BatchNorm
_MEAN = (180.0, 130.0, 170.0)
_STD = (45.0, 50.0, 40.0)


class _Head(nn.Sequential):
    def __init__(self, in_ch: int, mid_ch: int, out_ch: int) -> None:
        super().__init__(conv_bn_relu(in_ch, mid_ch), nn.Conv2d(mid_ch, out_ch, 1))


class _DecoderLevel(nn.Module):
    """1x1 reduce, upsample x2, concatenate the skip, 3x3 conv-BN-ReLU, coordinate attention.

    Reducing channels before upsampling keeps the costly full-resolution convolution narrow.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.reduce = conv_bn_relu(in_ch, out_ch, kernel=1)
        self.fuse = conv_bn_relu(out_ch + skip_ch, out_ch)
        self.attention = CoordAttention(out_ch)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.reduce(x), scale_factor=2.0, mode="bilinear", align_corners=False)
        return self.attention(self.fuse(torch.cat([x, skip], dim=1)))


class ConicNet(nn.Module):
    """SE-ResNet U-Net with coordinate attention and NP / HV / NC heads.

    Parameters
    ----------
    n_classes : int
        Channels of the type head, background included (5 for the merged CoNSeP scheme).
    stem_width : int
        Channels of the full-resolution stem.
    widths : sequence of int
        Channels of the four encoder stages (strides 2, 4, 8, 16).
    depths : sequence of int
        SE-ResNet blocks per encoder stage.
    decoder_widths : sequence of int
        Channels of the four decoder levels (strides 8, 4, 2, 1).
    head_width : int
        Channels of each head's hidden convolution.
    stem_convs : int
        Full-resolution conv-BN-ReLU layers in the stem (the costliest layers per channel).
    margin : int
        Pixels cut from each side of every output (output side = input side - 2 * margin).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self,
        n_classes: int = 5,
        *,
        stem_width: int = 16,
        widths: Sequence[int] = (24, 48, 96, 160),
        depths: Sequence[int] = (1, 1, 2, 1),
        decoder_widths: Sequence[int] = (96, 48, 24, 16),
        head_width: int = 16,
        stem_convs: int = 1,
        margin: int = 0,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4 or len(decoder_widths) != 4:
            raise ValueError(
                "widths, depths and decoder_widths need 4 entries each, got "
                f"{tuple(widths)}, {tuple(depths)}, {tuple(decoder_widths)}"
            )
        if n_classes < 0 or n_classes == 1:
            raise ValueError(f"n_classes must be 0 (untyped) or >= 2, got {n_classes}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        self.n_classes = n_classes
        self.margin = margin
        self.register_buffer("mean", torch.tensor(_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_STD).view(1, 3, 1, 1), persistent=False)

        stem = [conv_bn_relu(3, stem_width)]
        stem += [conv_bn_relu(stem_width, stem_width) for _ in range(stem_convs - 1)]
        self.stem = nn.Sequential(*stem)
        stages: list[nn.Module] = []
        in_ch = stem_width
        for width, depth in zip(widths, depths, strict=True):
            blocks = [SEResBlock(in_ch, width, stride=2)]
            blocks += [SEResBlock(width, width) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)

        skips = [*reversed(widths[:-1]), stem_width]
        levels: list[nn.Module] = []
        for skip_ch, out_ch in zip(skips, decoder_widths, strict=True):
            levels.append(_DecoderLevel(in_ch, skip_ch, out_ch))
            in_ch = out_ch
        self.decoder = nn.ModuleList(levels)

        self.np_head = _Head(in_ch, head_width, 2)
        self.hv_head = _Head(in_ch, head_width, 2)
        self.tp_head = _Head(in_ch, head_width, n_classes) if n_classes else None

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """Predict the three maps for an RGB batch.

        Parameters
        ----------
        image : (N, 3, H, W) float32 tensor
            RGB, 0-255; H and W divisible by 16.

        Returns
        -------
        dict of str to tensor
            ``np`` (N, 2, h, w) logits, ``hv`` (N, 2, h, w), and ``tp`` (N, C, h, w) logits when
            the model is typed, with h = H - 2 * margin (the centre of the input).
        """
        x = (image - self.mean) / self.std
        features = [self.stem(x)]
        for stage in self.stages:
            features.append(stage(features[-1]))
        x = features[-1]
        for level, skip in zip(self.decoder, reversed(features[:-1]), strict=True):
            x = level(x, skip)
        out = {"np": self.np_head(x), "hv": self.hv_head(x)}
        if self.tp_head is not None:
            out["tp"] = self.tp_head(x)
        if self.margin:
            # crop after the heads, so their own convolutions still see the margin pixels
            m = self.margin
            out = {key: value[:, :, m:-m, m:-m] for key, value in out.items()}
        return out
