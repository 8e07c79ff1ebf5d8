"""The feature-distillation backbone: an EfficientNet trunk on the deconvolved input.

Two interchangeable implementations of the same network: ``"native"`` (this package's
:class:`~models.tsfd.efficientnet.EfficientNetFeatures`, the default, needs only torch) and
``"timm"`` (timm's ``efficientnet_<scale>`` with ``features_only=True``, never pretrained; usable
only where timm and a torchvision matching torch import). Both give the same parameter names and
feature maps, so weights move between them.
"""

from __future__ import annotations

import importlib
import logging
from typing import Literal

from torch import Tensor, nn

from models.tsfd.efficientnet import COMPOUND_SCALES, EfficientNetFeatures

__all__ = ["Backbone"]

logger = logging.getLogger(__name__)

BackboneKind = Literal["native", "timm"]


class Backbone(nn.Module):
    """EfficientNet trunk returning five feature maps at strides 2, 4, 8, 16 and 32.

    Parameters
    ----------
    scale : str
        Compound scale ``"b0"`` … ``"b4"``.
    in_chans : int
        Input channels (6 for RGB + H, E, residual; 3 for the RGB-only ablation).
    kind : {"native", "timm"}
        Implementation; ``"timm"`` raises ImportError where timm cannot be imported.
    """

    def __init__(self, scale: str = "b0", *, in_chans: int = 6, kind: BackboneKind = "native") -> None:
        super().__init__()
        if scale not in COMPOUND_SCALES:
            raise ValueError(f"scale must be one of {sorted(COMPOUND_SCALES)}, got {scale!r}")
        self.kind = kind
        if kind == "native":
            native = EfficientNetFeatures(scale, in_chans=in_chans)
            self.trunk: nn.Module = native
            self.channels: tuple[int, ...] = native.channels
        elif kind == "timm":
            self.trunk, self.channels = _timm_trunk(scale, in_chans)
        else:
            raise ValueError(f"kind must be 'native' or 'timm', got {kind!r}")

    def forward(self, x: Tensor) -> list[Tensor]:
        return list(self.trunk(x))


def _timm_trunk(scale: str, in_chans: int) -> tuple[nn.Module, tuple[int, ...]]:
    # optional dependency: timm imports torchvision, which must match the installed torch
    timm = importlib.import_module("timm")
    model = timm.create_model(f"efficientnet_{scale}", pretrained=False, features_only=True,
                              in_chans=in_chans)
    channels = tuple(int(c) for c in model.feature_info.channels())
    logger.debug("timm efficientnet_%s trunk, feature channels %s", scale, channels)
    return model, channels
