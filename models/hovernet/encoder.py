"""HoVer-Net encoder: a pre-activated ResNet-50 without max-pool, then a 1×1 bottleneck conv."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from models.hovernet.blocks import BN_EPS, ResidualStage, TFSamePad

__all__ = ["HoVerNetEncoder"]

STEM_KERNEL = 7
"""Side of the stem convolution (stride 1)."""

STAGES = (  # (in, bottleneck, out, units, stride) of d0..d3
    (64, 64, 256, 3, 1),
    (256, 128, 512, 4, 2),
    (512, 256, 1024, 6, 2),
    (1024, 512, 2048, 3, 2),
)


class HoVerNetEncoder(nn.Module):
    """Encoder with the official top-level names ``conv0``, ``d0``..``d3`` and ``conv_bot``.

    The full network subclasses this module (and defines ``forward``) so that these parameters
    stay at the top level of the state dict, as in the official checkpoints.

    Parameters
    ----------
    pad_stem : bool
        Pad the 7×7 stem convolution TensorFlow-"same" (``fast`` mode); the ``original`` mode's
        stem is a valid convolution.
    in_ch : int
        Input channels.
    """

    def __init__(self, *, pad_stem: bool, in_ch: int = 3) -> None:
        super().__init__()
        stem: list[tuple[str, nn.Module]] = []
        if pad_stem:
            stem.append(("pad", TFSamePad(STEM_KERNEL, 1)))
        stem += [
            ("/", nn.Conv2d(in_ch, 64, STEM_KERNEL, bias=False)),
            ("bn", nn.BatchNorm2d(64, eps=BN_EPS)),
            ("relu", nn.ReLU(inplace=True)),
        ]
        self.conv0 = nn.Sequential(OrderedDict(stem))
        self.d0, self.d1, self.d2, self.d3 = (
            ResidualStage(i, m, o, n, stride=s) for i, m, o, n, s in STAGES
        )
        self.conv_bot = nn.Conv2d(2048, 1024, 1, bias=False)

    def encode(self, image: Tensor) -> list[Tensor]:
        """Features of an image scaled to 0..1.

        Parameters
        ----------
        image : Tensor, float32, N×3×H×W, 0..1

        Returns
        -------
        list of Tensor
            ``[d0, d1, d2, d3]`` at strides 1, 2, 4, 8 with 256, 512, 1024 and (after
            ``conv_bot``) 1024 channels.
        """
        d0 = self.d0(self.conv0(image))
        d1 = self.d1(d0)
        d2 = self.d2(d1)
        d3 = self.conv_bot(self.d3(d2))
        return [d0, d1, d2, d3]
