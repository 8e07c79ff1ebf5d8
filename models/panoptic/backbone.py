"""Trunk, pyramid, anchors and input transform of the panoptic network.

Depth: ResNet-18, truncated after ``layer3`` (C2–C4, strides 4, 8, 16) under a 128-channel FPN
with a max-pooled stride-32 level. Why: the model trains within a CPU budget and ships under
40 MB of float32 weights. ResNet-18's ``layer4`` alone holds 8.4 M of its 11.2 M parameters
(34 MB) yet only sees stride 32, where a 20 px nucleus is under one cell; ResNet-34 triples
``layer3``'s cost. Truncated, the trunk has 2.8 M parameters and a ~200 px receptive field at
stride 16, several nucleus diameters at 0.5 µm/px. ``returned_layers=(1, 2, 3, 4)`` restores the
full trunk (then five levels; anchor sizes must follow).

Anchors: nuclei are ~8–30 px at 0.5 µm/px, so one size per level, 8 px at stride 4 doubling up
to 64 px at stride 32, three aspect ratios (0.5, 1, 2) at every level.

Input: ``image`` float32 RGB 0–255; :class:`NoResizeTransform` normalises with the project's H&E
statistics (the convention of :mod:`models.conic.unet`) and pads to a multiple of 32, and never
resizes, in training and in evaluation alike (torchvision's transform always rescales in eval).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models import resnet18, resnet34
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = [
    "ASPECT_RATIOS",
    "IMAGE_MEAN",
    "IMAGE_STD",
    "SIZE_DIVISIBLE",
    "NoResizeTransform",
    "anchor_generator",
    "anchor_sizes",
    "build_backbone",
]

IMAGE_MEAN = (180.0, 130.0, 170.0)
"""Per-channel mean of H&E tiles, RGB 0–255 (as :mod:`models.conic.unet`)."""

IMAGE_STD = (45.0, 50.0, 40.0)
"""Per-channel standard deviation of H&E tiles, RGB 0–255."""

SIZE_DIVISIBLE = 32
"""The graph pads its input on the right and bottom to a multiple of this."""

ASPECT_RATIOS = (0.5, 1.0, 2.0)
"""Anchor height/width ratios, the same at every pyramid level."""

_TRUNKS = {"resnet18": resnet18, "resnet34": resnet34}
_STAGE_CHANNELS = {1: 64, 2: 128, 3: 256, 4: 512}
"""Output channels of each ResNet stage (BasicBlock trunks)."""


def build_backbone(
    depth: str = "resnet18", *, width: int = 128, returned_layers: tuple[int, ...] = (1, 2, 3)
) -> BackboneWithFPN:
    """A randomly initialised ResNet + FPN (nothing is downloaded).

    Parameters
    ----------
    depth : str
        ``"resnet18"`` or ``"resnet34"``.
    width : int
        FPN channels.
    returned_layers : tuple of int
        ResNet stages (1–4) feeding the FPN; the trunk stops after the last one. A max-pooled
        level is added above the coarsest.

    Returns
    -------
    BackboneWithFPN
        ``backbone(x)`` → ordered dict of ``len(returned_layers) + 1`` maps of ``width`` channels.
    """
    if depth not in _TRUNKS:
        raise ValueError(f"depth must be one of {sorted(_TRUNKS)}, got {depth!r}")
    if width < 8:
        raise ValueError(f"width must be >= 8, got {width}")
    layers = tuple(returned_layers)
    if not layers or list(layers) != sorted(set(layers)) or not set(layers) <= {1, 2, 3, 4}:
        raise ValueError(f"returned_layers must be increasing stages within 1..4, got {returned_layers}")
    # BatchNorm, not torchvision's default FrozenBatchNorm: frozen statistics only make sense for
    # pretrained weights, and this trunk trains from scratch (every stage trainable).
    trunk = _TRUNKS[depth](weights=None, norm_layer=nn.BatchNorm2d)
    in_channels = [_STAGE_CHANNELS[stage] for stage in layers]
    return_layers = {f"layer{stage}": str(index) for index, stage in enumerate(layers)}
    # BackboneWithFPN keeps the trunk only up to the last returned stage (IntermediateLayerGetter)
    return BackboneWithFPN(trunk, return_layers, in_channels, width, extra_blocks=LastLevelMaxPool())


def anchor_sizes(n_levels: int, smallest: int = 8) -> tuple[tuple[int, ...], ...]:
    """One anchor size per pyramid level: ``smallest`` px at stride 4, doubling per level."""
    if n_levels < 1:
        raise ValueError(f"n_levels must be >= 1, got {n_levels}")
    return tuple((smallest * 2**level,) for level in range(n_levels))


def anchor_generator(n_levels: int, smallest: int = 8) -> AnchorGenerator:
    """Anchors for nuclei: :func:`anchor_sizes` × :data:`ASPECT_RATIOS` at every level."""
    return AnchorGenerator(anchor_sizes(n_levels, smallest), (ASPECT_RATIOS,) * n_levels)


class NoResizeTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform (normalise, pad, batch) without its resizing.

    Boxes and masks therefore stay in input pixels, and the network sees the image at the
    resolution the card names.
    """

    def __init__(self) -> None:
        # min/max size are never used: resize is the identity below
        super().__init__(min_size=1, max_size=1, image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD),
                         size_divisible=SIZE_DIVISIBLE)

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target
