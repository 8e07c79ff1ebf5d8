"""Hand-made instance maps and small networks shared by the panoptic tests."""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import NDArray

from models.card import ClassInfo, ModelCard
from models.panoptic import build_panoptic_tiny

CLASSES = (ClassInfo(name="background", colour=(0, 0, 0)), ClassInfo(name="tumour", colour=(255, 0, 0)),
           ClassInfo(name="lymphocyte", colour=(0, 255, 0)))


def disc_map(height: int, width: int, *, radius: int = 7, spacing: int = 26) -> NDArray[np.int32]:
    """Discs of ``radius`` px on a ``spacing`` px grid, ids 1.. in row-major order."""
    inst = np.zeros((height, width), np.int32)
    yy, xx = np.mgrid[:height, :width]
    label = 1
    for cy in range(spacing // 2, height - radius, spacing):
        for cx in range(spacing // 2, width - radius, spacing):
            inst[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = label
            label += 1
    return inst


def disc_image(inst: NDArray[np.int32], seed: int = 0) -> torch.Tensor:
    """A 1×3×H×W RGB 0..255 image: dark purple nuclei on pink, with noise."""
    rng = np.random.default_rng(seed)
    rgb = np.where((inst > 0)[..., None], [90.0, 40.0, 140.0], [230.0, 170.0, 200.0])
    rgb = np.clip(rgb + rng.normal(0, 12, rgb.shape), 0, 255)
    return torch.from_numpy(rgb.transpose(2, 0, 1)[None].astype(np.float32))


def tiny(num_classes: int = 2, seed: int = 0, **options: float) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_panoptic_tiny(num_classes, **options)


def card(typed: bool = False) -> ModelCard:
    return ModelCard(name="panoptic-test", family="instance", architecture="panoptic-tiny", input_size=256,
                     output_size=256, mpp=0.5, classes=CLASSES if typed else ())
