"""Training of the panoptic (``instance`` family) network: batch targets, forward, loss.

Mask R-CNN samples its proposals against the ground truth inside the forward pass, so the
network's training forward takes the targets: :func:`panoptic_forward` derives them (a box, a
class and a mask per nucleus, :func:`models.panoptic.targets.instance_targets`) from the batch's
instance and class maps and returns the network's loss terms; :class:`PanopticLoss` weighs and
sums them. Untyped patches (MoNuSeg, CPM-15, TNBC) mark every nucleus class 1.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor, nn

from models.panoptic.net import LOSS_TERMS, LOSS_WEIGHTS
from models.panoptic.targets import instance_targets

__all__ = ["PanopticLoss", "collate_panoptic", "panoptic_forward"]


def collate_panoptic(
    images: list[NDArray[np.uint8]],
    insts: list[NDArray[np.int32]],
    types: list[NDArray[np.uint8]],
    typed: list[bool],
) -> dict[str, Tensor]:
    """Stack augmented patches: ``image`` (N, 3, H, W) float 0-255, ``inst`` (N, H, W) int64,
    ``types`` (N, H, W) int64 (0 where the patch is untyped) and ``typed`` (N,) bool."""
    image = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    classes = [t.astype(np.int64) if flag else np.zeros(t.shape, np.int64)
               for t, flag in zip(types, typed, strict=True)]
    return {
        "image": image.contiguous(),
        "inst": torch.from_numpy(np.stack(insts).astype(np.int64)),
        "types": torch.from_numpy(np.stack(classes)),
        "typed": torch.tensor(typed, dtype=torch.bool),
    }


def panoptic_forward(model: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The network's training forward on a :func:`collate_panoptic` batch → its loss terms."""
    num_classes = int(getattr(model, "num_classes", 2))
    device = batch["image"].device
    targets = []
    for inst, types, flag in zip(batch["inst"], batch["types"], batch["typed"], strict=True):
        target = instance_targets(inst.cpu().numpy(), types.cpu().numpy() if bool(flag) else None,
                                  num_classes=num_classes)
        targets.append({k: v.to(device) for k, v in target.items()})
    terms: dict[str, Tensor] = model(batch["image"], targets)
    return terms


class PanopticLoss(nn.Module):
    """Weighted sum of the network's loss terms (``weights`` keys must be :data:`LOSS_TERMS`).

    ``loss(terms, batch)`` → (total, {term: float} for the log); ``batch`` is not read.
    """

    def __init__(self, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        given = dict(weights or {})
        unknown = set(given) - set(LOSS_TERMS)
        if unknown:
            raise ValueError(f"loss.weights takes {list(LOSS_TERMS)} for a panoptic network, got "
                             f"{sorted(unknown)}")
        self.weights = {**LOSS_WEIGHTS, **given}

    def forward(
        self, terms: Mapping[str, Tensor], batch: Mapping[str, Tensor]
    ) -> tuple[Tensor, dict[str, float]]:
        missing = set(LOSS_TERMS) - set(terms)
        if missing:
            raise ValueError(f"the network returned no {sorted(missing)} loss terms")
        total = torch.stack([self.weights[name] * terms[name] for name in LOSS_TERMS]).sum()
        return total, {name: float(terms[name].detach()) for name in LOSS_TERMS}
