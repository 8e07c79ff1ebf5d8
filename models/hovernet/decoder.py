"""HoVer-Net decoder branch: three upsampling levels with dense blocks, then a 1×1 head."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from models.hovernet.blocks import BN_EPS, DenseBlock, TFSamePad, UpSample2x

__all__ = ["DecoderBranch"]


class DecoderBranch(nn.Module):
    """One decoder branch (``np``, ``hv`` or ``tp``) with the official sub-module names.

    ``u3`` and ``u2``: valid k×k conv → dense block (8 resp. 4 units, grouped k×k) → 1×1 conv;
    ``u1``: "same"-padded k×k conv; ``u0``: BN-ReLU → 1×1 conv with bias (the logits).
    Before ``u3``, ``u2`` and ``u1`` the coarser features are upsampled ×2 and summed with the
    (already cropped) encoder skip.

    Parameters
    ----------
    out_ch : int
        Channels of the head's logits.
    kernel_size : int
        5 in ``original`` mode, 3 in ``fast`` mode.
    """

    def __init__(self, out_ch: int, *, kernel_size: int) -> None:
        super().__init__()
        k = kernel_size
        dense3 = DenseBlock(256, 8, kernel_size=k)
        self.u3 = nn.Sequential(
            OrderedDict(
                [
                    ("conva", nn.Conv2d(1024, 256, k, bias=False)),
                    ("dense", dense3),
                    ("convf", nn.Conv2d(dense3.out_ch, 512, 1, bias=False)),
                ]
            )
        )
        dense2 = DenseBlock(128, 4, kernel_size=k)
        self.u2 = nn.Sequential(
            OrderedDict(
                [
                    ("conva", nn.Conv2d(512, 128, k, bias=False)),
                    ("dense", dense2),
                    ("convf", nn.Conv2d(dense2.out_ch, 256, 1, bias=False)),
                ]
            )
        )
        self.u1 = nn.Sequential(
            OrderedDict(
                [
                    ("conva/pad", TFSamePad(k, 1)),
                    ("conva", nn.Conv2d(256, 64, k, bias=False)),
                ]
            )
        )
        self.u0 = nn.Sequential(
            OrderedDict(
                [
                    ("bn", nn.BatchNorm2d(64, eps=BN_EPS)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("conv", nn.Conv2d(64, out_ch, 1, bias=True)),
                ]
            )
        )

    def forward(self, feats: list[Tensor], upsample: UpSample2x) -> Tensor:
        """Logits from encoder features.

        Parameters
        ----------
        feats : list of Tensor
            ``[d0, d1, d2, d3]`` with ``d0`` and ``d1`` already centre-cropped to match the
            upsampled decoder features.
        upsample : UpSample2x
            The network's shared upsampling module (it owns the ``unpool_mat`` buffer).

        Returns
        -------
        Tensor, float32, N×out_ch×h×w
        """
        d0, d1, d2, d3 = feats
        x = self.u3(upsample(d3) + d2)
        x = self.u2(upsample(x) + d1)
        x = self.u1(upsample(x) + d0)
        return self.u0(x)
