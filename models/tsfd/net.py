"""TSFD-Net (Ilyas et al., Neural Networks 151, 2022): deconvolution input, EfficientNet trunk,
tissue classifier, gating, three BiFPN blocks, interlinked semantic + boundary decoders."""

from __future__ import annotations

from torch import Tensor, nn

from models.tsfd.backbone import Backbone, BackboneKind
from models.tsfd.bifpn import BiFPN
from models.tsfd.decoders import InterlinkedDecoders
from models.tsfd.deconv import ColourDeconvolution
from models.tsfd.gating import Gating
from models.tsfd.tissue import TissueClassifier

__all__ = ["TSFDNet"]

_LEVELS = 5
_STRIDE = 32  # coarsest level: the input side must be a multiple of it


class TSFDNet(nn.Module):
    """The TSFD-Net segmentation network.

    ``forward(image)`` takes float32 N×3×H×W RGB in 0..255 (H, W multiples of 32) and returns raw
    logits: ``"sem"`` N×C×h×w (C = ``n_classes``, channel 0 background), ``"boundary"`` N×1×h×w and,
    when ``n_tissues > 0``, ``"tissue"`` N×n_tissues; h = H - 2·margin (the centre of the input).

    Parameters
    ----------
    n_classes : int
        Semantic channels including background (2 for an untyped model).
    scale : str
        EfficientNet compound scale, ``"b0"`` … ``"b4"`` (the paper uses B4).
    width : int
        Channels of the gated pyramid, BiFPN and decoders (160 in the official code for B4).
    n_bifpn : int
        Stacked BiFPN blocks (3 in the paper).
    n_tissues : int
        Tissue classes for the tissue classifier; 0 = no classifier (no tissue labels).
    rgb_only : bool
        Ablation: RGB input instead of RGB + H, E, residual.
    margin : int
        Pixels cut from each side of every map output.
    dropout : float
        Spatial dropout after gating while training.
    backbone : {"native", "timm"}
        EfficientNet implementation (:class:`~models.tsfd.backbone.Backbone`).
    """

    def __init__(
        self,
        n_classes: int = 5,
        *,
        scale: str = "b0",
        width: int = 64,
        n_bifpn: int = 3,
        n_tissues: int = 0,
        rgb_only: bool = False,
        margin: int = 0,
        dropout: float = 0.0,
        backbone: BackboneKind = "native",
    ) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if n_bifpn < 1:
            raise ValueError(f"n_bifpn must be >= 1, got {n_bifpn}")
        if n_tissues < 0:
            raise ValueError(f"n_tissues must be >= 0, got {n_tissues}")
        self.n_classes = n_classes
        self.margin = margin
        self.deconvolution = ColourDeconvolution(rgb_only=rgb_only)
        self.backbone = Backbone(scale, in_chans=self.deconvolution.out_channels, kind=backbone)
        self.gating = Gating(self.backbone.channels, width, dropout=dropout)
        self.bifpn = nn.Sequential(*(BiFPN(width, _LEVELS) for _ in range(n_bifpn)))
        self.decoders = InterlinkedDecoders(width, n_classes, _LEVELS)
        self.tissue = TissueClassifier(width, n_tissues) if n_tissues else None

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be N×3×H×W, got shape {tuple(image.shape)}")
        height, width = image.shape[-2:]
        if height % _STRIDE or width % _STRIDE:
            raise ValueError(f"image sides must be multiples of {_STRIDE}, got {height}×{width}")
        levels = self.gating(self.backbone(self.deconvolution(image)))
        fused = self.bifpn(levels)
        sem, boundary = self.decoders(fused)
        out = {"sem": self._crop(sem), "boundary": self._crop(boundary)}
        if self.tissue is not None:
            # the coarsest gated level: the paper's classifier sits on the last backbone level
            out["tissue"] = self.tissue(levels[-1])
        return out

    def _crop(self, x: Tensor) -> Tensor:
        m = self.margin
        return x[..., m:-m, m:-m] if m else x
