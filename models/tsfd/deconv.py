"""Colour deconvolution inside the network: RGB 0..255 → optical density → H, E and residual.

TSFD-Net feeds its backbone the RGB image and its H&E deconvolution (Ilyas et al. 2022, sec. 3.1;
the official code does it offline, we do it in the graph so callers and the ONNX file still take
RGB). The stain matrix rows are the unit optical-density vectors of haematoxylin and eosin of
Ruifrok & Johnston (2001), as rounded by G. Landini's colour-deconvolution plugin and used by
TSFD-Net's ``stain_deconv.py``: H = (0.65, 0.70, 0.29), E = (0.07, 0.99, 0.11); the residual row
is their cross product. Bilaloglu et al.'s own reference numbers were not found, so these are
Ruifrok & Johnston's (the values TSFD-Net's code carries).

Optical density per channel is ``-log((I + 1) / 256)`` (0 for white, about 5.5 for black), and the
stain concentrations are ``OD @ inv(M)``. No per-image min-max (the official offline step) — it
would make a pixel's input depend on the rest of the patch, and so on where a tile is cut.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

__all__ = ["HE_STAIN_VECTORS", "ColourDeconvolution", "stain_matrix"]

HE_STAIN_VECTORS: tuple[tuple[float, float, float], tuple[float, float, float]] = (
    (0.65, 0.70, 0.29),  # haematoxylin
    (0.07, 0.99, 0.11),  # eosin
)
"""Optical-density vectors (R, G, B) of haematoxylin and eosin (Ruifrok & Johnston 2001)."""

_OD_SCALE = 1.0 / math.log(256.0)
"""Scales optical density so black is about 1 (keeps the inputs near the RGB range /255)."""


def stain_matrix(vectors: tuple[tuple[float, float, float], ...] = HE_STAIN_VECTORS) -> NDArray[np.float64]:
    """The 3×3 stain matrix: rows H, E (normalised to unit length) and their cross product.

    Parameters
    ----------
    vectors : two RGB optical-density vectors
        Haematoxylin then eosin.

    Returns
    -------
    (3, 3) float64 ndarray
        ``M`` with ``OD = C @ M`` for stain concentrations ``C`` (H, E, residual).
    """
    rows = np.asarray(vectors, dtype=np.float64)
    if rows.shape != (2, 3) or not np.isfinite(rows).all():
        raise ValueError(f"vectors must be two finite RGB vectors, got shape {rows.shape}")
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    if (norms <= 0).any():
        raise ValueError("stain vectors must not be zero")
    rows = rows / norms
    residual = np.cross(rows[0], rows[1])
    return np.vstack([rows, residual / np.linalg.norm(residual)])


class ColourDeconvolution(nn.Module):
    """RGB 0..255 (N×3×H×W) → the network input: RGB/255 and, unless ``rgb_only``, H, E, residual.

    Parameters
    ----------
    rgb_only : bool
        Ablation switch (the paper's Table 5): pass RGB/255 only (3 channels) instead of RGB+HER
        (6 channels).
    """

    inverse: Tensor

    def __init__(self, *, rgb_only: bool = False) -> None:
        super().__init__()
        self.rgb_only = rgb_only
        inverse = np.linalg.inv(stain_matrix())
        self.register_buffer("inverse", torch.tensor(inverse, dtype=torch.float32), persistent=False)

    @property
    def out_channels(self) -> int:
        """Channels of the output: 3 (RGB only) or 6 (RGB + H, E, residual)."""
        return 3 if self.rgb_only else 6

    def forward(self, image: Tensor) -> Tensor:
        rgb = image / 255.0
        if self.rgb_only:
            return rgb
        # clamp: inputs slightly outside 0..255 (resampling overshoot) must not reach log(<=0)
        od = -torch.log((image.clamp(0.0, 255.0) + 1.0) / 256.0) * _OD_SCALE
        her = torch.einsum("nchw,cs->nshw", od, self.inverse)
        return torch.cat([rgb, her], dim=1)
